"""Running a model over a volume: slab planning with halos, normalisation, stitching, HU conversion."""
