"""Low-rank decomposition: MatMul/Gemm weights by (whitened) SVD, Convs by Tucker-2 or
spatial separation; the ``decompose-low-rank`` compression pass."""

from graphopt.passes.lowrank.decompose import DecomposeLowRank

__all__ = ["DecomposeLowRank"]
