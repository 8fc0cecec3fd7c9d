"""sct-edge-agent: turns a dual-echo 3D spoiled-GRE MRI acquisition into a synthetic CT at the scanner's edge."""

__version__ = "0.1.0"
