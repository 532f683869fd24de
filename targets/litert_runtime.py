"""LiteRT's interpreter for the litert target's ``run``: one per ``.tflite`` version and
thread count, kept until released, fed in the shapes the file takes (``chunks``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphopt.errors import UsageError
from graphopt.target import read_manifest


def chunks(arrays: dict[str, np.ndarray], inputs: dict[str, dict],
           per_sample: bool) -> list[dict[str, np.ndarray]]:
    """The feeds as the ``.tflite`` takes them: as they are when their shapes match;
    split into samples when the model was lowered at batch 1 for a symbolic batch."""
    if all(list(a.shape) == inputs[n]["shape"] for n, a in arrays.items()):
        return [arrays]
    if all(resizable_to(a.shape, inputs[n]) for n, a in arrays.items()):
        return [arrays]  # resizable dimensions: the interpreter is resized to them
    batches = {a.shape[0] for a in arrays.values() if a.ndim}
    if per_sample and len(batches) == 1 and all(
            a.ndim and resizable_to((1, *a.shape[1:]), inputs[n]) for n, a in arrays.items()):
        return [{n: a[i:i + 1] for n, a in arrays.items()} for i in range(batches.pop())]
    wanted = ", ".join(f"{n}={'x'.join(map(str, s['shape']))}" for n, s in inputs.items())
    got = ", ".join(f"{n}={'x'.join(map(str, a.shape))}" for n, a in arrays.items())
    raise UsageError(f"the .tflite was lowered at {wanted}; the feeds are {got}",
                     hint="lower it again with --input-shape at the shapes you feed")


def resizable_to(shape: tuple[int, ...], spec: dict) -> bool:
    """Whether an input lowered as ``spec`` takes a feed of ``shape``: each dimension
    as lowered or resizable (``-1`` in its shape signature)."""
    signature = spec.get("shape_signature", spec["shape"])
    return len(shape) == len(signature) and all(
        want in (-1, got) for got, want in zip(shape, signature))


# (path, mtime_ns, threads) -> (manifest, run): the interpreters ``run`` keeps, oldest
# first; ``LiteRtTarget.release`` removes a file's.
INTERPRETERS: dict[tuple[str, int, int], tuple[dict, object]] = {}
KEPT = 8


def interpreter(path: str, mtime_ns: int, threads: int):
    """One interpreter per file version and thread count (creating one, and XNNPACK's
    weight packing, cost more than a small model's run), kept until ``release`` (or
    until ``KEPT`` newer ones were made): ``(the manifest beside the file, run(feeds))``."""
    key = (path, mtime_ns, threads)
    if key in INTERPRETERS:
        INTERPRETERS[key] = INTERPRETERS.pop(key)  # the most recently used: kept longest
        return INTERPRETERS[key]
    made = new_interpreter(path, threads)
    INTERPRETERS[key] = made
    while len(INTERPRETERS) > KEPT:
        del INTERPRETERS[next(iter(INTERPRETERS))]
    return made


def new_interpreter(path: str, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    manifest = read_manifest(Path(path).parent)
    if manifest.get("custom_ops"):
        raise UsageError(f"{path} holds custom operators ({', '.join(manifest['custom_ops'])})"
                         f" that stock LiteRT has no kernels for: it cannot run here",
                         hint="the app that registers their kernels runs it")
    interpreter = Interpreter(model_path=path, num_threads=threads)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    ins = {d["name"]: d["index"] for d in details}
    shapes = {d["name"]: list(d["shape"]) for d in details}  # resized to the feeds
    outs = {d["name"]: d["index"] for d in interpreter.get_output_details()}

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if any(list(array.shape) != shapes[name] for name, array in feeds.items()):
            for name, array in feeds.items():  # resizable dimensions at other sizes
                interpreter.resize_tensor_input(ins[name], list(array.shape))
                shapes[name] = list(array.shape)
            interpreter.allocate_tensors()
        for name, array in feeds.items():
            interpreter.set_tensor(ins[name], array)
        interpreter.invoke()
        return {name: interpreter.get_tensor(index) for name, index in outs.items()}

    return manifest, run


def litert_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-edge-litert")
    except PackageNotFoundError:
        return None
