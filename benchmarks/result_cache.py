"""``--cache-dir``: how much faster a cached ``graphopt optimize`` run is than the first.

    python benchmarks/result_cache.py [--models bert_minilm,resnet18]

Each model (tests/zoo.py, written to a temporary folder) is optimized twice for the
``ort`` target with the same cache folder: by the command line, each run in its own
process (wall time from process start to exit: Python importing graphopt and its
dependencies is in both), and by the library in this process (``graphopt.optimize(...,
cache_dir=...)``). Prints the times and their ratios and checks the outputs of the two
runs are byte-identical.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import zoo  # noqa: E402


def run(model: Path, out: Path, cache: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(model), "-o",
                    str(out), "--cache-dir", str(cache)], check=True, capture_output=True)
    return time.perf_counter() - start


def in_process(model: Path, out: Path, cache: Path) -> float:
    import graphopt

    start = time.perf_counter()
    graphopt.optimize(str(model), output=out, cache_dir=cache)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert_minilm,resnet18,mobilenet_v2")
    args = parser.parse_args()
    print(f"{'model':16s} {'CLI first':>10s} {'cached':>8s} {'ratio':>6s}   "
          f"{'library first':>13s} {'cached':>8s} {'ratio':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            model = tmp / f"{name}.onnx"
            model.write_bytes(getattr(zoo, name)().SerializeToString())
            first = run(model, tmp / name / "a.onnx", tmp / "cache")
            cached = run(model, tmp / name / "b" / "a.onnx", tmp / "cache")
            lib_first = in_process(model, tmp / name / "c.onnx", tmp / "lib-cache")
            lib_cached = in_process(model, tmp / name / "d" / "c.onnx", tmp / "lib-cache")
            same = (tmp / name / "a.onnx").read_bytes() == \
                (tmp / name / "b" / "a.onnx").read_bytes() == \
                (tmp / name / "d" / "c.onnx").read_bytes()
            print(f"{name:16s} {first:9.2f}s {cached:7.2f}s {first / cached:5.1f}x   "
                  f"{lib_first:12.2f}s {lib_cached:7.2f}s {lib_first / lib_cached:5.1f}x"
                  f"{'' if same else '  OUTPUTS DIFFER'}")


if __name__ == "__main__":
    main()
