"""Which of the lossless passes pay on the TVM target: an ablation measured on this CPU.

    python benchmarks/tvm_pipeline.py [--models mobilenet_cnn,bert_tiny] [--repeat 50]

For each model (tests/zoo.py, batch 1, BERT sequence 64) this lowers it for ``--target
x86`` (TVM, untuned) with the x86 pipeline, with no graphopt pass at all, and with the
pipeline minus each pass that changed the model, and times each library on this machine
(TVM's time_evaluator, median of ``--repeat`` runs). A pass whose removal makes the
library faster does not pay on TVM here. Prints the CPU flags it ran with.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt.errors import GraphoptError  # noqa: E402
from graphopt.target import cpu_flags  # noqa: E402
from tests import zoo  # noqa: E402

MODELS = {
    "mobilenet_cnn": lambda: (zoo.mobilenet_cnn(), {"input": [1, *zoo.CNN_INPUT]}),
    "resnet_cnn": lambda: (zoo.resnet_cnn(), {"input": [1, *zoo.CNN_INPUT]}),
    "bert_tiny": lambda: (zoo.bert_tiny(), {"input_ids": [1, 64], "attention_mask": [1, 64]}),
}


def _feeds(proto, shapes, seed=0):
    from graphopt import verify

    return verify.probe_inputs(proto, seed=seed, shapes=shapes)[0]


def _time(proto, shapes, feeds, passes, repeat, tmp: Path, label: str):
    """(median seconds, the optimize result), or (None, why) where TVM cannot build it."""
    target = graphopt.get_target("x86")
    try:
        result = graphopt.optimize(proto, target="x86", input_shapes=shapes, passes=passes,
                                   output=tmp / label)
    except GraphoptError as exc:
        return None, str(exc).splitlines()[0]
    return target.measure(result.artifact, feeds, repeat=repeat), result


def _ms(seconds, full) -> str:
    return f"{seconds * 1e3:8.3f} ms  ({seconds / full:.2f}x)" if seconds else "fails"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_cnn,bert_tiny")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni"})
    print(f"CPU flags: {', '.join(flags)}; TVM untuned, 1 model at a time")
    for name in args.models.split(","):
        proto, shapes = MODELS[name]()
        feeds = _feeds(proto, shapes)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            start = time.perf_counter()
            full, result = _time(proto, shapes, feeds, None, args.repeat, tmp, "full")
            # the passes of the target's pipeline that ran (those writing ops TVM lacks
            # are left out by the target itself)
            pipeline = list(dict.fromkeys(e["pass_name"] for e in result.report["trace"]))
            changed = sorted({e["pass_name"] for e in result.report["trace"]
                              if e["changed"]} - {"eliminate-dead-code"})
            bare, why = _time(proto, shapes, feeds, ["eliminate-dead-code"], args.repeat,
                              tmp, "bare")
            print(f"\n{name}: x86 pipeline {full * 1e3:.3f} ms; changed: {', '.join(changed)}")
            print(f"  no graphopt pass                   {_ms(bare, full)}"
                  + ("" if bare else f": {why}"))
            for p in changed:
                t, why = _time(proto, shapes, feeds, [q for q in pipeline if q != p],
                               args.repeat, tmp, f"minus-{p}")
                print(f"  without {p:26s} {_ms(t, full)}" + ("" if t else f": {why}"))
            # the full pipeline again: how far one library's figure moves between runs
            again, _ = _time(proto, shapes, feeds, None, args.repeat, tmp, "again")
            print(f"  the pipeline again                 {_ms(again, full)}   "
                  f"[{time.perf_counter() - start:.0f} s]")


if __name__ == "__main__":
    main()
