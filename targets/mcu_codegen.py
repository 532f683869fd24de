"""C99 for the ``mcu`` target: ``model.h`` (the API, sizes and shapes as macros) and
``model.c`` (weights as ``static const`` arrays, which a Cortex-M toolchain places in
flash; one ``static`` arena, 16-byte aligned, with every intermediate tensor at the
offset the memory plan chose; one kernel call per op of the program).

The generated code is plain data plus calls into ``graphopt_kernels.c`` (copied beside
it): every shape, stride and offset is a literal, so a reader can check a call against
``manifest.json`` and a compiler can constant-fold what it likes. Float literals are
printed with 9 significant digits, which round-trips every float32 exactly.
"""

from __future__ import annotations

import math
import re

import numpy as np

from graphopt.errors import UsageError
from graphopt.targets.mcu_ops import Op, Program
from graphopt.targets.mcu_plan import ALIGNMENT, Plan

HEADER = "model.h"
SOURCE = "model.c"
PER_LINE = 8


def c_name(name: str, taken: set[str]) -> str:
    """A C identifier for a tensor name, unique among ``taken``."""
    base = re.sub(r"\W", "_", name) or "t"
    base = base if not base[0].isdigit() else "t_" + base
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def c_float(v: float) -> str:
    if math.isnan(v):
        raise UsageError("a weight or bound of the model is NaN: the C code cannot hold it")
    if math.isinf(v):
        return "HUGE_VALF" if v > 0 else "-HUGE_VALF"
    s = "%.9g" % v
    return (s if any(ch in s for ch in ".e") else s + ".0") + "f"


def _comment(name: str) -> str:
    """A name quoted for a C comment (one that cannot end it)."""
    return repr(name.replace("*/", "* /"))


CTYPES = {"float": 4, "int": 4, "int32_t": 4, "int8_t": 1}


def _array(name: str, data: np.ndarray, ctype: str = "float") -> str:
    flat = np.asarray(data).reshape(-1)
    fmt = c_float if ctype == "float" else (lambda v: str(int(v)))
    items = [fmt(float(v)) for v in flat]
    lines = [", ".join(items[i:i + PER_LINE]) for i in range(0, len(items), PER_LINE)]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{max(len(items), 1)}] = {{\n    {body or '0'}\n}};\n"


class _Emitter:
    """Writes the two files for one program and plan."""

    def __init__(self, program: Program, plan: Plan, model_name: str,
                 io_in_arena: bool = False):
        self.program, self.plan = program, plan
        self.model_name = model_name.replace("*/", "* /")
        self.io_in_arena = io_in_arena
        taken: set[str] = set()
        self.params = {n: "in_" + c_name(n, taken) for n, _ in program.inputs}
        self.params.update({n: "out_" + c_name(n, taken) for n, _ in program.outputs})
        # the tensors that are the caller's memory (none when the arena holds them)
        self.vars = {} if io_in_arena else self.params
        self.decls: list[str] = []
        self.calls: list[str] = []
        self.weight_bytes = 0
        self.uses_arena = self.uses_arena8 = False

    # ------------------------------------------------------------------ pointers
    def ptr(self, tensor: str) -> str:
        root = self.plan.storage[tensor]
        if root in self.vars:
            return self.vars[root]
        if tensor in self.program.int8:
            self.uses_arena8 = True
            return f"A8 + {self.plan.offset(tensor)}"
        self.uses_arena = True
        return f"A + {self.plan.offset(tensor) // 4}"

    def const(self, prefix: str, key: str, data: np.ndarray, ctype: str = "float") -> str:
        """A ``static const`` array (flash); its bytes count as the model's weights."""
        name = f"{prefix}_{key}"
        self.decls.append(_array(name, data, ctype))
        self.weight_bytes += CTYPES[ctype] * max(int(np.asarray(data).size), 1)
        return name

    # ------------------------------------------------------------------ ops
    def emit(self, index: int, op: Op) -> None:
        pre, p = f"k{index}", op.params
        what = op.op_type + (f" + {p['fused']}" if p.get("fused") else "")
        self.calls.append(f"    /* {index}: {what} {_comment(op.node)} */")
        if op.kind == "alias":
            self.calls[-1] += " /* no code: an alias of its input */"
            return
        out = self.ptr(op.outputs[0])
        if op.kind == "conv":
            w, b = self.const(pre, "w", op.consts["w"]), self.const(pre, "b", op.consts["b"])
            self._conv_params(pre, p, p["lo"], p["hi"])
            self.calls.append(f"    go_conv2d(&{pre}_p, {self.ptr(op.inputs[0])}, {w}, {b}, "
                              f"{out});")
        elif op.kind in ("qconv", "qfc"):
            self._quantized(pre, op, out)
        elif op.kind in ("quantize", "dequantize"):
            self.calls.append(f"    go_{op.kind}({self.ptr(op.inputs[0])}, {out}, "
                              f"{p['count']}, {c_float(p['scale'])}, {p['zp']});")
        elif op.kind == "fc":
            w = self.ptr(op.inputs[1]) if p["kn"] else self.const(pre, "w", op.consts["w"])
            b = self.const(pre, "b", op.consts["b"]) if "b" in op.consts else "0"
            self.calls.append(f"    go_fc({self.ptr(op.inputs[0])}, {w}, {b}, {out}, "
                              f"{p['m']}, {p['k']}, {p['n']}, {p['kn']}, {c_float(p['lo'])}, "
                              f"{c_float(p['hi'])});")
        elif op.kind == "binary":
            rank = len(p["shape"])
            args = []
            for key in ("a", "b"):
                src = self.ptr(op.inputs[p[key + "_input"]]) if key + "_input" in p else \
                    self.const(pre, key, op.consts[key])
                strides = self.const(pre, key + "_strides", np.array(p[key + "_strides"]),
                                     "int")
                args += [src, strides]
            shape = self.const(pre, "shape", np.array(p["shape"]), "int")
            self.calls.append(f"    go_binary({p['op']}, {', '.join(args)}, {out}, {shape}, "
                              f"{rank});")
        elif op.kind == "unary":
            self.calls.append(f"    go_unary({p['op']}, {self.ptr(op.inputs[0])}, {out}, "
                              f"{p['count']}, {c_float(p['a'])}, {c_float(p['b'])});")
        elif op.kind == "pool":
            fields = ["max", "n", "c", "h", "w", "oh", "ow", "kh", "kw", "sh", "sw", "dh",
                      "dw", "pt", "pl", "pb", "pr", "include_pad"]
            init = ", ".join(str(p[f]) for f in fields)
            self.decls.append(f"static const go_pool_params {pre}_p = {{{init}}};\n")
            self.calls.append(f"    go_pool2d(&{pre}_p, {self.ptr(op.inputs[0])}, {out});")
        elif op.kind == "gap":
            self.calls.append(f"    go_global_avgpool({self.ptr(op.inputs[0])}, {out}, "
                              f"{p['nc']}, {p['hw']});")
        elif op.kind == "concat":
            offset = 0
            for source, ref, inner in p["parts"]:
                src = self.ptr(op.inputs[ref]) if source == "input" else \
                    self.const(pre, ref, op.consts[ref])
                self.calls.append(f"    go_concat_part({src}, {out}, {p['outer']}, {inner}, "
                                  f"{p['inner']}, {offset});")
                offset += inner
        elif op.kind == "softmax":
            self.calls.append(f"    go_softmax({self.ptr(op.inputs[0])}, {out}, {p['outer']}, "
                              f"{p['n']}, {p['inner']});")
        elif op.kind == "copy":
            count = math.prod(self.program.shapes[op.outputs[0]])
            self.calls.append(f"    go_copy({self.ptr(op.inputs[0])}, {out}, {count});")
        else:  # a kind mcu_ops produces and this file does not know: a bug, not input
            raise AssertionError(f"no C for kernel kind {op.kind!r}")

    def _conv_params(self, pre: str, p: dict, lo: float, hi: float) -> None:
        fields = ["n", "c", "h", "w", "m", "oh", "ow", "kh", "kw", "sh", "sw", "dh", "dw",
                  "pt", "pl", "group"]
        init = ", ".join(str(p[f]) for f in fields)
        self.decls.append(f"static const go_conv_params {pre}_p = {{{init}, {c_float(lo)}, "
                          f"{c_float(hi)}}};\n")

    def _quantized(self, pre: str, op: Op, out: str) -> None:
        """An int8 Conv/FC: its go_qout (int8 or float output) in a block, then the call."""
        p = op.params
        w = self.const(pre, "w", op.consts["w"], "int8_t")
        b = self.const(pre, "b", op.consts["b"], "int32_t")
        if p["out"] == "int8":
            mult = self.const(pre, "mult", op.consts["mult"], "int32_t")
            shift = self.const(pre, "shift", op.consts["shift"], "int32_t")
            qout = f"{out}, {mult}, {shift}, {p['y_zp']}, {p['lo_q']}, {p['hi_q']}, 0, 0, " \
                   "0.0f, 0.0f"
        else:
            scale = self.const(pre, "scale", op.consts["scale"])
            qout = f"0, 0, 0, 0, 0, 0, {out}, {scale}, {c_float(p['lo'])}, {c_float(p['hi'])}"
        x = self.ptr(op.inputs[0])
        if op.kind == "qconv":
            self._conv_params(pre, p, 0.0, 0.0)  # the clamp is go_qout's
            call = f"go_conv2d_s8(&{pre}_p, {p['x_zp']}, {x}, {w}, {b}, &o);"
        else:
            call = f"go_fc_s8({p['x_zp']}, {x}, {w}, {b}, {p['m']}, {p['k']}, {p['n']}, &o);"
        self.calls.append(f"    {{\n        const go_qout o = {{{qout}}};\n"
                          f"        {call}\n    }}")

    # ------------------------------------------------------------------ files
    def header(self) -> str:
        prog = self.program
        lines = [f"/* {self.model_name}: generated by graphopt (target mcu). The API of "
                 f"model.c. */",
                 "#ifndef GRAPHOPT_MODEL_H", "#define GRAPHOPT_MODEL_H", "",
                 f"#define GRAPHOPT_MODEL_ARENA_BYTES {self.plan.arena_bytes}",
                 f"#define GRAPHOPT_MODEL_WEIGHT_BYTES {self.weight_bytes}",
                 f"#define GRAPHOPT_MODEL_INPUT_COUNT {len(prog.inputs)}",
                 f"#define GRAPHOPT_MODEL_OUTPUT_COUNT {len(prog.outputs)}"]
        for kind, tensors in (("INPUT", prog.inputs), ("OUTPUT", prog.outputs)):
            for i, (name, shape) in enumerate(tensors):
                lines += [f"/* {kind.lower()} {i} {_comment(name)}: float32 {shape} */",
                          f"#define GRAPHOPT_MODEL_{kind}{i}_FLOATS {math.prod(shape)}",
                          f"#define GRAPHOPT_MODEL_{kind}{i}_RANK {len(shape)}",
                          f"#define GRAPHOPT_MODEL_{kind}{i}_SHAPE "
                          f"{{{', '.join(map(str, shape))}}}"]
            total = sum(math.prod(s) for _, s in tensors)
            lines.append(f"#define GRAPHOPT_MODEL_{kind}_FLOATS {total}")
        if self.io_in_arena:
            lines += ["", "/* Inputs and outputs live in the arena (no buffers of the "
                          "caller's needed):", " * write input i at graphopt_model_input(i),"
                          " call graphopt_model_invoke(), then read", " * output i at "
                          "graphopt_model_output(i). The arena reuses the inputs' memory: "
                          "write", " * them again before each invoke. */",
                      "#define GRAPHOPT_MODEL_IO_IN_ARENA 1",
                      "#define GRAPHOPT_MODEL_INPUT_SIZES {" + ", ".join(
                          str(math.prod(s)) for _, s in prog.inputs) + "}",
                      "#define GRAPHOPT_MODEL_OUTPUT_SIZES {" + ", ".join(
                          str(math.prod(s)) for _, s in prog.outputs) + "}",
                      "float *graphopt_model_input(int index);",
                      "const float *graphopt_model_output(int index);",
                      "/* Runs the model on the inputs in the arena. Returns 0. */",
                      "int graphopt_model_invoke(void);"]
        lines += ["", "/* Runs the model: inputs, then outputs, in the order above"
                      + (" (copied into and out of the arena)" if self.io_in_arena else "")
                      + ". Returns 0. */",
                  f"int graphopt_model_run({self._params()});",
                  "/* The same with the inputs (outputs) concatenated in one array. */",
                  "int graphopt_model_run_packed(const float *inputs, float *outputs);",
                  "", "#endif", ""]
        return "\n".join(lines)

    def _params(self) -> str:
        ins = [f"const float *{self.params[n]}" for n, _ in self.program.inputs]
        outs = [f"float *{self.params[n]}" for n, _ in self.program.outputs]
        return ", ".join(ins + outs)

    def _io_functions(self) -> str:
        """With the inputs and outputs in the arena: their addresses, ``invoke``, and
        ``run`` copying the caller's arrays in and out around it."""
        prog = self.program
        text = ""
        for kind, tensors, const in (("input", prog.inputs, ""),
                                     ("output", prog.outputs, "const ")):
            cases = "".join(f"    case {i}: return graphopt_arena + "
                            f"{self.plan.offset(n) // 4};\n"
                            for i, (n, _) in enumerate(tensors))
            text += (f"{const}float *graphopt_model_{kind}(int index)\n{{\n"
                     f"    switch (index) {{\n{cases}    default: return 0;\n    }}\n}}\n\n")
        copies_in = "".join(
            f"    memcpy(graphopt_arena + {self.plan.offset(n) // 4}, {self.params[n]}, "
            f"{math.prod(shape)} * sizeof(float));\n" for n, shape in prog.inputs)
        copies_out = "".join(
            f"    memcpy({self.params[n]}, graphopt_arena + {self.plan.offset(n) // 4}, "
            f"{math.prod(shape)} * sizeof(float));\n" for n, shape in prog.outputs)
        return text + f"int graphopt_model_run({self._params()})\n{{\n{copies_in}" \
            f"    graphopt_model_invoke();\n{copies_out}    return 0;\n}}\n\n"

    def source(self) -> str:
        arena_floats = max(self.plan.arena_bytes // 4, 1)
        body = "\n".join(self.calls)
        head = [f"/* {self.model_name}: generated by graphopt (target mcu). Weights are "
                f"static const (flash);", " * activations live in one static arena at the "
                "offsets of manifest.json's plan. */",
                "#include <math.h>", "", f'#include "{HEADER}"',
                '#include "graphopt_kernels.h"',
                "", "#if defined(__GNUC__)",
                f"#define GRAPHOPT_ALIGNED __attribute__((aligned({ALIGNMENT})))", "#else",
                "#define GRAPHOPT_ALIGNED", "#endif", "",
                f"static float graphopt_arena[{arena_floats}] GRAPHOPT_ALIGNED;", ""]
        arena = "    float *const A = graphopt_arena;\n" if self.uses_arena else ""
        if self.uses_arena8:
            arena += "    int8_t *const A8 = (int8_t *)(void *)graphopt_arena;\n"
        used = self.uses_arena or self.uses_arena8
        unused = "" if used else "    (void)graphopt_arena;\n"
        packed = []
        for tensors, arg in ((self.program.inputs, "inputs"),
                             (self.program.outputs, "outputs")):
            at = 0
            for _, shape in tensors:
                packed.append(f"{arg} + {at}")
                at += math.prod(shape)
        if not used:
            head.append("/* (this model needs no arena: every tensor is an input or "
                        "output) */")
        if self.io_in_arena:
            head.insert(head.index("#include <math.h>") + 1, "#include <string.h>")
            run = f"int graphopt_model_invoke(void)\n{{\n{arena}{body}\n{unused}" \
                f"    return 0;\n}}\n\n" + self._io_functions()
        else:
            run = f"int graphopt_model_run({self._params()})\n{{\n{arena}{body}\n" \
                f"{unused}    return 0;\n}}\n\n"
        return "\n".join(head) + "\n" + "".join(self.decls) + "\n" + run + \
            "int graphopt_model_run_packed(const float *inputs, float *outputs)\n{\n" \
            f"    return graphopt_model_run({', '.join(packed)});\n}}\n"


def generate(program: Program, plan: Plan, model_name: str,
             io_in_arena: bool = False) -> tuple[str, str, int]:
    """``(model.h, model.c, weight bytes)``; ``io_in_arena``: the plan holds the inputs
    and outputs too, and the API gives their addresses (see ``_io_functions``)."""
    emitter = _Emitter(program, plan, model_name, io_in_arena)
    for i, op in enumerate(program.ops):
        emitter.emit(i, op)
    source = emitter.source()  # before the header: it counts the weights
    return emitter.header(), source, emitter.weight_bytes
