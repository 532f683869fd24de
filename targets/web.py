"""ONNX Runtime Web in a browser (wasm execution provider). ``lower`` writes a folder::

    out/model.onnx            the optimized model (as the ``ort`` target writes it)
    out/model.onnx.data[.N]   its weights, for a model over the external-data threshold,
                              in files under 2 GB each (a browser ArrayBuffer's limit)
    out/manifest.json         inputs/outputs (dtype, shape), external-data files, the
                              onnxruntime-web version and files, hashes
    out/model.ort             with ``format="ort"`` (``--format ort``) only: ONNX Runtime's
                              own format of the model, which the page then loads instead
    out/index.html, run.js    the page: loads the model with ``ort.InferenceSession.create``
    out/ort-web/              onnxruntime-web's wasm-only ES module, its Emscripten module
                              and WebAssembly binary, copied from the npm package

The page takes nothing from the network: ``env.wasm.wasmPaths`` points at ``ort-web/``.
Served with the cross-origin isolation headers (``python -m graphopt.targets.web_browser
out``) it runs on wasm threads.

The wasm build is ONNX Runtime's CPU execution provider compiled to WebAssembly: the
same graph optimizer, the same contrib ops (FusedConv, SkipLayerNormalization, ...) and
the same QDQ int8 kernels. So the ``ort`` target's pipeline is right here too; what
differs is the runtime around it (``run``/``measure`` drive the page in the system's
headless Chromium, ``graphopt.targets.web_browser``) and the device (SIMD128 wasm).
The runtime comes from the npm package ``onnxruntime-web``
(``graphopt.targets.web_install``); without it lowering is refused before any work.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from graphopt.cost import Device
from graphopt.errors import UsageError
from graphopt.external_data import all_tensors
from graphopt.ir import Model, external_threshold, save
from graphopt.paths import TEMP_PREFIX
from graphopt.target import (MANIFEST, Artifact, Capabilities, Target, cpu_model,
                             folder_output, graph_inputs, move_in, sha256, value_info)
from graphopt.targets import web_browser, web_install, web_node, web_page
from graphopt.targets.ort import _CORES, OrtTarget, disabled_optimizers

FORMAT = "graphopt-web/1"
MODEL_FILE = "model.onnx"
ORT_FILE = "model.ort"  # --format ort: what the page loads instead of model.onnx
PAGE_FILE = "index.html"
SCRIPT_FILE = "run.js"
RUNTIME_FOLDER = "ort-web"
# One fetch must fit an ArrayBuffer: 2 GB minus a little in Chromium's V8.
BROWSER_FILE_LIMIT = 2**31 - 2**26
# wasm32 addresses 4 GiB: weights, activations and the runtime must share it.
WASM_MEMORY = 2**32
# The newest ONNX IR version onnxruntime-web 1.31 reads: it refuses IR 14 (onnx >= 1.23
# writes it) with "Unsupported model IR version: 14, max supported IR version: 13". IR 14
# adds no construct graphopt's passes produce, so the written model says 13; the
# verification in the browser catches a model that needed more.
MAX_IR_VERSION = 13


def browser_device(cores: int = _CORES) -> Device:
    """This machine's CPU as ONNX Runtime Web's wasm build uses it. Theoretical peaks from
    the instruction set: wasm SIMD128 has 4 float32 lanes and no fused multiply-add in
    the build ONNX Runtime ships (no relaxed SIMD), so a core does 2 units x 4 lanes x 1
    FLOP per cycle, a quarter of AVX2 with FMA; int8 goes through ``i32x4.dot_i16x8_s``
    (two int8 MACs per 16-bit lane pair, no saturation: ``int8_fast`` is unknown rather
    than False, so the quantizer keeps the full int8 range). Measured on the example CNN
    quantized so: the browser's outputs were 3e-6 from the QDQ graph's values, native ORT's
    AVX2 kernels (16-bit saturation) 0.57."""
    fp32 = max(cores, 1) * 24e9
    return Device(name="browser-wasm", peak_flops={"float32": fp32, "float16": fp32,
                                                   "int8": fp32 * 2.0},
                  bandwidth=20e9, cores=cores, node_overhead_s=4e-6, int8_fast=None,
                  channel_multiple=4)


class WebTarget(Target):
    """ONNX Runtime Web (wasm) in a browser. The pipeline, capabilities and preparation
    are the ``ort`` target's (the same CPU execution provider, compiled to wasm); it is
    delegated to rather than inherited because everything ``OrtTarget`` adds besides
    (``.ort`` format, timing and profiling through the native runtime) would be wrong
    here."""

    name = "web"
    description = "ONNX Runtime Web (wasm) in a browser, verified in headless Chromium here"
    produces = "a folder: model.onnx, manifest.json, index.html, run.js, ort-web/ (wasm)"
    device = browser_device(max(1, min(4, -(-_CORES // 2))))  # ORT Web's default threads
    capabilities = OrtTarget.capabilities
    default_pipeline = OrtTarget.default_pipeline
    pass_defaults = OrtTarget.pass_defaults
    compiled = True  # the browser's runtime, not the ORT the pass manager verified with
    formats = ("onnx", "ort")

    options = {"ep": "wasm (default): ONNX Runtime Web's CPU provider in WebAssembly; "
                     "webgpu: its WebGPU provider (ops it lacks run on the CPU; the report "
                     "says which), verified here on Chromium's software adapter"}

    def __init__(self, threads: int | None = None, ep: str = "wasm",
                 runner: str | None = None):
        """``threads``: wasm threads of the page's session (default: ONNX Runtime Web's,
        half the cores and at most 4; one where the page is not cross-origin isolated).
        On a 2-core machine shared with other work, 2 wasm threads ran the example CNN
        int8 at batch 32 in 37 ms against 18 ms on one: threads that wait for each other
        lose more on a busy machine than native ones do. ``ep``: the execution provider
        the page asks for, ``wasm`` or ``webgpu`` (``WEBGPU``). ``runner``: what runs the
        folder to check it, ``chromium`` (the page, headless), ``node`` (Node.js with the
        folder's own runtime files, no browser; wasm only, one thread) or ``None``:
        Chromium where it can run here, else Node.js."""
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        if runner not in (None, "chromium", "node"):
            raise UsageError(f"unknown runner {runner!r}", hint="chromium or node")
        if runner == "node" and ep == "webgpu":
            raise UsageError("WebGPU needs a browser: Node.js runs the wasm provider only",
                             hint="leave the runner to Chromium")
        self.runner = runner
        self._ran_on: str | None = None
        if ep not in web_install.RUNTIMES:
            raise UsageError(f"unknown execution provider {ep!r}",
                             hint=f"choose one of {', '.join(web_install.RUNTIMES)}")
        self.threads, self.ep = threads, ep
        if threads is not None:
            self.device = browser_device(threads)
        self._ort = OrtTarget(threads)
        if ep == "webgpu":
            self.capabilities = webgpu_capabilities()
            self.description = "ONNX Runtime Web (WebGPU) in a browser, verified in " \
                               "headless Chromium here (software adapter)"

    def with_threads(self, threads: int) -> "WebTarget":
        return WebTarget(threads=threads, ep=self.ep, runner=self.runner)

    def with_runner(self, runner: str | None) -> "WebTarget":
        return WebTarget(self.threads, self.ep, runner)

    def with_options(self, **values: str) -> "WebTarget":
        super().with_options(**values)
        return WebTarget(self.threads, values.get("ep", self.ep), self.runner)

    def option_values(self) -> dict[str, str]:
        return {"ep": self.ep}

    def availability(self) -> str | None:
        problem = web_install.why_missing()
        return None if problem is None else \
            f"{problem}; install it with: {web_install.install_command()}"

    def run_availability(self) -> str | None:
        """Running needs only the folder (it carries the runtime) and Chromium with
        playwright, or (wasm) Node.js."""
        runner = self._chosen_runner()
        if runner == "node":
            return web_node.why_unavailable()
        missing = web_browser.why_unavailable()
        if missing and self.runner is None and self.ep == "wasm":
            missing += f"; nor can Node.js run it instead: {web_node.why_unavailable()}"
        return missing

    def _chosen_runner(self) -> str:
        if self.runner is not None:
            return self.runner
        if self.ep == "wasm" and web_browser.why_unavailable() and \
                web_node.why_unavailable() is None:
            return "node"
        return "chromium"

    def prepare(self, model: Model, input_shapes: dict[str, list[int]] | None) -> None:
        self._ort.prepare(model, input_shapes)

    def fingerprint(self) -> dict:
        folder, _ = web_install.candidate()
        return {"target": self.name, "device": self.device.name, "cpu": cpu_model(),
                "cores": self.device.cores, "threads": self.threads,
                "onnxruntime_web": web_install.package_version(folder),
                "chromium": web_browser.chromium_version()}

    # ------------------------------------------------------------------ lowering
    def lower(self, model: Model, out: Path, *, format: str = "onnx") -> Artifact:
        """Write the folder ``out`` (see the module docstring) atomically: staged beside
        it and moved in; nothing is written when anything fails, the ONNX Runtime Web
        package missing included. ``format="ort"`` adds ``model.ort`` (``_write_ort``),
        which the page loads instead of ``model.onnx``."""
        if format not in self.formats:
            raise UsageError(f"target {self.name!r} does not write format {format!r}",
                             hint=f"formats: {', '.join(self.formats)}")
        out = folder_output(self.name, out, "model.onnx, manifest.json, index.html, ...")
        package = web_install.find_package()
        ort_version = web_install.package_version(package) or "unknown"
        proto = model.to_onnx(references=True)  # weights stay in their file until saved
        del proto.graph.value_info[:]  # as the ort target writes it (see without_value_info)
        ir_version = proto.ir_version
        if ir_version > MAX_IR_VERSION:
            proto.ir_version = MAX_IR_VERSION
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=TEMP_PREFIX))
        try:
            save(proto, stage / MODEL_FILE)
            data_files = _split_external_data(stage / MODEL_FILE,
                                              min(external_threshold(), BROWSER_FILE_LIMIT))
            session = _write_ort(stage, data_files) if format == "ort" else None
            (stage / RUNTIME_FOLDER).mkdir()
            dist = web_install.RUNTIMES[self.ep]
            runtime = [f"{RUNTIME_FOLDER}/{name}" for name in dist]
            for name in dist:
                shutil.copyfile(package / "dist" / name, stage / RUNTIME_FOLDER / name)
            (stage / SCRIPT_FILE).write_text(web_page.run_js(dist[0]))
            (stage / PAGE_FILE).write_text(web_page.index_html(proto.graph.name or "model",
                                                               ort_version))
            files = [MODEL_FILE, *data_files, *([ORT_FILE] if session else []),
                     PAGE_FILE, SCRIPT_FILE, *runtime]
            manifest = _manifest(self, proto, model, stage, files, data_files, runtime,
                                 ort_version)
            if session:
                manifest["session_model"] = ORT_FILE
                manifest["ort_format"] = session
            manifest["ir_version"] = {"model": ir_version, "written": proto.ir_version}
            if self.ep == "webgpu":  # ops outside the provider's table run on the CPU
                # (ONNX Runtime also keeps small integer shape arithmetic there, which only
                # the placement measured in the browser shows)
                def foreign(node) -> bool:
                    return not self.capabilities.supports(node.op_type, node.domain)

                ops: dict[str, int] = {}
                for node in filter(foreign, proto.graph.node):
                    ops[node.op_type] = ops.get(node.op_type, 0) + 1
                manifest["webgpu"] = {"predicted_cpu_ops": dict(sorted(ops.items())),
                                      "predicted_islands": islands(proto.graph, foreign)}
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            files.append(MANIFEST)
            move_in(stage, out, files, FORMAT)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return Artifact(target=self.name, path=out / PAGE_FILE,
                        files=[out / f for f in files], format="onnxruntime-web")

    # ------------------------------------------------------------------ running
    def run(self, artifact: Artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._chosen_runner() == "node":
            outputs, _, self._ran_on = web_node.run(self._folder(artifact), feeds)
            return outputs
        self._ran_on = None
        return self._page(artifact).run(feeds)

    def measure(self, artifact: Artifact, feeds: dict[str, np.ndarray], *,
                repeat: int = 20) -> float | None:
        """Median wall time of ``repeat`` runs in the page (after a warm-up), timed with
        ``performance.now()`` around ``session.run``: this machine's Chromium. ``None``
        for WebGPU on a software adapter (SwiftShader runs the shaders on this CPU: no
        GPU's time)."""
        if self._chosen_runner() == "node":
            _, times, self._ran_on = web_node.run(self._folder(artifact), feeds,
                                                  max(repeat, 1))
            return statistics.median(times)
        page = self._page(artifact)
        if (page.facts.get("adapter") or {}).get("software"):
            return None
        return statistics.median(page.time(feeds, max(repeat, 1)))

    def ran_on(self) -> str | None:
        return self._ran_on or web_browser.last_run()

    def run_details(self) -> dict:
        """For WebGPU: where ONNX Runtime placed the nodes (per provider, the CPU's op
        types, the copies between GPU and CPU memory)."""
        if self._ran_on:  # Node.js: no placement to tell
            return {}
        facts = web_browser.last_facts() or {}
        return {"placement": facts["placement"]} if facts.get("placement") else {}

    def _folder(self, artifact: Artifact) -> Path:
        folder = Path(artifact.path).parent
        if not (folder / MANIFEST).is_file() or not (folder / PAGE_FILE).is_file():
            raise UsageError(f"{folder} is not a web artifact folder (no {MANIFEST} and "
                             f"{PAGE_FILE})", hint="lower the model with --target web")
        return folder

    def _page(self, artifact: Artifact) -> web_browser.Page:
        folder = self._folder(artifact)
        missing = web_browser.why_unavailable()
        if missing:
            raise UsageError(f"cannot run the web artifact here: {missing}")
        page = web_browser.page(folder, self.threads, placement=self.ep == "webgpu")
        placement = page.facts.get("placement")
        if placement is not None and "islands" not in placement:
            model = onnx.load(folder / MODEL_FILE, load_external_data=False)
            names = set(placement["cpu_nodes"])  # (nodes ONNX Runtime added are not in it)
            placement["islands"] = islands(model.graph, lambda n: bool(n.name) and
                                           n.name in names)
        return page


# ---------------------------------------------------------------------- helpers
def _manifest(target: WebTarget, proto: onnx.ModelProto, model: Model, stage: Path,
              files: list[str], data_files: list[str], runtime: list[str],
              ort_version: str) -> dict:
    from graphopt.api import graphopt_version

    weights = sum((stage / f).stat().st_size for f in [MODEL_FILE, *data_files])
    if weights > WASM_MEMORY * 7 // 8:
        logging.getLogger("graphopt").warning(
            "target web: the model's %.2f GB leave little of wasm32's 4 GiB for "
            "activations; it may not load in a browser", weights / 1e9)
    return {
        "format": FORMAT,
        "target": target.name,
        "description": target.description,
        "artifact": PAGE_FILE,
        "artifact_format": "onnxruntime-web",
        "model": MODEL_FILE,
        "page": PAGE_FILE,
        "script": SCRIPT_FILE,
        "inputs": [value_info(v) for v in graph_inputs(proto)],
        "outputs": [value_info(v) for v in proto.graph.output],
        "external_data": data_files,
        "onnxruntime_web": {"version": ort_version, "package": web_install.PACKAGE,
                            "execution_provider": target.ep, "entry": runtime[0],
                            "files": runtime},
        "serve": {"headers": {k: v for k, v in web_browser.HEADERS.items()
                              if k.startswith("Cross-Origin")},
                  "command": "python -m graphopt.targets.web_browser FOLDER"},
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                      None),
        "graphopt_version": graphopt_version(),
        "model_content_hash": model.content_hash(),
        "files": files + [MANIFEST],
        "sha256": {name: sha256(stage / name) for name in files},
        "toolchain": {"onnx": onnx.__version__, "python": platform.python_version()},
    }


# Ops the WebGPU provider's table lists that its native provider (1.31.1) ran on the CPU
# when tried: ``com.microsoft.Attention`` with a mask (MiniLM, each layer's attention was
# a CPU island with its copies). Measured, as the page reports the placement.
WEBGPU_ON_CPU = frozenset({("com.microsoft", "Attention")})


def islands(graph: onnx.GraphProto, on_cpu) -> int:
    """How many connected groups the nodes ``on_cpu(node)`` says run on the CPU form in
    ``graph`` (two are connected when one reads what the other writes): each group is one
    trip from GPU memory to the CPU and back."""
    nodes = [n for n in graph.node if on_cpu(n)]
    parent = list(range(len(nodes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    for i, n in enumerate(nodes):
        for name in n.input:
            if name in producer:
                parent[root(i)] = root(producer[name])
    return len({root(i) for i in range(len(nodes))})


def webgpu_capabilities() -> Capabilities:
    """What the pipeline may write for the WebGPU provider: the operators its table
    lists (``web_install.webgpu_operators``), less ``WEBGPU_ON_CPU``; passes whose ops
    are all outside it are left out, so their subgraphs stay in ops the GPU runs. Without
    the package (lowering is refused then anyway), the CPU provider's."""
    listed = web_install.webgpu_operators()
    if listed is None:
        return OrtTarget.capabilities
    ops = frozenset(listed - WEBGPU_ON_CPU)
    return Capabilities(domains=frozenset(d for d, _ in ops) | {""}, ops=ops,
                        dtypes=OrtTarget.capabilities.dtypes)


def _write_ort(stage: Path, data_files: list[str]) -> dict:
    """ONNX Runtime's ``.ort`` file of the staged ``model.onnx``, made by a session of the
    installed onnxruntime that saves its optimized graph in ORT format (onnxruntime-web
    1.31 loads the ones 1.32 writes). At ORT_ENABLE_EXTENDED, not ALL: ALL adds the
    NCHWc layout rewrite (``com.microsoft.nchwc`` ops, blocked for this CPU's vector
    width), which the wasm build has no kernels for; the extended fusions are CPU
    execution provider kernels, which it has. One flatbuffer holds every weight, so the
    model must fit one browser fetch. Returns what the manifest records of it."""
    import onnxruntime as ort

    size = sum((stage / f).stat().st_size for f in [MODEL_FILE, *data_files])
    if size > BROWSER_FILE_LIMIT:
        raise UsageError(f"--format ort: the model's {size / 2**30:.2f} GiB do not fit one "
                         f".ort file a browser can fetch (under 2 GiB)",
                         hint="leave --format out: model.onnx keeps its weights in chunks")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(stage / ORT_FILE)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.log_severity_level = 3
    disabled = list(disabled_optimizers())
    ort.InferenceSession(str(stage / MODEL_FILE), options,
                         providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    return {"file": ORT_FILE, "made_by": f"onnxruntime {ort.__version__}",
            "graph_optimization_level": "ORT_ENABLE_EXTENDED",
            "disabled_optimizers": disabled}


def _split_external_data(model_path: Path, limit: int) -> list[str]:
    """Rewrite the external data ``save`` wrote beside ``model_path`` (one
    ``<name>.data``) into files of at most ``limit`` bytes each (``<name>.data.0``,
    ``.1``, ...) where it is larger: the page fetches each file into one ArrayBuffer.
    A tensor is never split; one larger than ``limit`` gets a file of its own, and one
    larger than a browser can fetch is refused. Returns the data files' names."""
    proto = onnx.load(model_path, load_external_data=False)
    tensors = [t for t in all_tensors(proto) if uses_external_data(t)]
    if not tensors:
        return []
    data = model_path.with_name(model_path.name + ".data")
    if data.stat().st_size <= limit:
        return [data.name]
    layout: dict[tuple[int, int], tuple[str, int]] = {}  # (offset, length) -> new place
    names: list[str] = []
    size = 0
    with open(data, "rb") as src:
        for tensor in sorted(tensors, key=lambda t: _extent(t)[0]):
            offset, length = _extent(tensor)
            if length > BROWSER_FILE_LIMIT:
                raise UsageError(f"tensor {tensor.name!r} is {length / 2**30:.2f} GiB: a "
                                 f"browser cannot fetch it into one ArrayBuffer (under 2 GiB)",
                                 hint="split the tensor in the model, or use --target ort")
            if (offset, length) not in layout:
                start = -(-size // 4096) * 4096  # page-aligned, as save() aligns them
                if not names or start + length > limit:
                    names.append(f"{data.name}.{len(names)}")
                    start = 0
                with open(model_path.parent / names[-1], "ab") as dst:
                    dst.truncate(start)
                    dst.seek(start)
                    _copy_range(src, dst, offset, length)
                size = start + length
                layout[(offset, length)] = (names[-1], start)
            location, start = layout[(offset, length)]
            _set_location(tensor, location, start, length)
    data.unlink()
    model_path.write_bytes(proto.SerializeToString())
    return names


def _extent(tensor: onnx.TensorProto) -> tuple[int, int]:
    info = {e.key: e.value for e in tensor.external_data}
    return int(info.get("offset", 0)), int(info["length"])


def _set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _copy_range(src, dst, offset: int, length: int, chunk: int = 1 << 24) -> None:
    src.seek(offset)
    while length > 0:
        block = src.read(min(chunk, length))
        if not block:
            raise OSError(f"{src.name}: shorter than its tensors need")
        dst.write(block)
        length -= len(block)
