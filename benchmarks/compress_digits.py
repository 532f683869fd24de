"""Channel pruning of the digits CNN: graphopt (searched under a budget, with and without
recovery, then int8) against onnxsim's structured pruning with its recoveries.

    python benchmarks/compress_digits.py [--tolerance 0.99] [--repeats 30]
        [--calibration 1000] [--finetune]

No labels are used to compress (and no gradients, unless ``--finetune`` adds the variant
recovered by distillation, ``--recover finetune``): calibration is the first
``--calibration`` (default 1000) unlabeled training images, the budget is the mean output cosine to the original on 257 training
images the network never saw (tests/digits.py), and the test accuracy is measured on the
540 test images (with ``--calibration 256 --finetune`` on a 2-core AVX2 CPU: the re-fit
search keeps 0.243x of the MACs at +0.19 points, distillation 0.113x at -0.56 points,
0.157x latency at batch 256, in 49 s). Prints, per variant: MACs of the conv/gemm layers relative to the original, test
accuracy, ONNX Runtime latency (1 thread, median of interleaved runs) at batch 256 and
batch 1 relative to the original, and the file size.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphopt  # noqa: E402
from graphopt.accuracy import median_latency  # noqa: E402
from graphopt.analysis import summarize  # noqa: E402
from graphopt.ir import Model  # noqa: E402
from graphopt.targets.ort import LOSSLESS_PIPELINE, cpu_flags, host_device  # noqa: E402
from tests.digits import (TRAINED_ON, accuracy, digits_cnn, digits_data,  # noqa: E402
                          validation_split)


def macs(proto: onnx.ModelProto) -> float:
    summary = summarize(Model.from_proto(proto), host_device())
    return summary.flops / 2


def graphopt_variant(proto, passes, schemes, recovery, calib, val, tolerance, goal="flops"):
    start = time.perf_counter()
    result = graphopt.optimize(proto, passes=passes, schemes=schemes, calibration=calib,
                               validation=val, metric="mean-cosine", tolerance=tolerance,
                               goal=goal, recovery=recovery)
    seconds = time.perf_counter() - start
    info = result.report["compression"]["passes"]
    note = "; ".join(f"{name}: {p.get('status')} {p.get('reason', '')} " + ", ".join(
        f"{site} {entry['setting']}" for site, entry in p.get("sites", {}).items()
        if entry.get("changed")) for name, p in info.items())
    choice = {site: entry["setting"] for p in info.values()
              for site, entry in p.get("sites", {}).items() if entry.get("changed")}
    return result.model.to_onnx(), seconds, note, choice


def without_recovery(proto, choice, calib) -> onnx.ModelProto:
    """The settings graphopt chose, applied with recovery off."""
    from graphopt.pass_infra import PassContext
    from graphopt.passes.prune.channels import PruneChannels
    from graphopt.targets.ort import OrtTarget

    target = OrtTarget()
    ctx = PassContext(target=target, device=target.device, calibration=[calib])
    p = PruneChannels()
    model = Model.from_proto(proto)
    p.sites(model, ctx)
    p.apply(model, choice, ctx)
    return model.to_onnx()


def onnxsim_variants(proto, calib_batches, sparsities):
    """onnxsim 0.8's calibrated structured pruning, alone and with its recoveries."""
    try:
        import onnxsim
        from onnxsim.bn_recovery import recover_batch_norm
        from onnxsim.finetune import apply_pruning_finetune
    except ImportError as exc:
        return {f"onnxsim (not installed: {exc})": None}
    out = {}
    for s in sparsities:
        pruned = onnxsim.apply_structured_wanda_pruning(proto, calibration_data=calib_batches,
                                                        sparsity=s)
        out[f"onnxsim structured wanda {s:.0%}"] = pruned
        try:
            out[f"onnxsim {s:.0%} + BN recovery"] = recover_batch_norm(
                pruned, calibration_data=calib_batches, target_model=proto)
        except Exception as exc:  # report, do not hide
            out[f"onnxsim {s:.0%} + BN recovery (failed: {type(exc).__name__})"] = None
        try:
            out[f"onnxsim {s:.0%} + ridge finetune"] = apply_pruning_finetune(
                proto, pruned, calibration_data=calib_batches)
        except Exception as exc:
            out[f"onnxsim {s:.0%} + ridge finetune (failed: {type(exc).__name__})"] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.99,
                        help="mean output cosine budget on the held-out validation images")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=TRAINED_ON,
                        help="unlabeled training images to calibrate (and fine-tune) on")
    parser.add_argument("--finetune", action="store_true",
                        help="add the search recovered by distillation (finetune)")
    args = parser.parse_args()

    xtr, _, xte, yte = digits_data()
    xval, _ = validation_split()
    calib = {"input": xtr[:min(args.calibration, TRAINED_ON)]}
    val = {"input": xval}
    original = digits_cnn()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    print(f"CPU: {platform.processor() or platform.machine()}, flags {', '.join(flags)}")
    print(f"budget: mean output cosine >= {args.tolerance} on {len(xval)} unseen images; "
          f"calibration: {len(calib['input'])} unlabeled training images")

    variants: dict[str, onnx.ModelProto | None] = {"original (fp32)": original}
    notes, times = {}, {}
    lossless = list(LOSSLESS_PIPELINE)
    for label, passes, recovery in [
            ("graphopt prune + recover", lossless, "recover"),
            ("graphopt prune + recover + int8", [*lossless, "quantize-int8(require-speedup="
                                                 "false)"], "recover"),
            ("graphopt prune searched without recovery", lossless, None),
            *([("graphopt prune + finetune (distillation)", lossless,
                "finetune(loss=kl)")] if args.finetune else [])]:
        try:
            proto, seconds, note, choice = graphopt_variant(
                original, passes, {"prune": "channels"}, recovery, calib, val, args.tolerance)
        except graphopt.errors.GraphoptError as exc:
            variants[f"{label} (failed: {exc})"] = None
            continue
        variants[label], times[label], notes[label] = proto, seconds, note
        if label == "graphopt prune + recover":
            variants["  same settings, recovery off"] = without_recovery(original, choice,
                                                                         calib)
    variants.update(onnxsim_variants(original, [{"input": xtr[i:i + 32]}
                                                for i in range(0, 256, 32)], (0.25, 0.5)))

    base_macs = macs(original)
    base_acc = accuracy(original, xte, yte)
    runnable = {k: v for k, v in variants.items() if v is not None}
    big, one = {"input": xte[:256]}, {"input": xte[:1]}
    lat_big = dict(zip(runnable, median_latency(list(runnable.values()), big,
                                                repeats=args.repeats)))
    lat_one = dict(zip(runnable, median_latency(list(runnable.values()), one,
                                                repeats=args.repeats * 10)))
    head = f"{'variant':44} {'MACs':>7} {'test acc':>9} {'Δ pts':>6} {'lat b256':>9} " \
           f"{'lat b1':>7} {'size KB':>8} {'tool s':>7}"
    print(head)
    print("-" * len(head))
    for label, proto in variants.items():
        if proto is None:
            print(f"{label:44} {'—':>7}")
            continue
        acc = accuracy(proto, xte, yte)
        size = len(proto.SerializeToString()) / 1024
        print(f"{label:44} {macs(proto) / base_macs:6.3f}x {acc * 100:8.2f}% "
              f"{(acc - base_acc) * 100:+6.2f} {lat_big[label] / lat_big['original (fp32)']:8.3f}x "
              f"{lat_one[label] / lat_one['original (fp32)']:6.3f}x {size:8.1f} "
              f"{times.get(label, float('nan')):7.1f}")
    print(f"original: {lat_big['original (fp32)'] * 1e3:.3f} ms at batch 256, "
          f"{lat_one['original (fp32)'] * 1e6:.1f} us at batch 1")
    for label, note in notes.items():
        print(f"{label}: {note}")


if __name__ == "__main__":
    main()
