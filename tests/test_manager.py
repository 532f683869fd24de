"""The pass manager: verification after each pass, rollback, fixpoint, trace."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

import graphopt
from graphopt import Pass, PassContext, PassResult, verify
from graphopt.cost import AnalyticCostModel
from graphopt.errors import VerificationError
from graphopt.ir import load
from graphopt.manager import PassManager
from graphopt.rewrite import bypass, walk
from graphopt.targets.ort import OrtTarget


def chain_model() -> onnx.ModelProto:
    """x -> Neg -> Neg -> Neg -> Neg -> Relu -> y: two double-negations."""
    nodes = [oh.make_node("Neg", [f"t{i}"], [f"t{i + 1}"]) for i in range(4)]
    nodes.append(oh.make_node("Relu", ["t4"], ["y"]))
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("t0", TensorProto.FLOAT, ["N", 8])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


class RemoveOneDoubleNeg(Pass):
    """Removes one Neg pair per run, so only a fixpoint loop finishes the job."""

    name = "remove-one-double-neg"
    family = "test"

    def run(self, model, ctx):
        for graph, node in walk(model.all_graphs()):
            if node.op == "Neg" and node.inputs[0].inputs and node.inputs[0].inputs[0].op == "Neg":
                producer = node.inputs[0].inputs[0]
                bypass(node, graph)
                bypass(producer, graph)
                return PassResult(True, {"removed": 2})
        return PassResult(False)


class BreakNumbers(Pass):
    """Replaces Relu with Sigmoid: structurally valid, numerically wrong."""

    name = "break-numbers"
    family = "test"

    def run(self, model, ctx):
        for node in model.graph.nodes:
            if node.op == "Relu":
                node.op = "Sigmoid"
                return PassResult(True)
        return PassResult(False)


class BreakStructure(Pass):
    """Feeds Relu from a tensor nobody produces."""

    name = "break-structure"
    family = "test"

    def run(self, model, ctx):
        import onnx_graphsurgeon as gs
        relu = next(n for n in model.graph.nodes if n.op == "Relu")
        relu.inputs[0] = gs.Variable("dangling", dtype=np.float32, shape=["N", 8])
        return PassResult(True)


class Raises(Pass):
    name = "raises"
    family = "test"

    def run(self, model, ctx):
        model.graph.nodes.clear()  # half-done work that must be rolled back
        raise RuntimeError("boom")


class LossyScale(Pass):
    """Adds ``noise`` to every other output element: lossy, judged by cosine similarity."""

    name = "lossy-scale"
    family = "test"
    lossless = False

    @dataclass(frozen=True)
    class Options:
        noise: float = 0.0

    def run(self, model, ctx):
        import onnx_graphsurgeon as gs
        out = model.graph.outputs[0]
        producer = out.inputs[0]
        mid = gs.Variable("pre_noise", dtype=out.dtype, shape=out.shape)
        producer.outputs[0] = mid
        noise = gs.Constant("noise", (np.arange(8) % 2 * self.options.noise).astype(np.float32))
        model.graph.nodes.append(gs.Node("Add", inputs=[mid, noise], outputs=[out]))
        return PassResult(True)


def run_manager(passes, **kwargs):
    model = load(chain_model())
    target = OrtTarget()
    ctx = PassContext(target=target, cost_model=AnalyticCostModel(), device=target.device)
    manager = PassManager(passes, ctx, **kwargs)
    manager.run(model)
    return model, manager


def test_fixpoint_iterates_until_nothing_changes():
    model, manager = run_manager([RemoveOneDoubleNeg()])
    assert [n.op for n in model.graph.nodes] == ["Relu"]
    assert [e.status for e in manager.trace] == ["changed", "changed", "unchanged"]
    assert [e.nodes_after for e in manager.trace] == [3, 1, 1]
    first = manager.trace[0]
    assert first.cost_after_s < first.cost_before_s
    assert first.stats == {"removed": 2} and first.seconds >= 0


def test_max_iterations_bounds_the_loop():
    model, manager = run_manager([RemoveOneDoubleNeg()], max_iterations=1)
    assert model.num_nodes() == 3 and len(manager.trace) == 1


@pytest.mark.parametrize("bad", [BreakNumbers(), BreakStructure(), Raises()],
                         ids=lambda p: p.name)
def test_broken_pass_is_rolled_back(bad):
    model, manager = run_manager([bad, RemoveOneDoubleNeg()])
    assert manager.trace[0].status == "rolled-back" and manager.trace[0].reason
    # the model is as before the bad pass, and the later pass still ran
    assert [n.op for n in model.graph.nodes] == ["Relu"]
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_array_equal(verify.run(model.to_onnx(), {"t0": x})["y"], np.maximum(x, 0))


def test_rollback_reasons_name_the_problem():
    _, manager = run_manager([BreakNumbers(), BreakStructure(), Raises()], max_iterations=1)
    reasons = [e.reason for e in manager.trace]
    assert "output 'y' changed" in reasons[0]
    assert "dangling" in reasons[1] or "checker" in reasons[1].lower()
    assert "RuntimeError: boom" in reasons[2]


def test_strict_turns_rollback_into_error():
    with pytest.raises(VerificationError, match="break-numbers"):
        run_manager([BreakNumbers()], strict=True)


def test_lossy_pass_is_judged_by_the_budget():
    _, kept = run_manager([LossyScale(noise=1e-3)])
    assert kept.trace[0].status == "changed"
    _, rejected = run_manager([LossyScale(noise=5.0)])
    assert rejected.trace[0].status == "rolled-back"
    assert "cosine" in rejected.trace[0].reason


def test_model_ort_cannot_run_is_still_checked_structurally():
    """A custom-domain op ORT does not know: numbers cannot be compared, structure can."""
    model = chain_model()
    model.graph.node[4].op_type = "MyRelu"
    model.graph.node[4].domain = "com.example"
    model.opset_import.append(oh.make_opsetid("com.example", 1))
    result = graphopt.optimize(model, passes=[RemoveOneDoubleNeg()])
    assert result.report["verification"]["ok"] is None
    assert "cannot run" in result.report["verification"]["detail"]
    assert result.model.num_nodes() == 1


class SessionCounter:
    """Counts the ONNX Runtime runs the manager makes to check numbers."""

    def __init__(self, monkeypatch):
        from graphopt import manager as manager_module

        self.calls = 0
        real = manager_module._run_feeds

        def counting(proto, feeds, *args):
            self.calls += 1
            return real(proto, feeds, *args)

        monkeypatch.setattr(manager_module, "_run_feeds", counting)


@pytest.mark.parametrize("check_each_pass", [False, True])
def test_numbers_checked_once_per_iteration_unless_asked(monkeypatch, check_each_pass):
    counter = SessionCounter(monkeypatch)
    model, manager = run_manager([RemoveOneDoubleNeg(), RemoveOneDoubleNeg()],
                                 check_each_pass=check_each_pass)
    assert [n.op for n in model.graph.nodes] == ["Relu"]
    assert [e.status for e in manager.trace] == ["changed", "changed", "unchanged",
                                                 "unchanged"]
    # 1 for the input, then per changed pass (2) or per iteration that changed (1)
    assert counter.calls == (3 if check_each_pass else 2)


def test_deferred_check_finds_the_pass_at_fault_and_watches_it(monkeypatch):
    counter = SessionCounter(monkeypatch)
    model, manager = run_manager([RemoveOneDoubleNeg(), BreakNumbers(), RemoveOneDoubleNeg()])
    # iteration 1 ran again with a check per pass: the bad pass is rolled back, alone
    assert [(e.pass_name, e.iteration, e.status) for e in manager.trace] == [
        ("remove-one-double-neg", 1, "changed"), ("break-numbers", 1, "rolled-back"),
        ("remove-one-double-neg", 1, "changed"),
        ("remove-one-double-neg", 2, "unchanged"), ("break-numbers", 2, "rolled-back"),
        ("remove-one-double-neg", 2, "unchanged")]
    assert "output 'y' changed" in manager.trace[1].reason
    assert [n.op for n in model.graph.nodes] == ["Relu"]
    # input 1; iteration 1 optimistic 1, replay 3; iteration 2: the suspect alone 1
    assert counter.calls == 6


@pytest.mark.parametrize("check_each_pass", [False, True])
def test_structure_checks_wait_for_passes_that_leave_every_type(monkeypatch,
                                                                check_each_pass):
    """While numbers are deferred, a lossless pass that leaves no tensor untyped is
    exported, checked and shape-inferred with the next check, not after itself."""
    calls = []
    real = PassManager._structure
    monkeypatch.setattr(PassManager, "_structure",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model, manager = run_manager([RemoveOneDoubleNeg(), RemoveOneDoubleNeg()],
                                 check_each_pass=check_each_pass)
    assert [n.op for n in model.graph.nodes] == ["Relu"]
    assert [e.status for e in manager.trace] == ["changed", "changed", "unchanged",
                                                 "unchanged"]
    assert len(calls) == (2 if check_each_pass else 1)
    assert manager.trace[1].cost_after_s < manager.trace[0].cost_after_s


@pytest.mark.parametrize("bad", [BreakStructure(), Raises()], ids=lambda p: p.name)
def test_a_pass_failing_after_unchecked_changes_is_found_alone(bad):
    """The model before ``bad`` was never exported (the change before it waits for its
    check): the iteration runs again with every check, and only ``bad`` is rolled back."""
    model, manager = run_manager([RemoveOneDoubleNeg(), bad, RemoveOneDoubleNeg()])
    assert [(e.pass_name, e.iteration, e.status) for e in manager.trace][:3] == [
        ("remove-one-double-neg", 1, "changed"), (bad.name, 1, "rolled-back"),
        ("remove-one-double-neg", 1, "changed")]
    assert "boom" in manager.trace[1].reason or "dangling" in manager.trace[1].reason
    assert [n.op for n in model.graph.nodes] == ["Relu"]
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_array_equal(verify.run(model.to_onnx(), {"t0": x})["y"], np.maximum(x, 0))


def test_deferred_and_per_pass_checks_give_the_same_model():
    from tests import zoo

    proto = zoo.resnet_cnn()
    fast = graphopt.optimize(proto, target="ort")
    results = []
    for check_each_pass in (False, True):
        model = load(proto)
        target = OrtTarget()
        ctx = PassContext(target=target, cost_model=AnalyticCostModel(), device=target.device)
        passes = graphopt.pipeline.build_passes(target.default_pipeline,
                                                graphopt.registry.pass_registry())
        PassManager(passes, ctx, check_each_pass=check_each_pass).run(model)
        results.append(model.content_hash())
    assert results[0] == results[1] == fast.report["output_hash"]


@pytest.mark.parametrize("order", ["forward", "backward", "shuffled"])
def test_remove_node_drops_exactly_that_node_in_any_order(order):
    """``remove_node`` starts each search where the previous removal was; whatever the
    order, the node removed is the one asked for (by identity: the look-alike nodes
    here compare equal), and the others keep their order."""
    import onnx_graphsurgeon as gs

    from graphopt.rewrite import remove_node

    graph = gs.Graph()
    nodes = [gs.Node("Relu", name="same") for _ in range(40)]
    graph.nodes.extend(nodes)
    doomed = nodes[3::3]
    if order == "backward":
        doomed = doomed[::-1]
    elif order == "shuffled":
        doomed = [doomed[i] for i in np.random.default_rng(0).permutation(len(doomed))]
    for node in doomed:
        remove_node(node, graph)
    gone = {id(n) for n in doomed}
    assert [id(n) for n in graph.nodes] == [id(n) for n in nodes if id(n) not in gone]
    with pytest.raises(ValueError, match="not in graph"):
        remove_node(doomed[0], graph)


def test_graph_work_restores_the_callers_collector_thresholds():
    import gc

    from graphopt.gc_policy import YOUNG_THRESHOLD, graph_work

    before = gc.get_threshold()
    with graph_work():
        assert gc.get_threshold()[0] >= YOUNG_THRESHOLD
        assert gc.get_threshold()[1:] == before[1:]
    assert gc.get_threshold() == before


def test_checked_outputs_only_for_the_very_model_the_manager_ran_last():
    """The final verification may take the manager's outputs of the last model it
    accepted instead of running it again, but only for that exact model (same content
    hash): any later change, or a model the manager never ran, gives None."""
    from graphopt.ir import proto_hash

    model, manager = run_manager([RemoveOneDoubleNeg()])
    outputs = manager.checked_outputs(model.content_hash())
    assert outputs is not None
    fresh = verify.run(model.to_onnx(), manager.probe_feeds[0])
    assert all(np.array_equal(fresh[k], v) for k, v in outputs[0].items())
    assert manager.checked_outputs(proto_hash(chain_model())) is None
    model.graph.nodes[0].op = "Sigmoid"  # changed after the manager: not what it ran
    assert manager.checked_outputs(model.content_hash()) is None


def test_final_verification_compares_the_reused_outputs(monkeypatch):
    """Reused outputs are still compared: damaged ones fail the verification (exit 4)."""
    def damaged(self, final_hash):
        return [{k: v + 1.0 for k, v in batch.items()} for batch in self._final.outputs]

    monkeypatch.setattr(PassManager, "checked_outputs", damaged)
    with pytest.raises(VerificationError, match="does not match the original"):
        graphopt.optimize(chain_model())


@pytest.mark.parametrize("bound", [False, True], ids=["as-is", "bound"])
def test_input_summary_with_the_managers_types_is_the_summary_of_the_input(monkeypatch,
                                                                           bound):
    """The report's input summary, which reuses the types the pass manager inferred for
    the model it started from, is the input's own summary: at its own shapes, or at the
    shapes the target's ``prepare`` bound (as compiled targets do), the result's."""
    from graphopt.analysis import summarize
    from graphopt.targets.shapes import bind_input_shapes
    from tests import zoo

    proto = zoo.resnet_cnn()  # torchscript export: no intermediate shapes in the file
    del proto.graph.value_info[:]
    if bound:
        monkeypatch.setattr(OrtTarget, "prepare",
                            lambda self, model, shapes: bind_input_shapes(model, shapes))
    target = OrtTarget()
    result = graphopt.optimize(proto, target="ort",
                               input_shapes={"input": [3, 3, 32, 32]} if bound else None)
    model = load(proto)
    if bound:
        bind_input_shapes(model, {"input": [3, 3, 32, 32]})
    own = summarize(model, target.device).to_dict()
    for key in ("nodes", "params", "flops", "peak_activation_bytes", "shapes_known"):
        assert result.report["input"][key] == own[key], key
