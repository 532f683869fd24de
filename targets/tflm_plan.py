"""TFLite Micro and graphopt's memory plan: the arena TFLite Micro's interpreter allocates
for a ``.tflite`` (measured in the ``tflite-micro`` wheel's interpreter, no TensorFlow),
and graphopt's static plan written into the ``.tflite`` as the offline plan TFLite Micro
reads from the model metadata ("OfflineMemoryAllocation": a version, a subgraph count,
the number of tensors, then one arena offset per tensor, -1 for "plan it at runtime").

Why a plan of the ``.tflite``'s own tensors rather than the ``mcu`` target's: the two do
not map 1:1. The ``.tflite`` (written by the litert lowering) is NHWC with TFLite's
operator set, so an ONNX Conv whose padding TFLite's SAME/VALID cannot express gets an
explicit PAD and one more (larger) tensor, a Flatten is a RESHAPE that TFLite Micro
places in the arena, and graph inputs and outputs live in TFLite Micro's arena, where the
``mcu`` C code leaves them to the caller. So the schedule here is the ``.tflite``'s
operators in file order, fed to the same planner (``mcu_plan.plan_memory``): lifetimes as
TFLite Micro counts them (inputs created before the first operator, outputs alive to the
end), RESHAPE as an alias of its input (TFLite Micro's RESHAPE copies only when its
input and output differ), elementwise operators in place over a same-shaped input that
dies there. Scratch buffers a kernel requests at runtime are still placed by TFLite
Micro, around the offline offsets.

``print_allocations`` logs from C++ to the process's file descriptors, which Python
cannot capture in-process: ``tflm_run`` runs the interpreter in a subprocess.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from graphopt.errors import GraphoptError, UsageError
from graphopt.targets.mcu_plan import Plan, Step, plan_best_order, plan_memory
from graphopt.targets.tflite_writer import schema, with_metadata

OFFLINE_PLAN = "OfflineMemoryAllocation"
TFLM_HINT = "pip install tflite-micro  (TFLite Micro's interpreter, no TensorFlow)"
# TFLite Micro's RESHAPE skips its copy when the output already is the input's memory.
ALIAS_OPS = frozenset({"RESHAPE"})
# Reference kernels that read element i before writing element i (no broadcast: the
# schedule only offers an input of the output's shape).
INPLACE_OPS = frozenset({"RELU", "RELU6", "RELU_N1_TO_1", "LOGISTIC", "TANH", "HARD_SWISH",
                         "LEAKY_RELU", "ADD", "SUB", "MUL"})
_ITEM = {"FLOAT32": 4, "FLOAT16": 2, "INT32": 4, "INT64": 8, "INT8": 1, "UINT8": 1,
         "BOOL": 1, "INT16": 2}


def tflm_compatible(tflite: bytes) -> tuple[bytes, list[str]]:
    """The ``.tflite`` with the builtins LiteRT has and TFLite Micro lacks rewritten into
    ones it has, and what was rewritten: RELU_0_TO_1 (LiteRT's clamp to [0, 1], which the
    litert lowering writes for HardSigmoid) becomes MAXIMUM with 0 then MINIMUM with 1,
    through one more tensor of the same shape."""
    import flatbuffers

    s = schema()
    model = s.ModelT.InitFromPackedBuf(tflite, 0)
    sub = model.subgraphs[0]
    target = s.BuiltinOperator.RELU_0_TO_1
    found = [k for k, op in enumerate(sub.operators)
             if model.operatorCodes[op.opcodeIndex].builtinCode == target]
    if not found:
        return tflite, []

    def code(member: str) -> int:
        builtin = getattr(s.BuiltinOperator, member)
        for i, c in enumerate(model.operatorCodes):
            if c.builtinCode == builtin:
                return i
        c = s.OperatorCodeT()
        c.builtinCode = c.deprecatedBuiltinCode = builtin
        c.version = 1
        model.operatorCodes.append(c)
        return len(model.operatorCodes) - 1

    def scalar(value: float) -> int:
        buf = s.BufferT()
        buf.data = np.frombuffer(np.float32(value).tobytes(), np.uint8)
        model.buffers.append(buf)
        tensor = s.TensorT()
        tensor.name, tensor.shape, tensor.type = f"tflm/{value:g}", [1], s.TensorType.FLOAT32
        tensor.buffer = len(model.buffers) - 1
        sub.tensors.append(tensor)
        return len(sub.tensors) - 1

    zero, one, maximum, minimum = scalar(0.0), scalar(1.0), code("MAXIMUM"), code("MINIMUM")
    for k in reversed(found):
        op = sub.operators[k]
        source = sub.tensors[op.outputs[0]]
        middle = s.TensorT()
        middle.name, middle.shape, middle.type = f"{_name(source)}/max0", \
            list(source.shape), source.type
        sub.tensors.append(middle)
        first, second = s.OperatorT(), s.OperatorT()
        first.opcodeIndex, first.inputs, first.outputs = maximum, [op.inputs[0], zero], \
            [len(sub.tensors) - 1]
        second.opcodeIndex, second.inputs, second.outputs = minimum, \
            [len(sub.tensors) - 1, one], list(op.outputs)
        sub.operators[k:k + 1] = [first, second]
    fb = flatbuffers.Builder(len(tflite) + 1024)
    fb.ForceDefaults(False)
    fb.Finish(model.Pack(fb), file_identifier=b"TFL3")
    return bytes(fb.Output()), [f"RELU_0_TO_1 x{len(found)} -> MAXIMUM, MINIMUM"]


def _name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def why_no_tflm() -> str | None:
    if importlib.util.find_spec("tflite_micro") is None:
        return f"the tflite-micro package is missing: {TFLM_HINT}"
    return None


def schedule(tflite: bytes) -> tuple[list[Step], dict[str, int], int]:
    """``(steps, bytes per tensor, tensor count)`` of the ``.tflite``'s one subgraph:
    a first step creating the graph inputs, one per operator, a last one reading the
    outputs. Tensors are named ``#<index>``; constants and empty tensors are left out."""
    s = schema()
    model = s.ModelT.InitFromPackedBuf(tflite, 0)
    if len(model.subgraphs or []) != 1:
        raise UsageError("an offline memory plan is written for one-subgraph models only")
    sub = model.subgraphs[0]
    codes = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(s.TensorType).items() if not k.startswith("_")}

    def planned(i: int) -> bool:
        """What TFLite Micro allocates in its arena: not a constant (its data is in the
        flatbuffer), not a variable, not empty."""
        if i < 0:
            return False
        t = sub.tensors[i]
        data = model.buffers[t.buffer].data
        return (data is None or len(data) == 0) and not t.isVariable and sizes[i] > 0

    sizes = {i: int(np.prod(t.shape if t.shape is not None else [], dtype=np.int64)) *
             _ITEM[types[t.type]] for i, t in enumerate(sub.tensors)}
    name = "#{}".format
    steps = [Step("inputs", (), tuple(name(i) for i in sub.inputs))]
    for k, op in enumerate(sub.operators):
        code = codes[max(model.operatorCodes[op.opcodeIndex].builtinCode,
                         model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)]
        ins = [i for i in op.inputs if i >= 0 and planned(i)]
        outs = tuple(name(i) for i in op.outputs if planned(i))
        kind, share = "compute", ()
        if code in ALIAS_OPS and len(ins) == 1 and len(outs) == 1:
            kind = "alias"
        elif code in INPLACE_OPS and len(outs) == 1:
            out = sub.tensors[op.outputs[0]]
            share = tuple(p for p, i in enumerate(ins)
                          if list(sub.tensors[i].shape) == list(out.shape) and
                          sub.tensors[i].type == out.type)
            kind = "inplace" if share else "compute"
        steps.append(Step(f"{k}:{code}", tuple(name(i) for i in ins), outs, kind, share))
    steps.append(Step("outputs", tuple(name(i) for i in sub.outputs), ()))
    return steps, {name(i): b for i, b in sizes.items()}, len(sub.tensors)


def offline_plan(tflite: bytes) -> tuple[list[int], Plan]:
    """graphopt's plan of the ``.tflite``'s tensors: one arena offset per tensor (-1 for
    constants and tensors TFLite Micro does not allocate) and the plan."""
    steps, sizes, count = schedule(tflite)
    plan = plan_memory(steps, sizes, external=set())
    offsets = [-1] * count
    for tensor, root in plan.storage.items():
        offset = plan.offset(tensor)
        if offset is not None:
            offsets[int(tensor[1:])] = offset
    return offsets, plan


def with_offline_plan(tflite: bytes) -> tuple[bytes, Plan]:
    """The ``.tflite`` carrying graphopt's plan as TFLite Micro's offline memory plan."""
    offsets, plan = offline_plan(tflite)
    words = np.array([0, 1, len(offsets), *offsets], dtype="<i4")
    return with_metadata(tflite, {OFFLINE_PLAN: words.tobytes()}), plan


def mcu_plan_with_io(proto) -> Plan:
    """The ``mcu`` target's plan of an (optimized) ONNX model counted TFLite Micro's way:
    its inputs and outputs in the arena too (inputs created before the first op, outputs
    alive to the end, reused like any tensor otherwise), where the generated C leaves
    them in the caller's buffers. What to put next to TFLite Micro's head."""
    from graphopt.targets.mcu_ops import lower_graph

    program = lower_graph(proto)
    steps = [Step("inputs", (), tuple(n for n, _ in program.inputs)),
             *(op.step() for op in program.ops),
             Step("outputs", tuple(n for n, _ in program.outputs), ())]
    sizes = {t: program.nbytes(t) for t in program.shapes}
    return plan_best_order(steps, sizes, set())[1]


_RUNNER = r"""
import sys, numpy as np
from tflite_micro.python.tflite_micro import runtime
model, feeds, out = sys.argv[1:4]
it = runtime.Interpreter.from_file(model)
arrays = np.load(feeds)
for i in range(len(arrays.files)):
    it.set_input(arrays[f"x{i}"], i)
it.invoke()
got, i = {}, 0
while True:
    try:
        got[f"y{i}"] = it.get_output(i)
    except Exception:
        break
    i += 1
np.savez(out, **got)
sys.stdout.flush()
it.print_allocations()
"""


def tflm_run(path: Path, inputs: list[np.ndarray]) -> dict:
    """Run the ``.tflite`` at ``path`` once in TFLite Micro's interpreter (a subprocess)
    on ``inputs`` (in subgraph input order): ``{"outputs": [...], "head": bytes of the
    planned (non-persistent) section, "tail": persistent bytes, "total": both}``."""
    missing = why_no_tflm()
    if missing:
        raise UsageError(missing)
    with tempfile.TemporaryDirectory(prefix="graphopt-tflm-") as tmp:
        feeds, out = Path(tmp) / "feeds.npz", Path(tmp) / "out.npz"
        np.savez(feeds, **{f"x{i}": np.asarray(x) for i, x in enumerate(inputs)})
        done = subprocess.run([sys.executable, "-c", _RUNNER, str(path), str(feeds),
                               str(out)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            said = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise GraphoptError(f"TFLite Micro could not run {path}: {' | '.join(said)}")
        with np.load(out) as got:
            outputs = [got[f"y{i}"] for i in range(len(got.files))]
    sections = {}
    for line in (done.stdout + done.stderr).splitlines():  # TFLite Micro logs to stderr
        words = line.split()
        if "Arena allocation" in line and len(words) >= 5:
            sections[words[3]] = int(words[4])
    if not {"head", "tail", "total"} <= set(sections):
        said = (done.stdout + done.stderr)[-300:]
        raise GraphoptError(f"TFLite Micro printed no arena figures: {said!r}")
    return {"outputs": outputs, **sections}
