"""``--cache-dir``: how much faster a cached ``graphopt optimize`` run is than the first.

    python benchmarks/result_cache.py [--models bert_minilm,resnet18]

Each model (tests/zoo.py, written to a temporary folder) is optimized twice for the
``ort`` target by the command line, in its own process, with the same ``--cache-dir``;
prints both wall times (process start to exit, interpreter start-up included) and their
ratio, and checks the two outputs are byte-identical.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert_minilm,resnet18,mobilenet_v2")
    args = parser.parse_args()
    print(f"{'model':16s} {'first':>9s} {'cached':>9s} {'ratio':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            model = tmp / f"{name}.onnx"
            model.write_bytes(getattr(zoo, name)().SerializeToString())
            first = run(model, tmp / name / "a.onnx", tmp / "cache")
            cached = run(model, tmp / name / "b" / "a.onnx", tmp / "cache")
            same = (tmp / name / "a.onnx").read_bytes() == \
                (tmp / name / "b" / "a.onnx").read_bytes()
            print(f"{name:16s} {first:8.2f}s {cached:8.2f}s {first / cached:6.1f}x"
                  f"{'' if same else '  OUTPUTS DIFFER'}")


if __name__ == "__main__":
    main()
