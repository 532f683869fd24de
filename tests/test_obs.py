"""The structured OBS / least-squares re-fit behind prune-ffn and prune-heads
(``passes/prune/_obs.py``), checked against numpy's own least squares."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.capture import ChannelStats
from graphopt.passes.prune import _obs
from graphopt.passes.prune._blocks import top


def problem(rows=3000, inputs=24, outputs=8, seed=0):
    """Correlated inputs with a mean, a linear layer with a bias, and their statistics."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, inputs)) @ (np.eye(inputs) + 0.4 * rng.standard_normal(
        (inputs, inputs))) + rng.standard_normal(inputs)
    w, b = rng.standard_normal((inputs, outputs)), rng.standard_normal(outputs)
    stats = ChannelStats(axis=-1, gram_wanted=True)
    for part in np.array_split(x, 3):  # streamed in batches
        stats.update(part)
    return x, w, b, stats


def test_refit_is_the_least_squares_solution():
    x, w, b, stats = problem()
    h = _obs.augmented_gram(stats)
    kept = np.array([0, 3, 4, 9, 15, 20])
    got_w, got_b = _obs.refit(h, w, b, kept, damp=0.0)
    design = np.concatenate([x[:, kept], np.ones((len(x), 1))], axis=1)
    want = np.linalg.lstsq(design, x @ w + b, rcond=None)[0]
    np.testing.assert_allclose(got_w, want[:-1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got_b, want[-1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_the_gate_is_the_refit(damp):
    """x·M + offset through the unchanged layer equals the re-fitted narrow layer, for
    any damping (what the search measures is what apply writes)."""
    x, w, b, stats = problem()
    h = _obs.augmented_gram(stats)
    kept = np.array([1, 2, 5, 8, 13])
    m, offset = _obs.gate(h, kept, damp)
    new_w, new_b = _obs.refit(h, w, b, kept, damp)
    np.testing.assert_allclose((x @ m + offset) @ w + b, x[:, kept] @ new_w + new_b,
                               rtol=1e-9, atol=1e-9)


def test_removal_order_knows_about_the_refit():
    """Input 5 duplicates input 2, both with the largest weight rows of all: a magnitude or
    Wanda score keeps both, OBS removes one of them first (the other carries it), and
    a dead input (weight row 0) goes early too."""
    x, w, b, _ = problem()
    x[:, 5] = x[:, 2]
    norms = np.linalg.norm(w, axis=1)
    w[5] = w[2] = 1.5 * norms.max() * w[2] / norms[2]
    w[7] = 0.0
    stats = ChannelStats(axis=-1, gram_wanted=True)
    stats.update(x)
    order = _obs.removal_order(_obs.augmented_gram(stats), w, b)
    assert sorted(order) == list(range(24))
    assert order[0] == 7 and {2, 5} & set(order[:3]), order
    wanda = np.linalg.norm(x, axis=0) * np.linalg.norm(w, axis=1)
    assert {2, 5} <= set(top(wanda, 4))


def test_obs_order_beats_wanda_with_the_same_refit():
    x, w, b, stats = problem(seed=3)
    h = _obs.augmented_gram(stats)
    y = x @ w + b
    scores = {"obs": _obs.ranking(_obs.removal_order(h, w, b)),
              "wanda": np.linalg.norm(x, axis=0) * np.linalg.norm(w, axis=1)}
    for count in (16, 8):
        errors = {}
        for name, s in scores.items():
            kept = top(s, count)
            nw, nb = _obs.refit(h, w, b, kept)
            errors[name] = np.mean((x[:, kept] @ nw + nb - y) ** 2)
        assert errors["obs"] < errors["wanda"], (count, errors)


def test_groups_are_removed_whole():
    x, w, b, stats = problem(inputs=24)
    order = _obs.removal_order(_obs.augmented_gram(stats), w, b, group=6)
    assert sorted(order) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="groups of 5"):
        _obs.removal_order(_obs.augmented_gram(stats), w, b, group=5)


def test_too_few_rows_for_a_refit():
    _, _, _, stats = problem(rows=90, inputs=24)  # 90 < 4 x 25
    assert not _obs.enough(stats)
    assert _obs.enough(problem(rows=100, inputs=24)[3])
