"""Variants of token calibration data for recovery (``graphopt.augment``): which inputs
vary, what a variant keeps, how the re-fit's ridge choice treats them, and that the
re-fit of a pruned MiniLM (real weights) generalizes better with them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import pytest

from graphopt.augment import token_inputs, variants
from graphopt.passes.recover.fit import RIDGE_GRID, Fit
from graphopt.passes.recover.layers import Layer
from tests import zoo
from tests.digits import digits_cnn

CLS, SEP = 101, 102


def embedding_model(cast: bool, rows: int = 100) -> onnx.ModelProto:
    """ids [N, S] -> (Cast) -> Gather of a [rows, 4] table; mask [N, S] multiplies."""
    table = oh.make_tensor("table", onnx.TensorProto.FLOAT, [rows, 4],
                           np.arange(rows * 4, dtype=np.float32).tolist())
    nodes = [oh.make_node("Cast", ["ids"], ["ids32"], to=onnx.TensorProto.INT32)] \
        if cast else []
    nodes += [oh.make_node("Gather", ["table", "ids32" if cast else "ids"], ["emb"]),
              oh.make_node("Cast", ["mask"], ["maskf"], to=onnx.TensorProto.FLOAT),
              oh.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
              oh.make_node("Mul", ["emb", "mask3"], ["y"])]
    graph = oh.make_graph(
        nodes, "g",
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", "S"]),
         oh.make_tensor_value_info("mask", onnx.TensorProto.INT64, ["N", "S"])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [table, oh.make_tensor("axes", onnx.TensorProto.INT64, [1], [2])])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_token_inputs_are_those_indexing_an_embedding_table():
    assert token_inputs(embedding_model(cast=False)) == ["ids"]
    assert token_inputs(embedding_model(cast=True)) == ["ids"]  # through a Cast
    assert token_inputs(embedding_model(cast=False, rows=8)) == []  # token types, not words
    assert token_inputs(zoo.bert_tiny()) == ["input_ids"]  # not the attention mask
    assert token_inputs(digits_cnn()) == []  # an image model: nothing varies


@pytest.fixture(scope="module")
def sentences_data() -> list[dict]:
    from tests.sentences import minilm_batches, sentences

    return minilm_batches(sentences(96, seed=5), 16)


def test_variants_keep_shapes_masks_and_structure_tokens(sentences_data):
    data = sentences_data
    out = variants(data, ["input_ids"], copies=3, seed=0)
    assert len(out) == 3 * len(data)
    vocabulary = set(np.concatenate([b["input_ids"].ravel() for b in data]).tolist())
    changed = total = spliced = 0
    for k, new in enumerate(out):
        old = data[k % len(data)]  # copy after copy, batch by batch
        assert new.keys() == old.keys()
        for name in old:
            assert new[name].shape == old[name].shape and new[name].dtype == old[name].dtype
        np.testing.assert_array_equal(new["attention_mask"], old["attention_mask"])
        ids = new["input_ids"]
        # [CLS] first and [SEP] last stay where they were; none is drawn elsewhere
        np.testing.assert_array_equal(ids[:, 0], old["input_ids"][:, 0])
        np.testing.assert_array_equal(ids[:, -1], old["input_ids"][:, -1])
        assert set(ids[:, 0]) == {CLS} and set(ids[:, -1]) == {SEP}
        assert not np.isin(ids[:, 1:-1], [CLS, SEP]).any()
        assert set(ids.ravel().tolist()) <= vocabulary  # drawn from the data's own tokens
        inner = old["input_ids"][:, 1:-1]
        changed += int((ids[:, 1:-1] != inner).sum())
        total += inner.size
        if len(ids) > 1:  # some rows took another row's tail
            spliced += int(any(not np.array_equal(ids[r], old["input_ids"][r])
                               for r in range(len(ids))))
    assert 0.1 < changed / total < 0.7, changed / total
    assert spliced > 0
    again = variants(data, ["input_ids"], copies=3, seed=0)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(out, again))
    other = variants(data, ["input_ids"], copies=3, seed=1)
    assert any(not np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(out, other))
    # replacement alone changes about the rate asked, and only ordinary tokens
    plain = variants(data, ["input_ids"], copies=4, seed=0, rate=0.2, splice=False)
    hits = sum(int((p["input_ids"] != data[k % len(data)]["input_ids"]).sum())
               for k, p in enumerate(plain))
    ordinary = 4 * sum(b["input_ids"][:, 1:-1].size for b in data)
    assert 0.12 < hits / ordinary < 0.2, hits / ordinary  # (a draw may repeat the token)
    assert variants(data, [], copies=3) == [] and variants(data, ["input_ids"], 0) == []


def test_with_the_embedding_table_tokens_become_their_neighbours(sentences_data):
    """Given the model's embedding table, a replaced token becomes one of its nearest
    tokens in that table (cosine; never itself, never [CLS] or [SEP]), at about
    ``NEAR_RATE`` of the ordinary tokens: MiniLM's own table here."""
    from graphopt.augment import NEAR_RATE, NEIGHBOURS, _frequencies, embedding_tables

    data = sentences_data
    tables = embedding_tables(zoo.bert_minilm())
    assert list(tables) == ["input_ids"] and tables["input_ids"].shape == (30522, 384)
    table = tables["input_ids"]
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    structure = _frequencies([b["input_ids"] for b in data])[2]  # [CLS], [SEP], ...
    assert {CLS, SEP} <= set(structure.tolist())
    out = variants(data, ["input_ids"], copies=2, seed=0, splice=False, tables=tables)
    hits = ordinary = 0
    for k, new in enumerate(out):
        old = data[k % len(data)]["input_ids"]
        ordinary += old[:, 1:-1].size
        for before, after in zip(old[new["input_ids"] != old],
                                 new["input_ids"][new["input_ids"] != old]):
            hits += 1
            assert after != before and after not in structure
            sim = unit[before] @ unit.T
            sim[before] = sim[structure] = -np.inf
            assert sim[after] >= np.sort(sim)[-NEIGHBOURS] - 1e-6  # among the nearest
    assert abs(hits / ordinary - NEAR_RATE) < 0.08, hits / ordinary


def test_padding_is_structure_too():
    ids = np.array([[CLS, 7, 8, 9, SEP, 0, 0], [CLS, 5, 6, SEP, 0, 0, 0],
                    [CLS, 4, 3, 2, 1, 10, SEP], [CLS, 11, 12, SEP, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    out = variants([{"ids": ids, "mask": mask}], ["ids"], copies=20, seed=0, rate=0.9,
                   splice=False)
    for new in out:
        np.testing.assert_array_equal(new["ids"] == 0, ids == 0)  # pads stay, none drawn
        np.testing.assert_array_equal(new["mask"], mask)
        assert ((new["ids"] != ids) & (ids != 0)).any()


def test_ridge_choice_leaves_variants_of_held_out_batches_out():
    """A batch set aside (a variant of a scoring batch) joins the final fit but not the
    fits the ridge strengths are scored by: the choice is that of the data without it."""
    rng = np.random.default_rng(0)
    w = 0.2 * rng.standard_normal((12, 3))  # noisy targets: a strong ridge predicts best
    batches = []
    for _ in range(4):
        x = rng.standard_normal((30, 12))
        batches.append((x, x @ w + rng.standard_normal((30, 3))))
    x_t, y_t = gs.Variable("x", np.float32), gs.Variable("y", np.float32)
    weight = gs.Constant("w", np.zeros((12, 3), np.float32))
    node = gs.Node("MatMul", "mm", inputs=[x_t, weight], outputs=[y_t])
    layer = Layer(node, "matmul", x_t, y_t, weight, None)

    def fitted(extra: tuple | None = None, aside: bool = True) -> Fit:
        fit = Fit(layer)
        for i, (x, y) in enumerate(batches):
            fit.add(x, y, held=i == 1)
        if extra is not None:
            fit.add(*extra, aside=aside)
        return fit

    # the held-out batch's own rows, nearly: fitted, they make the least ridge look best
    x1, y1 = batches[1]
    leak = (x1 + 1e-3 * rng.standard_normal(x1.shape), y1)
    without, with_aside = fitted(), fitted(leak)
    assert with_aside.rows == without.rows + 30 and with_aside.aside[3] == 30
    chosen = without.choose_ridge(False, None)
    assert chosen in RIDGE_GRID and chosen > RIDGE_GRID[0]
    assert with_aside.choose_ridge(False, None) == chosen
    assert fitted(leak, aside=False).choose_ridge(False, None) == RIDGE_GRID[0]


def test_augmented_refit_of_a_pruned_minilm_generalizes_better():
    """all-MiniLM-L6-v2 (real weights), 40% of every FFN pruned, re-fitted on 64
    sentences: with four variants of each batch fitted too, the embeddings of 128 unseen
    sentences are closer to the original's than with the real batches alone."""
    import graphopt
    from graphopt import verify
    from graphopt.registry import pass_registry
    from graphopt.targets.ort import LOSSLESS_PIPELINE
    from tests import corpus
    from tests.sentences import minilm_batches

    registry = pass_registry()
    cleanup = [n for n in LOSSLESS_PIPELINE if registry.get(n).family == "cleanup"]
    cal_s, test_s = corpus.split(64, 128, seed=2)
    cal, test = minilm_batches(cal_s, 16), minilm_batches(test_s, 32)
    proto = zoo.bert_minilm()

    def embeddings(model: onnx.ModelProto) -> np.ndarray:
        sess = verify.session(model)
        return np.concatenate([verify.run(sess, b)["sentence_embedding"] for b in test])

    want = embeddings(proto)
    scores = {}
    for copies in (0, 4):
        result = graphopt.optimize(proto, passes=[*cleanup, registry.get("prune-ffn")(
            ratio=0.4)], calibration=cal, recovery=f"recover(augment={copies})",
            tolerance=0.01, metric="mean-cosine", goal="flops")
        got = embeddings(result.model.to_onnx())
        scores[copies] = float(((got * want).sum(1) / np.linalg.norm(got, axis=1)
                                / np.linalg.norm(want, axis=1)).mean())
        recovery = result.report["compression"]["passes"]["prune-ffn"]["recovery"]
        made = recovery.get("augmented_batches", 0)  # four of each batch it fitted
        assert (made > 0 and made % 4 == 0) if copies else made == 0, made
    print(scores)
    assert scores[4] > scores[0] + 0.003, scores
