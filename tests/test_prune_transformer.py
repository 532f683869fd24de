"""prune-heads and prune-ffn on a BERT exported by torch (2 layers, 4 heads of 16, FFN
256): blocks found in the exported (decomposed) and the ORT-fused forms, refusals that
name the node, exact parameter savings, valid graphs at any batch and sequence length,
importance that beats the worst choice, bias compensation, the gate simulation equal to
the pruned model, both forms pruned alike, and the passes through the budgeted-compression
core.

BertModel initializes every linear bias to zero and the cleanup drops those Adds, so the
bias paths (Q/K/V bias columns, the packed Attention bias, b1, BiasGelu's bias, an
existing output bias compensated) are tested on ``biased``: the same export with a random
bias on every linear and its encoder weights scaled up (so heads and neurons matter)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

import graphopt
from graphopt import verify
from graphopt.compression_driver import least_damage
from graphopt.errors import UsageError
from graphopt.ir import Model, infer_shapes
from graphopt.pass_infra import PassContext
from graphopt.passes.prune._attention import find_attention_blocks, shape_tail
from graphopt.passes.prune._blocks import find_ffn_blocks, top
from graphopt.passes.prune._gates import output_error
from graphopt.passes.prune.ffn import PruneFfn
from graphopt.passes.prune.heads import PruneHeads
from graphopt.registry import pass_registry
from graphopt.targets.ort import LOSSLESS_PIPELINE, OrtTarget
from tests import zoo
from tests.helpers import bert_token_feeds, min_cosine

HIDDEN, HEADS, HEAD_SIZE, FFN, LAYERS = 64, 4, 16, 256, 2
VOCAB = zoo.BERT_TINY_VOCAB
PASSES = {"heads": PruneHeads, "ffn": PruneFfn}


def calibration():
    return bert_token_feeds(VOCAB, count=6, batch=4, sequence=16, seed=1)


def held_out():
    """Other tokens and other batch sizes and lengths than the calibration."""
    return bert_token_feeds(VOCAB, count=2, batch=3, sequence=11, seed=2) + \
        bert_token_feeds(VOCAB, count=1, batch=1, sequence=23, seed=3)


def cleanup_passes() -> list[str]:
    registry = pass_registry()
    return [n for n in LOSSLESS_PIPELINE if registry.get(n).family == "cleanup"]


def stage(passes, proto=None) -> onnx.ModelProto:
    """bert_tiny (or ``proto``) after ``passes`` (lossless), as the compression passes
    see it."""
    proto = zoo.bert_tiny() if proto is None else proto
    return graphopt.optimize(proto, passes=list(passes)).model.to_onnx()


def with_biases(proto: onnx.ModelProto, scale: float = 4.0) -> onnx.ModelProto:
    """The torchscript export with its own random bias on every encoder linear (the
    export shares one zero vector among them) and the encoder weights times ``scale``."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    rng = np.random.default_rng(0)
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    weights = {i.name: i for i in graph.initializer}
    biases = 0
    for node in graph.node:
        if node.op_type != "Add" or "/encoder/" not in node.name:
            continue
        for k, name in enumerate(node.input):
            matmul = producer.get(name)
            transpose = producer.get(matmul.input[1]) if matmul is not None and \
                matmul.op_type == "MatMul" else None
            if transpose is None or transpose.op_type != "Transpose":
                continue
            width = weights[transpose.input[0]].dims[0]  # torch weights are [out, in]
            bias = f"{node.name.strip('/').replace('/', '.')}.random_bias"
            graph.initializer.append(numpy_helper.from_array(
                (rng.standard_normal(width) * 0.1).astype(np.float32), bias))
            node.input[1 - k] = bias
            biases += 1
            break
    assert biases == 6 * LAYERS  # Q, K, V, output, FFN up and down of every layer
    for init in graph.initializer:
        if "encoder" in init.name and init.name.endswith(".weight") and len(init.dims) == 2:
            init.CopyFrom(numpy_helper.from_array(
                (numpy_helper.to_array(init) * scale).astype(np.float32), init.name))
    onnx.checker.check_model(proto)
    return proto


@pytest.fixture(scope="module")
def forms() -> dict[str, onnx.ModelProto]:
    return {"decomposed": stage(cleanup_passes()), "fused": stage(LOSSLESS_PIPELINE)}


@pytest.fixture(scope="module")
def biased() -> dict[str, onnx.ModelProto]:
    raw = with_biases(zoo.bert_tiny())
    return {"decomposed": stage(cleanup_passes(), raw), "fused": stage(LOSSLESS_PIPELINE, raw)}


def context(calib=None) -> PassContext:
    target = OrtTarget()
    return PassContext(target=target, device=target.device, calibration=calib)


def matrix_params(proto) -> int:
    """Elements of the 2-D constants (the weights; biases and shapes excluded)."""
    model = Model.from_proto(proto)
    return sum(int(np.prod(t.shape)) for t in model.graph.tensors().values()
               if isinstance(t, gs.Constant) and len(t.shape) == 2)


def float_params(proto) -> int:
    """Elements of the floating-point constants (weights and biases; shape targets,
    which pruning may copy when they are shared, excluded)."""
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))


def outputs(proto, feeds) -> list[dict]:
    sess = verify.session(proto)
    return [verify.run(sess, f) for f in feeds]


def prune(proto, p, count_of=lambda site: site.settings[-1], calib=None):
    """(pruned proto, Applied, sites) with every site at ``count_of(site)``; the result
    passes the full ONNX checker and strict shape inference."""
    model = Model.from_proto(proto)
    ctx = context(calibration() if calib is None else calib)
    ctx.reference = proto
    sites = p.sites(model, ctx)
    applied = p.apply(model, {s.name: count_of(s) for s in sites if s.refused is None}, ctx)
    out = model.to_onnx()
    onnx.checker.check_model(out, full_check=True)
    infer_shapes(out, strict=True)
    return out, applied, sites


def half(site) -> int:
    """The setting that removes half of a site's heads or neurons."""
    return site.size // 2


# ============================================================================ blocks
@pytest.mark.parametrize("form", ["decomposed", "fused"])
def test_every_layer_has_an_attention_and_an_ffn_block(forms, biased, form):
    for proto in (forms[form], biased[form]):
        graph = Model.from_proto(proto).graph
        blocks = find_attention_blocks(graph)
        assert len(blocks) == LAYERS and all(b.reason is None for b in blocks), \
            [b.reason for b in blocks]
        assert {(b.kind, b.heads, b.head_size) for b in blocks} == \
            {("fused" if form == "fused" else "decomposed", HEADS, HEAD_SIZE)}
        ffn = find_ffn_blocks(graph)
        assert len(ffn) == LAYERS and all(b.reason is None for b in ffn), \
            [b.reason for b in ffn]
        assert {b.width for b in ffn} == {FFN}
        assert all(b.down.weight.shape == (FFN, HIDDEN) for b in ffn)
    # The GELU in each form: Erf decomposed; Gelu fused, BiasGelu (with b1) when biased.
    ops = {n.op for b in find_ffn_blocks(Model.from_proto(biased[form]).graph)
           for n in b.region.nodes}
    assert ({"Erf"} if form == "decomposed" else {"BiasGelu"}) <= ops, ops
    if form == "fused":
        attention = [n for n in Model.from_proto(biased[form]).graph.nodes
                     if n.op == "Attention"]
        assert len(attention) == LAYERS and all(n.inputs[2].name for n in attention)


def test_unexplained_attention_is_refused_with_the_node(forms):
    """A query projection whose weight is computed (not a constant): the heads cannot be
    cut there, and the block is listed as refused, its reason naming its nodes."""
    model = Model.from_proto(forms["decomposed"])
    graph = model.graph
    first = find_attention_blocks(graph)[0]
    query = first.projections[0].node
    weight = query.inputs[1]
    doubled = gs.Variable(weight.name + "_computed", dtype=np.float32)
    graph.nodes.append(gs.Node("Add", name="compute_weight", inputs=[weight, weight],
                               outputs=[doubled]))
    query.inputs[1] = doubled
    graph.toposort()
    blocks = find_attention_blocks(graph)
    refused = [b for b in blocks if b.reason]
    assert len(blocks) == LAYERS and len(refused) == 1, [b.reason for b in blocks]
    reason = refused[0].reason
    assert "projections" in reason and f"Softmax node {first.anchor!r}" in reason, reason
    assert all(repr(split.name) in reason for split in first.splits[1:]), reason  # K, V
    p = PruneHeads(importance="norm")
    sites = p.sites(model, context())
    assert [s.refused for s in sites if s.refused] == [reason]
    with pytest.raises(ValueError, match="cannot be pruned"):
        p.apply(model, {refused[0].name: 2}, context())


def test_unexplained_ffn_is_refused_with_the_node(forms):
    """The GELU output of layer 0 also read by a Flatten (which mixes the neurons with
    the sequence): that block is refused naming the Flatten, layer 1 still prunes."""
    model = Model.from_proto(forms["decomposed"])
    graph = model.graph
    first = find_ffn_blocks(graph)[0]
    act = first.activation
    flat = gs.Variable("ffn_probe_out", dtype=np.float32, shape=["batch", "flat"])
    graph.nodes.append(gs.Node("Flatten", name="ffn_probe", attrs={"axis": 1},
                               inputs=[act], outputs=[flat]))
    graph.outputs.append(flat)
    graph.toposort()
    blocks = find_ffn_blocks(graph)
    refused = [b for b in blocks if b.reason]
    assert len(blocks) == LAYERS and [b.name for b in refused] == [first.name]
    assert "Flatten node 'ffn_probe'" in refused[0].reason, refused[0].reason
    p = PruneFfn(ratio=0.5)
    ctx = context(calibration()[:2])
    sites = p.sites(model, ctx)
    assert {s.name: s.refused for s in sites if s.refused} == {first.name: refused[0].reason}
    with pytest.raises(ValueError, match="cannot be pruned"):
        p.apply(model, {first.name: 128}, ctx)
    free = [s for s in sites if s.refused is None]
    p.apply(model, p.fixed_choice(free), ctx)
    out = model.to_onnx()
    onnx.checker.check_model(out, full_check=True)
    got = outputs(out, held_out())
    assert [g["ffn_probe_out"].shape[1] for g in got] == [11 * FFN] * 2 + [23 * FFN]


def test_dynamo_export():
    """torch.export writes K transposed through [B·H, S, D] and a head-count Reshape the
    decomposed matcher does not follow: those blocks are refused naming their Softmax
    (never cut wrong), the FFNs are found; ORT's fusion makes Attention nodes, which
    prune like the torchscript ones."""
    raw = zoo.bert_tiny("dynamo")
    decomposed = Model.from_proto(stage(cleanup_passes(), raw)).graph
    attention = find_attention_blocks(decomposed)
    assert len(attention) == LAYERS
    assert all(b.reason and "Softmax node '" in b.reason for b in attention), \
        [b.reason for b in attention]
    assert [b.reason for b in find_ffn_blocks(decomposed)] == [None] * LAYERS
    fused = stage(LOSSLESS_PIPELINE, raw)
    blocks = find_attention_blocks(Model.from_proto(fused).graph)
    assert [(b.kind, b.heads, b.reason) for b in blocks] == [("fused", HEADS, None)] * LAYERS
    out, applied, _ = prune(fused, PruneHeads(importance="norm"), half)
    assert matrix_params(fused) - matrix_params(out) == LAYERS * 4 * HIDDEN * HEAD_SIZE * 2
    assert min_cosine(outputs(fused, held_out()), outputs(out, held_out())) > 0.99


# ============================================================================ ratio 0
@pytest.mark.parametrize("form", ["decomposed", "fused"])
@pytest.mark.parametrize("kind", ["heads", "ffn"])
def test_ratio_zero_changes_nothing(forms, form, kind):
    proto = forms[form]
    p = PASSES[kind](ratio=0.0, max_batches=2)
    model = Model.from_proto(proto)
    ctx = context(calibration())
    sites = p.sites(model, ctx)
    choice = p.fixed_choice(sites)
    assert choice == {s.name: s.size for s in sites} and len(choice) == LAYERS
    assert all(s.settings[0] == s.size for s in sites)
    applied = p.apply(model, choice, ctx)
    assert not applied.kept and set(applied.stats) == {"importance"}
    for a, b in zip(outputs(proto, held_out()), outputs(model.to_onnx(), held_out())):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], atol=1e-5)


# ============================================================================ heads
@pytest.mark.parametrize("form", ["decomposed", "fused"])
def test_half_the_heads_saves_exactly_their_weights(forms, biased, form):
    gone = HEADS // 2 * HEAD_SIZE
    # Plain: Q, K, V columns and O rows; compensation gives O (bias-free) a new bias.
    proto = forms[form]
    out, applied, sites = prune(proto, PruneHeads(importance="norm"), half)
    assert matrix_params(proto) - matrix_params(out) == LAYERS * 4 * HIDDEN * gone
    assert float_params(proto) - float_params(out) == LAYERS * (4 * HIDDEN * gone - HIDDEN)
    # Biased: the Q, K, V bias entries go too; O's existing bias absorbs compensation.
    proto = biased[form]
    out, applied, sites = prune(proto, PruneHeads(importance="ablation", ablation_batches=1,
                                                  max_batches=3), half)
    assert float_params(proto) - float_params(out) == LAYERS * (4 * HIDDEN * gone + 3 * gone)
    assert all(applied.stats[s.name]["kept"] == HEADS // 2 and
               len(applied.stats[s.name]["kept_heads"]) == HEADS // 2 for s in sites)
    graph = Model.from_proto(out).graph
    blocks = find_attention_blocks(graph)
    assert [(b.heads, b.head_size, b.reason) for b in blocks] == \
        [(HEADS // 2, HEAD_SIZE, None)] * LAYERS
    if form == "fused":
        for node in (n for n in graph.nodes if n.op == "Attention"):
            assert node.attrs["num_heads"] == HEADS // 2
            assert tuple(node.inputs[1].shape) == (HIDDEN, 3 * gone)
            assert tuple(node.inputs[2].shape) == (3 * gone,)
    else:  # the Reshape targets: [.., 4, 16] -> [.., 2, 16], [.., 64] -> [.., 32]
        for b in blocks:
            assert [[v for v, _ in shape_tail(s, 2)] for s in b.splits] == \
                [[HEADS // 2, HEAD_SIZE]] * 3
            assert [v for v, _ in shape_tail(b.merge, 1)] == [gone]
    ref, got = outputs(proto, held_out()), outputs(out, held_out())
    assert [g["last_hidden_state"].shape for g in got] == [(3, 11, HIDDEN)] * 2 + \
        [(1, 23, HIDDEN)]
    assert min_cosine(ref, got) > 0.98, min_cosine(ref, got)


def gate_scores(proto, p, calib):
    """(pass context, sites, held-out data, score, what damages() scores) for ``p``."""
    model = Model.from_proto(proto)
    ctx = context(calib)
    ctx.reference = proto
    sites = p.sites(model, ctx)
    data = held_out()
    ref = outputs(proto, data)

    def score(outs):
        return -output_error(ref, outs)

    return ctx, sites, data, score, p.damages(model, sites, data, score)


def test_the_gate_simulation_is_the_pruned_model_plain(forms):
    """damages() scores each setting by gating heads off in one session: that must be
    what pruning them gives (bias-free model: the re-fit adds an output bias)."""
    proto = forms["decomposed"]
    _, sites, data, score, simulated = gate_scores(proto, PruneHeads(importance="norm"),
                                                   calibration())
    site = sites[0]
    out, _, _ = prune(proto, PruneHeads(importance="norm"),
                      lambda s: site.settings[-1] if s.name == site.name else s.settings[0])
    assert simulated[(site.name, site.settings[-1])] == \
        pytest.approx(score(outputs(out, data)), abs=1e-4)


@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("form", ["decomposed", "fused"])
@pytest.mark.parametrize("kind", ["heads", "ffn"])
def test_the_gate_simulation_is_the_pruned_model(biased, form, kind, update):
    """Every (site, setting) damages() scores by its gated runs is the score of
    the model pruned there: with the re-fit (a matrix gate, 1152 calibration tokens: 4
    per FFN input) and with mean compensation (the offset is the bias it adds)."""
    proto = biased[form]
    options = {"importance": "norm"} if kind == "heads" else {}
    p = PASSES[kind](update=update, **options)
    calib = bert_token_feeds(VOCAB, count=9, batch=8, sequence=16, seed=1)
    ctx, sites, data, score, simulated = gate_scores(proto, p, calib)
    assert bool(p._grams) == update
    assert set(simulated) == {(s.name, c) for s in sites for c in s.settings[1:]}
    assert min(simulated.values()) < -1e-3  # the settings do change the outputs
    for site in sites:
        for count in site.settings[1:]:
            pruned = Model.from_proto(proto)
            p.apply(pruned, {site.name: count}, ctx)
            assert simulated[(site.name, count)] == \
                pytest.approx(score(outputs(pruned.to_onnx(), data)), abs=1e-4), \
                (site.name, count)


def test_each_setting_runs_only_the_model_below_its_site(biased):
    """PointRunner: a gated point runs the part of the model downstream of it, from the
    values one run of the whole model left at its boundary, and gives what the whole
    model gated there gives (checked against a gate written into the full graph)."""
    import onnx_graphsurgeon as gs

    from graphopt.passes.prune._gates import PointRunner

    model = Model.from_proto(biased["decomposed"])
    blocks = find_ffn_blocks(model.graph)
    points = {b.down.node.name: f"ffn{i}" for i, b in enumerate(blocks)}
    data = held_out()
    runner = PointRunner(model, points, data, matrix=True)
    total = len(model.graph.nodes)
    sizes = [runner.nodes[p] for p in points.values()]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < total / 2, (sizes, total)
    rng = np.random.default_rng(0)
    for b, point in zip(blocks, points.values()):
        width = b.width
        mask = np.eye(width, dtype=np.float32) * (rng.random(width) < 0.5)
        offset = rng.standard_normal(width).astype(np.float32) * 0.1
        full = Model.from_proto(biased["decomposed"])
        node = next(n for n in full.graph.nodes if n.name == b.down.node.name)
        x = node.inputs[0]
        gated = gs.Variable("x_gated", np.float32, None)
        shifted = gs.Variable("x_shifted", np.float32, None)
        full.graph.nodes += [gs.Node("MatMul", inputs=[x, gs.Constant("m", mask)],
                                     outputs=[gated]),
                             gs.Node("Add", inputs=[gated, gs.Constant("o", offset)],
                                     outputs=[shifted])]
        node.inputs[0] = shifted
        want = outputs(full.to_onnx(), data)
        got = runner.run({point: (mask, offset)})
        assert output_error(want, got) < 1e-10
        assert output_error(runner.reference, got) > 1e-4  # the gate does change them


@pytest.mark.parametrize("kind", ["heads", "ffn"])
def test_with_recovery_the_search_ranks_by_gates_only_with_the_refit(biased, kind):
    """Under recovery the core would build and recover every (site, setting) alone;
    with the re-fit the gated session already scores each site re-fitted, so it is used
    (without the re-fit, the unrecovered gate would rank wrongly: no scores)."""
    proto = biased["fused"]
    calib = bert_token_feeds(VOCAB, count=9, batch=8, sequence=16, seed=1)  # 4 rows/input
    for update, expected in ((True, True), (False, False)):
        p = PASSES[kind](update=update, **({"importance": "norm"} if kind == "heads"
                                           else {}))
        model = Model.from_proto(proto)
        ctx = context(calib)
        ctx.reference = proto
        ctx.recovery = pass_registry().get("recover")()
        sites = p.sites(model, ctx)
        got = p.damages(model, sites, held_out(), lambda outs: 0.0)
        assert (got is not None) == expected, (update, got)


def test_importance_beats_the_worst_heads():
    """On MiniLM's real weights (bert_tiny's random heads barely matter): half of every
    layer's heads, the least important by the pass against the most important."""
    from tests.sentences import minilm_batches, sentences

    proto = stage(cleanup_passes(), zoo.bert_minilm())
    calib = minilm_batches(sentences(64, seed=3), 16)
    data = minilm_batches(sentences(32, seed=4), 16)
    ref = outputs(proto, data)
    errors = []
    for invert in (False, True):
        p = PruneHeads(importance="norm")
        model = Model.from_proto(proto)
        ctx = context(calib)
        sites = [s for s in p.sites(model, ctx) if s.refused is None]
        assert len(sites) == 6
        if invert:
            p._scores = {k: -v for k, v in p._scores.items()}
        p.apply(model, {s.name: 6 for s in sites}, ctx)
        errors.append(output_error(ref, outputs(model.to_onnx(), data)))
    assert errors[0] < 0.5 * errors[1], errors


@pytest.mark.parametrize("kind", ["heads", "ffn"])
def test_decomposed_and_fused_prune_the_same_units_to_the_same_outputs(biased, kind):
    data = held_out()
    results = {}
    for form, proto in biased.items():
        p = PASSES[kind](max_batches=3, **({"importance": "norm"} if kind == "heads" else {}))
        out, _, sites = prune(proto, p, half)
        kept = {s.name: top(p._scores[s.name], s.size // 2).tolist() for s in sites}
        results[form] = (kept, outputs(out, data))
    assert len(results["decomposed"][0]) == LAYERS
    assert results["decomposed"][0] == results["fused"][0]
    for a, b in zip(results["decomposed"][1], results["fused"][1]):
        np.testing.assert_allclose(a["last_hidden_state"], b["last_hidden_state"],
                                   atol=2e-4)


# ============================================================================ ffn
@pytest.mark.parametrize("form", ["decomposed", "fused"])
def test_half_the_ffn_saves_exactly_its_neurons(forms, biased, form):
    gone = FFN // 2
    proto = forms[form]  # plain: W1 columns, W2 rows; W2 (bias-free) gets a bias
    p = PruneFfn(ratio=0.5)
    out, applied, sites = prune(proto, p, lambda s: p.fixed_choice([s])[s.name])
    assert matrix_params(proto) - matrix_params(out) == LAYERS * 2 * HIDDEN * gone
    assert float_params(proto) - float_params(out) == LAYERS * (2 * HIDDEN * gone - HIDDEN)
    proto = biased[form]  # biased: b1 (an Add, or BiasGelu's bias) loses its entries too
    p = PruneFfn(ratio=0.5, max_batches=3)
    out, applied, sites = prune(proto, p, lambda s: p.fixed_choice([s])[s.name])
    assert float_params(proto) - float_params(out) == LAYERS * (2 * HIDDEN * gone + gone)
    assert {applied.stats[s.name]["kept"] for s in sites} == {gone}
    blocks = find_ffn_blocks(Model.from_proto(out).graph)
    assert [(b.width, b.reason) for b in blocks] == [(gone, None)] * LAYERS
    ref, got = outputs(proto, held_out()), outputs(out, held_out())
    assert [g["last_hidden_state"].shape for g in got] == [(3, 11, HIDDEN)] * 2 + \
        [(1, 23, HIDDEN)]
    assert min_cosine(ref, got) > 0.95, min_cosine(ref, got)


def test_ffn_importance_beats_the_worst_neurons(biased):
    """Half of every FFN: the neurons each importance keeps against those it drops."""
    proto, data = biased["fused"], held_out()
    ref = outputs(proto, data)
    for importance in ("wanda", "fluctuation", "magnitude"):
        errors = []
        for invert in (False, True):
            p = PruneFfn(importance=importance, update=False, compensate=False,
                         max_batches=3)
            model = Model.from_proto(proto)
            ctx = context(calibration())
            sites = p.sites(model, ctx)
            if invert:
                p._scores = {k: -v for k, v in p._scores.items()}
            p.apply(model, {s.name: FFN // 2 for s in sites}, ctx)
            errors.append(output_error(ref, outputs(model.to_onnx(), data)))
        margin = 0.8 if importance == "magnitude" else 0.5  # weights only: weaker
        assert errors[0] < margin * errors[1], (importance, errors)


@pytest.mark.parametrize("form", ["decomposed", "fused"])
@pytest.mark.parametrize("kind", ["heads", "ffn"])
def test_compensation_lowers_the_error(forms, biased, form, kind):
    """On held-out data (other tokens and shapes than the calibration), with the same
    units removed: the bias that replaces their mean contribution lowers the error."""
    data = held_out()
    for proto, factor in ((forms[form], 1.0), (biased[form], 0.5 if kind == "heads" else 1)):
        ref = outputs(proto, data)
        errors = {}
        for compensate in (False, True):
            options = {"importance": "norm" if kind == "heads" else "wanda",
                       "update": False}
            p = PASSES[kind](compensate=compensate, max_batches=3, **options)
            out, _, _ = prune(proto, p, half)
            errors[compensate] = output_error(ref, outputs(out, data))
        assert errors[True] < factor * errors[False], errors


@pytest.mark.parametrize("form", ["decomposed", "fused"])
def test_ffn_refit_and_obs_lower_the_error(biased, form):
    """On held-out data, a quarter of every FFN removed: re-fitting the down projection
    from the Gram matrix beats the mean compensation for the same neurons, and the OBS
    ranking (which knows about the re-fit) beats Wanda's with the same re-fit (2048
    calibration tokens for the 257 unknowns per output)."""
    proto, data = biased[form], held_out()
    calib = bert_token_feeds(VOCAB, count=16, batch=8, sequence=16, seed=1)
    ref = outputs(proto, data)
    errors = {}
    for key, options in {"mean": {"importance": "wanda", "update": False},
                         "refit": {"importance": "wanda"},
                         "obs": {"importance": "obs"}}.items():
        out, applied, _ = prune(proto, PruneFfn(max_batches=16, **options),
                                lambda s: s.size * 3 // 4, calib)
        onnx.checker.check_model(out, full_check=True)
        errors[key] = output_error(ref, outputs(out, data))
    assert errors["refit"] < 0.8 * errors["mean"], errors
    assert errors["obs"] < 0.95 * errors["refit"], errors


# ============================================================================ data
def test_without_calibration_data_importance_is_from_weights(biased):
    proto = biased["fused"]
    for p, method in ((PruneHeads(), "weights"), (PruneFfn(), "magnitude")):
        model = Model.from_proto(proto)
        sites = p.sites(model, context())
        applied = p.apply(model, {s.name: s.size // 2 for s in sites}, context())
        assert applied.stats["importance"] == method
        out = model.to_onnx()
        onnx.checker.check_model(out, full_check=True)
        assert min_cosine(outputs(proto, held_out()), outputs(out, held_out())) > 0.9


def test_settings_follow_the_ratios(forms):
    model = Model.from_proto(forms["decomposed"])
    heads = PruneHeads().sites(model, context())
    assert [s.settings for s in heads] == [(4, 3, 2, 1)] * LAYERS
    ffn = PruneFfn().sites(model, context())
    assert [s.settings for s in ffn] == [(256, 224, 192, 160, 128, 96, 64)] * LAYERS
    ffn = PruneFfn(ratios=(0.3,), multiple=0).sites(model, context())
    assert [s.settings for s in ffn] == [(256, 179)] * LAYERS
    p = PruneFfn(ratio=0.3)
    assert p.fixed_choice(ffn) == {s.name: 176 for s in ffn}  # rounded to 16
    assert PruneHeads(ratio=0.9).fixed_choice(heads) == {s.name: 1 for s in heads}
    assert PruneHeads().fixed_choice(heads) is None  # no ratio: searched


# ============================================================================ core
@pytest.mark.parametrize("goal", ["flops", "latency"])
def test_searched_heads_and_ffn_meet_the_budget_through_the_core(goal):
    """With goal latency too: at the cost model's one-token shapes a mild setting may
    save nothing (a compensation bias added costs more than what is cut), which must not
    keep the stronger settings, which do save, from being chosen (it did: unchanged)."""
    cleanup = cleanup_passes()
    rest = [n for n in LOSSLESS_PIPELINE if n not in cleanup]
    proto = zoo.bert_tiny()
    validation = held_out()
    result = graphopt.optimize(
        proto, passes=[*cleanup, PruneHeads(ablation_batches=1), PruneFfn(), *rest],
        calibration=calibration(), validation=validation, metric="mean-cosine",
        tolerance=0.97, recovery=None, goal=goal)
    section = result.report["compression"]["passes"]
    assert list(section) == ["prune-heads+prune-ffn"]
    joint = section["prune-heads+prune-ffn"]
    assert joint["status"] == "changed" and joint["score"] >= 0.97
    assert joint["mode"] == "searched" and joint["refused"] == {}
    assert len(joint["sites"]) == 2 * LAYERS
    changed = {k: v for k, v in joint["sites"].items() if v["changed"]}
    assert changed and all(v["setting"] < v["size"] for v in changed.values())
    for name, site in changed.items():  # each changed site is in its pass's stats
        part, _, block = name.partition(":")
        assert joint["applied"][part][block]["kept"] == site["setting"]
    assert result.model.num_params() < Model.from_proto(proto).num_params()
    ref, got = outputs(proto, validation), outputs(result.model.to_onnx(), validation)
    assert per_sample_cosine(ref, got).mean() >= 0.97 - 1e-6


def test_least_damage_is_the_exact_optimum():
    """The allocation's knapsack against brute force over every combination."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        moves = {f"s{i}": [(int(u), float(rng.random() ** 2 * u), int(u))
                           for u in sorted(rng.choice(np.arange(1, 9), 3, replace=False))]
                 for i in range(4)}
        total = int(rng.integers(1, 30))
        choice, units, damage = least_damage(moves, total)
        best = None
        for combo in itertools.product(*[[(0, 0.0, None), *m] for m in moves.values()]):
            u, d = sum(c[0] for c in combo), sum(c[1] for c in combo)
            if u >= total and (best is None or (d, u) < best):
                best = (d, u)
        if best is None:  # out of reach: the most there is
            assert units == sum(max(m)[0] for m in moves.values())
            continue
        assert damage == pytest.approx(best[0]) and units == best[1]
        assert sum(choice.values()) == units  # (each setting here is its units)
        assert damage == pytest.approx(sum(next(d for u, d, _ in moves[k] if u == v)
                                           for k, v in choice.items()))


ALLOCATED = {  # the pass, its options, the unit (per block), the linear made stronger
    "ffn": (PruneFfn, {"max_batches": 6}, FFN,
            lambda graph: find_ffn_blocks(graph)[1].down.node.name),
    "heads": (PruneHeads, {"max_batches": 6, "ablation_batches": 1}, HEADS,
              lambda graph: find_attention_blocks(graph)[1].out.node.name),
}


@pytest.mark.parametrize("kind", list(ALLOCATED))
def test_allocated_units_go_where_they_hurt_least(biased, kind):
    """``allocate``: as many neurons (heads) as ratio 0.5 of each block, placed by the
    measured damage. With the second block's down (output) projection made 4x as strong
    (its units matter more), the allocation cuts more of the first block, and the result
    is closer to the original on held-out data than the uniform cut."""
    cls, options, units, strong = ALLOCATED[kind]
    proto = onnx.ModelProto.FromString(biased["fused"].SerializeToString())
    node = strong(Model.from_proto(proto).graph)
    weight = next(n.input[1] for n in proto.graph.node if n.name == node)
    init = next(i for i in proto.graph.initializer if i.name == weight)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 4.0, weight))
    data, errors, kept = held_out(), {}, {}
    ref = outputs(proto, data)
    for allocate in (False, True):
        result = graphopt.optimize(
            proto, passes=[cls(ratio=0.5, allocate=allocate, **options)],
            calibration=calibration(), validation=held_out(), metric="mean-cosine",
            tolerance=0.5, recovery=None)
        info = result.report["compression"]["passes"][cls.name]
        assert info["mode"] == ("allocated" if allocate else "fixed")
        kept[allocate] = [v["setting"] for v in info["sites"].values()]
        errors[allocate] = output_error(ref, outputs(result.model.to_onnx(), data))
    assert kept[False] == [units // 2] * LAYERS
    assert sum(kept[True]) == sum(kept[False]) and kept[True][0] < kept[True][1], kept
    assert info["allocation"]["reached"] and info["allocation"]["removed"] == units
    assert errors[True] < 0.9 * errors[False], errors


def test_thin_data_under_recovery_scores_blocks_with_a_damped_refit(biased):
    """Too few calibration rows for the update (384 tokens for 257 unknowns per output):
    no re-fit is applied, but under recovery the blocks are still scored alone in one
    session, with a damped re-fit standing in for the recovery's, which lowers the
    error of every setting against the mean compensation alone."""
    proto, data = biased["fused"], held_out()
    ref = outputs(proto, data)
    scores = {}
    for recovery in (None, pass_registry().get("recover")()):
        p = PruneFfn(max_batches=6)
        model = Model.from_proto(proto)
        ctx = context(calibration())
        ctx.recovery = recovery
        sites = p.sites(model, ctx)
        assert not p._grams and len(p._proxies) == LAYERS
        scores[recovery is None] = p.damages(
            model, sites, data, lambda outs: -output_error(ref, outs))
        assert set(scores[recovery is None]) == {(s.name, c) for s in sites
                                                 for c in s.settings[1:]}
    assert all(scores[False][k] > scores[True][k] for k in scores[True]), scores


def per_sample_cosine(reference: list[dict], candidate: list[dict]) -> np.ndarray:
    """Each sample's lowest cosine over the outputs (its row of each), every batch."""
    out = []
    for ref, got in zip(reference, candidate):
        cos = []
        for name, r in ref.items():
            x = np.asarray(r, np.float64).reshape(len(r), -1)
            y = np.asarray(got[name], np.float64).reshape(len(r), -1)
            cos.append((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1))
        out.append(np.min(cos, axis=0))
    return np.concatenate(out)


def test_fixed_heads_through_the_core_then_fused():
    """prune-heads (ratio 0.5) on the exported form, then the rest of the pipeline: ORT's
    attention fusion recognizes the pruned attention as 2-head Attention nodes."""
    cleanup = cleanup_passes()
    rest = [n for n in LOSSLESS_PIPELINE if n not in cleanup]
    proto = with_biases(zoo.bert_tiny())
    validation = held_out()
    result = graphopt.optimize(
        proto, passes=[*cleanup, PruneHeads(ratio=0.5, ablation_batches=1, max_batches=3),
                       *rest],
        calibration=calibration(), validation=validation, metric="mean-cosine",
        tolerance=0.9, recovery=None)
    info = result.report["compression"]["passes"]["prune-heads"]
    assert info["status"] == "changed" and info["mode"] == "fixed"
    assert [v["setting"] for v in info["sites"].values()] == [HEADS // 2] * LAYERS
    assert {k: v["kept"] for k, v in info["applied"].items() if k != "importance"} == \
        {k: HEADS // 2 for k in info["sites"]}
    final = result.model.to_onnx()
    assert sorted(a.i for n in final.graph.node if n.op_type == "Attention"
                  for a in n.attribute if a.name == "num_heads") == [HEADS // 2] * LAYERS
    ref, got = outputs(proto, validation), outputs(final, validation)
    assert per_sample_cosine(ref, got).mean() == pytest.approx(info["score"], abs=1e-4)


# ============================================================================ options
def test_options_are_validated():
    registry = pass_registry()
    assert registry.get("prune-heads") is PruneHeads and registry.get("prune-ffn") is PruneFfn
    bad = {
        PruneHeads: [({"importance": "random"}, "importance"), ({"ratio": 1.0}, "ratio"),
                     ({"ratio": -0.1}, "ratio"), ({"ratios": ()}, "ratios"),
                     ({"ratios": (0.5, 1.0)}, "ratios"), ({"max_batches": 0}, "batches"),
                     ({"ablation_batches": 0}, "ablation-batches"),
                     ({"ratio": "half"}, "ratio"), ({"compensate": "maybe"}, "compensate"),
                     ({"heads": 2}, "no option 'heads'"),
                     ({"allocate": True}, "allocate needs a ratio")],
        PruneFfn: [({"importance": "nope"}, "importance"), ({"importance": "ablation"},
                                                             "importance"),
                   ({"ratio": -0.1}, "ratio"), ({"ratio": 1.5}, "ratio"),
                   ({"ratios": "0.5;2"}, "ratios"), ({"multiple": -16}, "multiple"),
                   ({"max_batches": 0}, "max-batches"), ({"ablation_batches": 1},
                                                          "no option 'ablation_batches'"),
                   ({"allocate": "true"}, "allocate needs a ratio")],
    }
    for cls, cases in bad.items():
        for options, match in cases:
            with pytest.raises((ValueError, UsageError), match=match):
                cls(**options)
    # Strings as given on the command line are converted.
    p = PruneFfn(**{"ratios": "0.5;0.25", "multiple": "8", "compensate": "false"})
    assert (p.options.ratios, p.options.multiple, p.options.compensate) == \
        ((0.5, 0.25), 8, False)
    assert PruneHeads(**{"ratio": "none", "ablation-batches": "2"}).options.ratio is None
    with pytest.raises(ValueError, match="no attention block"):
        PruneHeads().apply(Model.from_proto(zoo.bert_tiny()), {"nowhere": 1}, context())
