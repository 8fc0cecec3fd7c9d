"""Inference backends behind one interface: load a manifest, warm up, infer one normalised slab window."""
