"""Low-rank factors of a linear layer: W (K×N) ≈ A (K×r) · B (r×N), and the graph edit
that turns ``MatMul(x, W)`` / ``Gemm(x, W, C)`` into ``MatMul(x, A)`` → ``MatMul(·, B)``.

Data-aware (SVD-LLM's truncation-aware whitening): with calibration inputs X (n × K) of
the layer, C = XᵀX/n + λI = S·Sᵀ (Cholesky, λ = ``damp``·mean diag C), so the output
error of any W' is ‖X(W − W')‖²/n = ‖Sᵀ(W − W')‖²_F (up to λ). The SVD Sᵀ·W = U·Σ·Vᵀ
truncated at rank r is therefore the best rank-r W' for that error, and the discarded
singular values give it exactly: relative output error = √(Σ_{i≥r} σᵢ² / Σ σᵢ²). Then

    A = S⁻ᵀ·U_r·Σ_r^½   (a triangular solve, never an explicit inverse)
    B = Σ_r^½·V_rᵀ

(the balanced split keeps both factors, and the activation between them, at similar
scales in float32). Without data S = I: the plain SVD, best for the weight's Frobenius
error. At full rank the product is W itself (to rounding), in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

DAMP = 1e-4  # whitening ridge, as a fraction of the mean diagonal of XᵀX/n


def whitening(gram: np.ndarray, count: int, damp: float = DAMP) -> np.ndarray:
    """Lower-triangular S with S·Sᵀ = gram/count + λI (λ = ``damp``·mean diagonal),
    float64. λ grows tenfold until the Cholesky factorization succeeds (an input channel
    that is constant zero on the data makes the Gram singular)."""
    c = np.asarray(gram, dtype=np.float64) / max(int(count), 1)
    c = (c + c.T) / 2
    scale = float(np.mean(np.diag(c))) or 1.0
    lam = damp * scale
    for _ in range(8):
        try:
            return np.linalg.cholesky(c + lam * np.eye(len(c)))
        except np.linalg.LinAlgError:
            lam *= 10
    raise np.linalg.LinAlgError("input Gram matrix is not positive definite even damped")


@dataclass
class Factorization:
    """The SVD of Sᵀ·W (S = I without data), from which any rank's factors follow.

    ``left`` = S⁻ᵀ·U and ``right`` = Vᵀ are kept in float32 (what the factors are stored
    in); ``sigma`` in float64."""

    left: np.ndarray  # K × m
    sigma: np.ndarray  # m
    right: np.ndarray  # m × N
    whitened: bool

    @property
    def full_rank(self) -> int:
        return len(self.sigma)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, B): K×r and r×N float64 with A·B the best rank-r W' (see the module)."""
        r = int(min(max(rank, 1), self.full_rank))
        root = np.sqrt(self.sigma[:r])
        a = self.left[:, :r].astype(np.float64) * root
        b = root[:, None] * self.right[:r].astype(np.float64)
        return a, b

    def error(self, rank: int) -> float:
        """Relative error of rank ``rank``: output error on the calibration data when
        whitened (up to the damping), the weight's Frobenius error when not."""
        total = float((self.sigma ** 2).sum())
        if total == 0:
            return 0.0
        return float(np.sqrt(max((self.sigma[rank:] ** 2).sum(), 0.0) / total))


def factorize(w: np.ndarray, s: np.ndarray | None = None) -> Factorization:
    """The factorization of ``w`` (K×N), whitened by ``s`` (lower triangular, K×K, see
    ``whitening``) when given."""
    from scipy.linalg import solve_triangular  # here: scipy.linalg takes 0.2 s to import

    w = np.asarray(w, dtype=np.float64)
    m = w if s is None else s.T @ w
    u, sigma, vt = np.linalg.svd(m, full_matrices=False)
    left = u if s is None else solve_triangular(s, u, trans="T", lower=True)
    return Factorization(left.astype(np.float32), sigma, vt.astype(np.float32), s is not None)


def output_error(w: np.ndarray, approx: np.ndarray, gram: np.ndarray) -> float:
    """‖X(W − W')‖_F / ‖XW‖_F from the Gram XᵀX (relative output error)."""
    w = np.asarray(w, dtype=np.float64)
    d = w - np.asarray(approx, dtype=np.float64)
    den = float(np.einsum("ij,ik,kj->", w, gram, w))
    return float(np.sqrt(max(np.einsum("ij,ik,kj->", d, gram, d), 0.0) / den)) if den else 0.0


# ============================================================================ graph
def linear_weight(node: gs.Node, value: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(W as K×N, reason it cannot be decomposed or None) of a MatMul/Gemm whose second
    input has the constant ``value``. Gemm's ``transB`` is undone and ``alpha`` folded
    in."""
    if value.ndim != 2:
        return np.zeros((0, 0)), f"weight of rank {value.ndim} (batched weights)"
    if not np.issubdtype(value.dtype, np.floating):
        return np.zeros((0, 0)), f"weight of type {value.dtype}"
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return np.zeros((0, 0)), "Gemm with transA"
        if node.attrs.get("transB", 0):
            value = value.T
        value = value * float(node.attrs.get("alpha", 1.0))
    return value, None


def decompose_linear(graph: gs.Graph, node: gs.Node, a: np.ndarray, b: np.ndarray,
                     taken: set[str], node_names: set[str]) -> gs.Node:
    """Rewrite MatMul/Gemm ``node`` (K×N constant weight) as ``MatMul(x, A)`` followed by
    ``node`` itself reading the r-wide activation with weight B: the second factor keeps
    the node's name, output tensor, bias, ``beta`` and ``transB`` layout (``alpha`` is
    folded into B). Returns the new first node. ``taken``/``node_names``: names in use
    (tensors / nodes), updated."""
    from graphopt.rewrite import unique_name

    x, w = node.inputs[0], node.inputs[1]
    dtype = np.asarray(w.values).dtype if isinstance(w, gs.Constant) else w.dtype
    r = a.shape[1]
    hint = w.name or node.name
    a_const = gs.Constant(unique_name(taken, f"{hint}_lowrank_a"),
                          np.ascontiguousarray(a.astype(dtype)))
    b_value = b
    if node.op == "Gemm":
        if node.attrs.get("transB", 0):
            b_value = b.T
        node.attrs["alpha"] = 1.0
    b_const = gs.Constant(unique_name(taken, f"{hint}_lowrank_b"),
                          np.ascontiguousarray(b_value.astype(dtype)))
    shape = None if x.shape is None else [*x.shape[:-1], r]
    mid = gs.Variable(unique_name(taken, f"{node.outputs[0].name}_lowrank"),
                      dtype=x.dtype if x.dtype is not None else dtype, shape=shape)
    first = gs.Node("MatMul", name=unique_name(node_names, f"{node.name or 'linear'}_lowrank_a"),
                    inputs=[x, a_const], outputs=[mid])
    node.inputs[0] = mid
    node.inputs[1] = b_const
    graph.nodes.append(first)
    return first
