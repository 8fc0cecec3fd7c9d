"""Models, inference backends, training data (the physics phantom) and the scanner simulator.

Nothing here imports ``agent``: engines are usable on their own, by training and benchmarks.
"""
