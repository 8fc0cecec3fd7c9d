"""The sequence protocols shipped with the product: one TOML file each, beside this file (see README.md here).

This package holds data, not code: it exists so that the protocol files install with the wheel, at a path
the agent finds the same way in a checkout and in an installed environment. It imports nothing.
"""

from pathlib import Path

#: The folder holding the shipped ``*.toml`` protocol files.
FOLDER = Path(__file__).resolve().parent
