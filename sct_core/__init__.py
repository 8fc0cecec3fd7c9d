"""What the agent and the engines share: voxel grids in patient space and the root of the product's errors.

Neither ``agent/`` nor ``engines/`` owns these, so both import them from here; this package imports nothing of
either (numpy only), which keeps the subscriber library free of torch.
"""
