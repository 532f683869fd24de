"""One layer's least-squares re-fit: streaming normal equations, the ridge solve, bias
correction, and writing the result into the layer's initializers.

A layer is a stack of G independent problems (G = 1; for a depthwise Conv one per
channel) with c unknowns each (inputs, plus the bias when the layer has one) and o
outputs: p [G, c, o], the bias in the last row. Per batch only X̃ᵀX̃ [G, c, c] and X̃ᵀY
[G, c, o] (with a virtual column of ones: sums of X̃ and Y) and ‖Y‖² grow, so memory is
O(c²) whatever the amount of data, and errors are computed from them too:
‖Y − X̃p‖² = ‖Y‖² − 2⟨p, X̃ᵀY⟩ + ⟨p, X̃ᵀX̃ p⟩.
"""

from __future__ import annotations

import numpy as np

from graphopt.capture import as_rows
from graphopt.passes.recover.im2col import im2col, patches
from graphopt.passes.recover.layers import Layer, as_float64

MIN_ROWS_PER_COLUMN = 4  # fewer rows per unknown: bias correction only
# Ridge strengths (fractions of mean diag X̃ᵀX̃) tried when the ridge is chosen on held
# out batches.
RIDGE_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
EXACT = 1e-5  # a relative error float32 arithmetic alone makes: nothing to fit
CHUNK_BYTES = 1 << 26  # im2col rows built at once, at most


class Fit:
    """The accumulated statistics of one layer (see the module docstring)."""

    def __init__(self, layer: Layer):
        self.layer = layer
        self.params = params(layer)
        g, c, o = self.params.shape
        self.gram = np.zeros((g, c, c))
        self.cross = np.zeros((g, c, o))
        self.yy = 0.0
        self.rows = 0
        self.problem: str | None = None
        # the same statistics of the held-out batches alone (when the ridge is chosen),
        # and of the batches left out of the fits that score it (variants of held ones)
        self.held = (np.zeros_like(self.gram), np.zeros_like(self.cross), 0.0, 0)
        self.aside = (np.zeros_like(self.gram), np.zeros_like(self.cross), 0.0, 0)

    def add(self, x: np.ndarray, y: np.ndarray, held: bool = False,
            aside: bool = False) -> None:
        """One batch: the layer's input ``x`` (compressed model) and its target ``y``
        (the original's output, narrowed as the layer's); ``held``: a batch that also
        scores the ridge strengths; ``aside``: one the fits scored that way leave out
        (a variant of a held-out batch: ``graphopt.augment``)."""
        if self.problem:
            return
        if held or aside:
            before = (self.gram.copy(), self.cross.copy(), self.yy, self.rows)
        n = max(len(x), 1)
        step = n
        if self.layer.kind in ("conv", "depthwise") and x.ndim > 2:  # im2col in chunks
            g, c, _ = self.params.shape
            per_sample = int(np.prod(x.shape[2:])) * g * c * 8
            step = max(1, CHUNK_BYTES // max(per_sample, 1))
        for start in range(0, n, step):
            self._add(x[start:start + step], y[start:start + step])
            if self.problem:
                return
        if held or aside:
            g0, c0, y0, r0 = before
            which = "held" if held else "aside"
            hg, hc, hy, hr = getattr(self, which)
            setattr(self, which, (hg + self.gram - g0, hc + self.cross - c0,
                                  hy + self.yy - y0, hr + self.rows - r0))

    def _add(self, x: np.ndarray, y: np.ndarray) -> None:
        layer = self.layer
        g, c, o = self.params.shape
        w = c - int(layer.with_bias)  # weight columns
        if layer.kind == "depthwise":
            xs = patches(x, layer.node).transpose(1, 0, 2)  # [G, rows, k]
            ys = as_rows(y, 1).T[:, :, None]  # [G, rows, 1]
        else:
            xs = (im2col(x, layer.node) if layer.kind == "conv" else as_rows(x, -1))[None]
            ys = as_rows(y, 1 if layer.kind == "conv" else -1)[None]
        if xs.shape[2] != w or ys.shape[2] != o or xs.shape[1] != ys.shape[1]:
            self.problem = (f"shapes do not match: {xs.shape[1]}x{xs.shape[2]} inputs for "
                            f"{w} weight columns, {ys.shape[1]}x{ys.shape[2]} targets for "
                            f"{o} outputs (a narrowed output missing from kept?)")
            return
        if g == 1:
            x2, y2 = xs[0], ys[0]
            self.gram[0, :w, :w] += x2.T @ x2
            self.cross[0, :w] += x2.T @ y2
        else:
            self.gram[:, :w, :w] += np.einsum("gri,grj->gij", xs, xs, optimize=True)
            self.cross[:, :w] += np.einsum("gri,gro->gio", xs, ys, optimize=True)
        if layer.with_bias:
            sx, sy = xs.sum(axis=1), ys.sum(axis=1)
            self.gram[:, :w, w] += sx
            self.gram[:, w, :w] += sx
            self.gram[:, w, w] += xs.shape[1]
            self.cross[:, w] += sy
        self.yy += float(np.einsum("gro,gro->", ys, ys))
        self.rows += xs.shape[1]

    def error(self, p: np.ndarray, stats: tuple | None = None) -> float:
        """‖Y − X̃·p‖ / ‖Y‖ over the data (``stats``: over (gram, cross, yy) of a part of
        it), from the accumulated statistics."""
        gram, cross, yy = stats or (self.gram, self.cross, self.yy)
        num = yy - 2.0 * float((p * cross).sum()) + \
            float(np.einsum("gio,gij,gjo->", p, gram, p, optimize=True))
        return float(np.sqrt(max(num, 0.0) / max(yy, 1e-30)))

    def choose_ridge(self, with_bias: bool, prior: np.ndarray | None) -> float | None:
        """The ``RIDGE_GRID`` strength whose fit on the other batches has the least error
        on the held-out ones (None without held-out rows, or with too few rows left)."""
        hg, hc, hy, hr = self.held
        ag, ac, _, ar = self.aside
        rest = self.rows - hr - ar
        if not hr or rest < MIN_ROWS_PER_COLUMN * self.params.shape[1]:
            return None
        errors = {r: self.error(solve(self.gram - hg - ag, self.cross - hc - ac, r,
                                      with_bias, prior), (hg, hc, hy)) for r in RIDGE_GRID}
        return min(RIDGE_GRID, key=lambda r: (errors[r], -r))

    def finish(self, ridge: float, bias_only: bool, prior: str = "current",
               choose: bool = False) -> dict:
        """Solve (the ridge shrinking the weights towards the layer's current ones, or
        towards zero: ``prior``; ``choose``: its strength chosen on the held-out batches,
        ``ridge`` when there are none), write the layer's new weights if they lower its
        error on the data, and return its stats."""
        if self.problem:
            return {"skipped": self.problem}
        if self.rows == 0:
            return {"skipped": "no data"}
        layer, old = self.layer, self.params
        before = self.error(old)
        if before <= EXACT:
            return self._stats(before, before, "unchanged")
        few = self.rows < MIN_ROWS_PER_COLUMN * old.shape[1]
        chosen = None
        if bias_only or few:
            why = "asked" if bias_only else \
                f"too few rows: {self.rows} < {MIN_ROWS_PER_COLUMN} x {old.shape[1]}"
            if not layer.with_bias:
                return self._stats(before, before, f"kept ({why}; no bias to correct)")
            new, mode = self.bias_corrected(old), f"bias correction ({why})"
        else:
            start = old if prior == "current" else None
            chosen = self.choose_ridge(layer.with_bias, start) if choose else None
            ridge = ridge if chosen is None else chosen
            new = solve(self.gram, self.cross, ridge, layer.with_bias, start)
            mode = "least squares per channel" if layer.kind == "depthwise" else \
                "least squares"
            if layer.with_bias:  # the ridge may shrink more than the fit gains: then the
                shifted = self.bias_corrected(old)  # old weights with the best bias
                if self.error(shifted) < self.error(new):
                    new, mode = shifted, "bias correction (least squares no better)"
        after = self.error(new)
        if not after < before:  # never make a layer worse on the data it was fitted on
            return self._stats(before, before, "kept (no improvement)")
        write(layer, new)
        stats = self._stats(before, after, mode)
        if chosen is not None:
            stats["ridge"] = chosen
        return stats

    def bias_corrected(self, p: np.ndarray) -> np.ndarray:
        """``p`` with b += E[y − ŷ] per channel."""
        mean_x = self.gram[:, -1, :] / self.rows  # [G, c]: E[x], 1
        mean_y = self.cross[:, -1, :] / self.rows  # [G, o]
        new = p.copy()
        new[:, -1, :] += mean_y - np.einsum("gc,gco->go", mean_x, p)
        return new

    def _stats(self, before: float, after: float, mode: str) -> dict:
        return {"rows": self.rows, "columns": int(self.params.shape[1]),
                "error_before": float(f"{before:.6g}"), "error_after": float(f"{after:.6g}"),
                "mode": mode}


def solve(gram: np.ndarray, cross: np.ndarray, ridge: float, with_bias: bool,
          prior: np.ndarray | None = None) -> np.ndarray:
    """argmin ‖Y − X p‖² + λ‖p_w − prior_w‖² per problem of the stack (the weights are
    shrunk towards ``prior``, zero when None; the bias is not shrunk),
    λ = ridge · mean(diag(X̃ᵀX̃)), by Cholesky in float64 (least squares when the system
    is not positive definite). With a zero prior: p = (X̃ᵀX̃ + λI)⁻¹X̃ᵀY."""
    g, n, _ = gram.shape
    weights = n - int(with_bias)
    diag = np.einsum("gii->gi", gram)[:, :weights]
    lam = ridge * diag.mean(axis=1) if weights else np.zeros(g)
    shrink = np.r_[np.ones(weights), np.zeros(n - weights)]
    reg = gram + lam[:, None, None] * np.diag(shrink)[None]
    rhs = cross if prior is None else \
        cross + lam[:, None, None] * shrink[None, :, None] * prior
    try:
        chol = np.linalg.cholesky(reg)
        half = np.linalg.solve(chol, rhs)
        return np.linalg.solve(chol.transpose(0, 2, 1), half)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(reg[i], rhs[i], rcond=None)[0] for i in range(g)])


# ============================================================================ layouts
def _bias_vector(layer: Layer) -> np.ndarray:
    return np.broadcast_to(as_float64(layer.bias.values).reshape(-1), (layer.outputs,))


def params(layer: Layer) -> np.ndarray:
    """The layer's weight (and bias) as a stack [G, inputs (+1), outputs]."""
    w = as_float64(layer.weight.values)
    if layer.kind == "depthwise":
        p = w.reshape(w.shape[0], -1)
        if layer.with_bias:
            p = np.concatenate([p, _bias_vector(layer)[:, None]], axis=1)
        return p[:, :, None]
    wmat = w.reshape(w.shape[0], -1).T if layer.kind == "conv" or layer.out_axis == 0 else w
    if layer.with_bias:
        wmat = np.vstack([wmat, _bias_vector(layer)[None, :]])
    return wmat[None]


def write(layer: Layer, p: np.ndarray) -> None:
    """Store the stack ``p`` (see ``params``) into the layer's own initializers, in
    their shapes and types."""
    shape, dtype = tuple(layer.weight.shape), layer.weight.values.dtype
    if layer.kind == "depthwise":
        wmat, bias = p[:, :-1, 0] if layer.with_bias else p[:, :, 0], p[:, -1, 0]
        value = wmat.reshape(shape)
    else:
        wmat = p[0, :-1] if layer.with_bias else p[0]
        bias = p[0, -1]
        value = wmat.T.reshape(shape) if layer.kind == "conv" or layer.out_axis == 0 \
            else wmat
    layer.weight.values = np.ascontiguousarray(value, dtype=dtype)
    if layer.with_bias:
        old = layer.bias.values
        layer.bias.values = np.ascontiguousarray(bias.reshape(old.shape), dtype=old.dtype)
