"""Numerical lumbar-spine phantom: procedural anatomy, dual-echo spoiled-GRE MR physics and the matching CT."""
