"""Quantization passes: int8 (static and dynamic), int4 weights, float16, and SmoothQuant
before int8."""
