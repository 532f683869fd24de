"""Cleanup passes: constant folding, dead code, no-ops, common subexpressions, shape chains
and transposes (lossless)."""
