"""Where the sCT should not be trusted: the per-voxel confidence a model computes with its sCT, and the regions
below its calibrated threshold that the agent flags (docs/model.md, Confidence)."""
