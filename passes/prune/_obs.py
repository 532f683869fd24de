"""Structured Optimal Brain Surgeon for the inputs of one linear layer y = x·W + b.

Removing a set of W's input rows (FFN neurons, the D rows of an attention head) and
re-fitting the rows kept is a least-squares problem in the calibration statistics alone:
with x̃ = [x, 1] and H = E[x̃ x̃ᵀ] (the Gram matrix, a column of ones carrying the bias),
the best rows kept for the set K are W̃'_K = H_KK⁻¹ H_K: W̃, which expresses what the removed
inputs contributed through their correlation with the kept ones (the mean compensation of
FLAP is the special case where only the ones column is used).

Which inputs to remove follows ZipLM / OBS (Frantar and Alistarh): with H⁻¹ known, the
output error of removing a group G (and updating everything else optimally) is
tr(W_Gᵀ (H⁻¹_GG)⁻¹ W_G); groups are removed greedily, cheapest first, updating W and
H⁻¹ after each, so the order is nested (the best k kept are the first k of one ranking).
"""

from __future__ import annotations

import numpy as np

from graphopt.capture import ChannelStats

DAMP = 0.01  # ridge, relative to the mean diagonal of H (as SparseGPT)
MIN_ROWS_PER_INPUT = 4  # calibration rows per input for a re-fit
STEPS = 256  # greedy steps at most: single inputs are removed in chunks beyond this


def enough(stats: ChannelStats) -> bool:
    """Whether there are rows enough for a re-fit (else it would fit noise)."""
    return stats.gram is not None and stats.count >= MIN_ROWS_PER_INPUT * (len(stats.sum) + 1)


def augmented_gram(stats: ChannelStats) -> np.ndarray:
    """E[x̃ x̃ᵀ] with x̃ = [x, 1], [c + 1, c + 1], from streamed statistics with a Gram."""
    if stats.gram is None:
        raise ValueError("statistics were gathered without a Gram matrix")
    n = max(stats.count, 1)
    c = len(stats.sum)
    h = np.empty((c + 1, c + 1))
    h[:c, :c] = stats.gram
    h[:c, c] = h[c, :c] = stats.sum
    h[c, c] = n
    return h / n


def damped(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    c = len(h) - 1
    out = h.copy()
    idx = np.arange(c)
    out[idx, idx] += damp * max(float(np.mean(np.diag(h)[:c])), 1e-12)
    return out


def with_bias(w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """W̃ = [W; b] in float64 ([c + 1, o])."""
    w = np.asarray(w, dtype=np.float64)
    bias = np.zeros((1, w.shape[1])) if b is None else \
        np.asarray(b, dtype=np.float64).reshape(1, -1)
    return np.concatenate([w, bias])


def removal_order(h: np.ndarray, w: np.ndarray, b: np.ndarray | None, group: int = 1,
                  damp: float = DAMP) -> np.ndarray:
    """The input groups (``group`` consecutive rows of W each) in the order greedy OBS
    removes them, cheapest first (every group, the last one included)."""
    c = len(h) - 1
    if c % group:
        raise ValueError(f"{c} inputs are not groups of {group}")
    hinv = np.linalg.inv(damped(h, damp))
    wt = with_bias(w, b)
    groups = c // group
    alive = np.ones(groups, dtype=bool)
    order: list[int] = []
    chunk = 1 if group > 1 else max(1, groups // STEPS)
    while alive.any():
        ids = np.flatnonzero(alive)
        if group == 1:
            errors = (wt[ids] ** 2).sum(1) / np.maximum(np.diag(hinv)[ids], 1e-300)
        else:
            errors = np.empty(len(ids))
            for k, g in enumerate(ids):
                rows = slice(g * group, (g + 1) * group)
                errors[k] = np.trace(wt[rows].T @ np.linalg.solve(
                    hinv[rows, rows], wt[rows]))
        picked = ids[np.argsort(errors, kind="stable")[:chunk]]
        rows = (picked[:, None] * group + np.arange(group)[None, :]).reshape(-1)
        block = hinv[np.ix_(rows, rows)]
        solve = np.linalg.solve(block, np.concatenate([wt[rows], hinv[rows]], axis=1))
        wt -= hinv[:, rows] @ solve[:, : wt.shape[1]]
        hinv -= hinv[:, rows] @ solve[:, wt.shape[1]:]
        wt[rows] = 0.0
        hinv[rows, :] = 0.0
        hinv[:, rows] = 0.0
        hinv[rows, rows] = 1.0  # removed: isolated, never picked again
        alive[picked] = False
        order.extend(int(p) for p in picked)
    return np.asarray(order)


def ranking(order: np.ndarray) -> np.ndarray:
    """Scores from a removal order: higher is kept longer (for ``top``)."""
    scores = np.empty(len(order))
    scores[order] = np.arange(len(order), dtype=np.float64)
    return scores


def _projection(h: np.ndarray, kept: np.ndarray, damp: float) -> np.ndarray:
    """(H_KK + λI)⁻¹ (H_K + λI_K) over the kept rows plus the ones column ([k + 1,
    c + 1]): the ridge pulls the kept rows towards their own weights, not towards zero,
    so nothing moves when nothing is removed, however thin the data."""
    c = len(h) - 1
    kept = np.asarray(kept, dtype=np.int64)
    rows = np.append(kept, c)
    hd = damped(h, damp)
    rhs = h[rows].copy()
    rhs[np.arange(len(kept)), kept] += hd[kept, kept] - h[kept, kept]
    return np.linalg.solve(hd[np.ix_(rows, rows)], rhs)


def refit(h: np.ndarray, w: np.ndarray, b: np.ndarray | None, kept: np.ndarray,
          damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(W'_K [k, o], b' [o]): the kept rows and the bias that best reproduce x·W + b
    from the kept inputs alone."""
    out = _projection(h, kept, damp) @ with_bias(w, None)  # the bias needs no fit
    bias = out[-1] if b is None else out[-1] + np.asarray(b, dtype=np.float64).reshape(-1)
    return out[:-1], bias


def gate(h: np.ndarray, kept: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray,
                                                                       np.ndarray]:
    """(M [c, c], offset [c]) with (x·M + offset)·W + b = x_K·W'_K + b' for every W, b:
    the re-fit applied to the layer's input, for a gated session."""
    c = len(h) - 1
    kept = np.asarray(kept, dtype=np.int64)
    a = np.zeros((c + 1, c + 1))
    a[np.append(kept, c)] = _projection(h, kept, damp)
    return a[:c, :c], a[c, :c]
