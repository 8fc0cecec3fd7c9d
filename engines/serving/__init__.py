"""Serving the engine to agents on other processes or hosts through Triton Inference Server (docs/scale-out.md)."""
