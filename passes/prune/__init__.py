"""Structured pruning passes."""
