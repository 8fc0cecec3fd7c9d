"""Pathology the shipped model never saw, added to a phantom case per seed and flag (docs/phantom.md, Pathology).

Only the contract types are imported here, so that :mod:`engines.phantom.case` can name them without importing
the physics modules.
"""

from engines.phantom.pathology.kinds import PATHOLOGIES, AnomalyObject, Pathology, parse_pathologies

__all__ = ["PATHOLOGIES", "AnomalyObject", "Pathology", "parse_pathologies"]
