"""Convert an ONNX model to ``.tflite`` with onnx2tf, for ``litert_target.py --onnx2tf``.

    PYTHON benchmarks/onnx2tf_convert.py MODEL.onnx OUT_DIR [--int8 CALIBRATION.npz]
                                         [--input-shape NAME=1x3x224x224 ...]

Runs under an interpreter with TensorFlow and onnx2tf (a virtualenv of its own: they do
not belong in graphopt's environment), so it imports neither graphopt nor the project.
Writes ``OUT_DIR/float32.tflite`` and, with ``--int8``, ``OUT_DIR/int8.tflite``: onnx2tf's
``integer_quant`` file (int8 weights and activations, float32 inputs and outputs, as
graphopt's full-integer files have), calibrated on the arrays of the ``.npz`` (one per
input name, NCHW as the ONNX model takes them; onnx2tf wants images NHWC, with mean 0
and std 1 the data is used as it is). A model with Erf gets onnx2tf's replacement of it
by builtin operators (``replace_to_pseudo_operators``): stock LiteRT has no Erf.
For models with 3-channel image inputs onnx2tf fetches 20 sample images from GitHub to
check its own conversion (``download_test_image_data``); offline, random images of that
shape stand in (in the conversion's working folder): the files written do not depend on
them, and ``--int8`` calibrates on its own data.
Prints one JSON line: the files, the conversion's wall seconds and peak RSS, versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--int8", type=Path, metavar="CALIBRATION.npz")
    parser.add_argument("--input-shape", action="append", default=[],
                        metavar="NAME=1x3x224x224")
    args = parser.parse_args()

    import onnx2tf
    import tensorflow as tf

    model = onnx.load(args.model, load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    shapes = [f"{name}:{dims.replace('x', ',')}"
              for name, _, dims in (s.rpartition("=") for s in args.input_shape)]
    # (no copy_onnx_input_output_names_to_tflite: it needs flatc and fetches TensorFlow's
    # schema.fbs from GitHub; the files keep TensorFlow's "serving_default_NAME:0" names)
    options = {"overwrite_input_shape": shapes or None, "non_verbose": True,
               # (the Python API wants the lower-case names its CLI makes of -rtpo's)
               "replace_to_pseudo_operators": ["erf"] if "Erf" in ops else None}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.int8:
            data = np.load(args.int8)
            calibration = []
            for name in data.files:
                array = data[name]
                if array.ndim == 4:  # NCHW -> NHWC, as onnx2tf feeds its Keras model
                    array = array.transpose(0, 2, 3, 1)
                path = Path(tmp) / f"{name}.npy"
                np.save(path, array.astype(np.float32))
                zeros = np.zeros((1,) * array.ndim, np.float32)
                calibration.append([name, str(path), zeros, zeros + 1])
            options.update(output_integer_quantized_tflite=True,
                           custom_input_op_name_np_data_path=calibration)
        folder = Path(tmp) / "saved_model"
        samples = np.random.default_rng(0).standard_normal((20, 128, 128, 3))
        np.save(Path(tmp) / "calibration_image_sample_data_20x128x128x3_float32.npy",
                samples.astype(np.float32))
        # onnx2tf overwrites the file it is given with onnxsim's output: give it a copy
        # (with any external data files beside it)
        model_path, here = Path(tmp) / args.model.name, os.getcwd()
        shutil.copy(args.model, model_path)
        for tensor in onnx.external_data_helper._get_all_tensors(model):
            for entry in tensor.external_data:
                if entry.key == "location" and not (Path(tmp) / entry.value).exists():
                    (Path(tmp) / entry.value).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(args.model.parent / entry.value, Path(tmp) / entry.value)
        os.chdir(tmp)
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                onnx2tf.convert(input_onnx_file_path=str(model_path),
                                output_folder_path=str(folder), **options)
        finally:
            os.chdir(here)
        seconds = time.perf_counter() - start
        made = {"float32": None, "int8": None}
        # "_integer_quant" is int8 inside with float32 inputs and outputs; the glob also
        # matches "_full_integer_quant" (int8 inputs and outputs), which is not wanted here
        for kind, suffix in (("float32", "_float32.tflite"), ("int8", "_integer_quant.tflite")):
            found = sorted(f for f in folder.glob(f"*{suffix}")
                           if not f.name.endswith("_full_integer_quant.tflite"))
            if found:
                made[kind] = str(shutil.copy(found[0], args.out / f"{kind}.tflite"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({**made, "seconds": round(seconds, 2), "peak_rss_mb": round(peak),
                      "onnx2tf": onnx2tf.__version__, "tensorflow": tf.__version__,
                      "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
