"""A ``web`` artifact folder run by Node.js instead of a browser: the same ONNX Runtime Web
files the folder carries (``ort-web/``: the wasm build imports and runs in Node as it
does in a page), no Chromium, no playwright. A cheaper check where no browser is
installed; it says nothing about a browser's speed, and WebGPU needs a browser.

One ``node`` process per call: it reads a job (the folder, the inputs as ``{dtype, shape,
data}`` with base64 data, the number of timed runs) from a JSON file, creates the session
as ``run.js`` does (the manifest's model, its external-data files, the wasm provider, one
thread), runs it and writes the outputs (and the run times) as JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from graphopt.errors import GraphoptError, UsageError
from graphopt.targets.web_browser import _version, decode, encode

NODE_MAJOR = 18  # onnxruntime-web's wasm build needs fetch-free file loading and ESM
TIMEOUT_S = 600

SCRIPT = r"""
import {readFileSync, writeFileSync} from 'node:fs';
import {pathToFileURL} from 'node:url';
import path from 'node:path';

const [jobFile, outFile] = process.argv.slice(2);
const job = JSON.parse(readFileSync(jobFile, 'utf8'));
const folder = job.folder;
const manifest = JSON.parse(readFileSync(path.join(folder, 'manifest.json'), 'utf8'));
const runtime = manifest.onnxruntime_web;
const ort = await import(pathToFileURL(path.join(folder, runtime.entry)).href);
ort.env.wasm.wasmPaths = pathToFileURL(path.join(folder, 'ort-web') + path.sep).href;
ort.env.wasm.numThreads = 1;
ort.env.logLevel = 'warning';
const TYPED = {
  float32: Float32Array, float64: Float64Array, int8: Int8Array, uint8: Uint8Array,
  int16: Int16Array, uint16: Uint16Array, int32: Int32Array, uint32: Uint32Array,
  int64: BigInt64Array, uint64: BigUint64Array, bool: Uint8Array, float16: Uint16Array,
};
const modelFile = manifest.session_model || manifest.model;
const external = manifest.session_model ? [] : manifest.external_data.map(
  f => ({path: f, data: new Uint8Array(readFileSync(path.join(folder, f)))}));
const session = await ort.InferenceSession.create(
  new Uint8Array(readFileSync(path.join(folder, modelFile))),
  {executionProviders: ['wasm'], graphOptimizationLevel: 'all', externalData: external});
const feeds = {};
for (const [name, t] of Object.entries(job.feeds)) {
  const bytes = Buffer.from(t.data, 'base64');
  const Typed = TYPED[t.dtype];
  const copy = new Uint8Array(bytes);  // aligned for the typed array
  feeds[name] = new ort.Tensor(t.dtype === 'bool' ? 'bool' : t.dtype,
                               new Typed(copy.buffer, 0, copy.byteLength / Typed.BYTES_PER_ELEMENT),
                               t.shape);
}
const outputs = {};
for (const [name, t] of Object.entries(await session.run(feeds))) {
  const data = Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);
  outputs[name] = {dtype: t.type, shape: t.dims, data: data.toString('base64')};
}
const ms = [];
for (let i = 0; i < job.repeat; i++) {
  const t0 = performance.now();
  await session.run(feeds);
  ms.push(performance.now() - t0);
}
writeFileSync(outFile, JSON.stringify({outputs, ms, node: process.version,
                                       onnxruntime_web: ort.env.versions.web}));
"""


def node_path() -> str | None:
    return shutil.which("node")


def node_version(path: str) -> str | None:
    return _version(path)  # ``--version``, as for Chromium


def why_unavailable() -> str | None:
    """``None`` when a web folder can run in Node.js here, else what is missing."""
    path = node_path()
    if path is None:
        return "Node.js is missing (Debian: apt-get install nodejs)"
    version = node_version(path) or ""
    try:
        major = int(version.lstrip("v").split(".")[0])
    except ValueError:
        return f"cannot tell the version of {path} ({version!r})"
    if major < NODE_MAJOR:
        return f"Node.js {version} is too old: onnxruntime-web needs {NODE_MAJOR} or newer"
    return None


def run(folder: Path, feeds: dict[str, np.ndarray], repeat: int = 0
        ) -> tuple[dict[str, np.ndarray], list[float], str]:
    """``(outputs, seconds of each of `repeat` timed runs, where it ran)`` of the folder's
    model on ``feeds`` in Node.js."""
    missing = why_unavailable()
    if missing:
        raise UsageError(f"cannot run the web artifact in Node.js: {missing}")
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory(prefix="graphopt-node-") as tmp:
        job, out, script = Path(tmp) / "job.json", Path(tmp) / "out.json", \
            Path(tmp) / "run.mjs"
        script.write_text(SCRIPT)
        job.write_text(json.dumps({"folder": str(folder), "feeds": encode(feeds),
                                   "repeat": int(repeat)}))
        try:
            done = subprocess.run([node_path(), str(script), str(job), str(out)],
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise GraphoptError(f"Node.js ran past {TIMEOUT_S} s on {folder}") from exc
        if done.returncode != 0 or not out.is_file():
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise GraphoptError(f"the model failed in Node.js: "
                                f"{lines[-1] if lines else 'exit ' + str(done.returncode)}")
        result = json.loads(out.read_text())
    outputs = {name: decode(t) for name, t in result["outputs"].items()}
    where = (f"this machine's Node.js {result['node']} (no browser), onnxruntime-web "
             f"{result['onnxruntime_web']} wasm, 1 thread")
    return outputs, [ms / 1e3 for ms in result["ms"]], where
