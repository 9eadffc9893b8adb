"""Calibration: one pass of the calibration tokens through the decoder layers (``stream``), observing every
MoE layer's experts, and what is accumulated from it per layer (``stats``)."""
