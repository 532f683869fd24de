"""Fusion passes: CNN, activation, attention, normalization and GELU patterns into the
fused ops a target runs (lossless)."""
