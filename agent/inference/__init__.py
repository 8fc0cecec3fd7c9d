"""Inference: the streamer that cuts slabs as slices arrive, and the engine stage that runs the model on them."""
