"""Reusing ``optimize`` results (``--cache-dir``).

A result is stored under a key: the SHA-256 of the input model's bytes (its external-data
files too), of every option that can change the result (pipeline, schemes, budget,
metric, data, seed, target and its device fingerprint, the cost calibration in use, the
output's file name, graphopt's version). A later run with the same key copies the stored
output model, artifact files and report instead of optimizing again; its report says
``cache: hit``. Data given as ``module:function`` is keyed by that name, not by what the
function returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.errors import GraphoptError
from graphopt.ir import Model, load, save
from graphopt.paths import TEMP_PREFIX, input_files, is_folder_output
from graphopt.target import Artifact


def digest(value: Any) -> str:
    """A stable SHA-256 of ``value``: arrays by dtype, shape and bytes, files by their
    bytes (a folder: every file's name in it and bytes), models by their serialization, containers
    element by element, anything else by ``repr``."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h, value: Any) -> None:
    if isinstance(value, np.ndarray):
        h.update(f"array {value.dtype.str} {value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, onnx.ModelProto):
        h.update(b"model")
        h.update(value.SerializeToString(deterministic=True))
    elif isinstance(value, Path):  # by content, wherever it lies
        files = sorted(p for p in value.rglob("*") if p.is_file()) if value.is_dir() \
            else [value]
        h.update(f"files {len(files)}".encode())
        for path in files:
            if value.is_dir():
                h.update(str(path.relative_to(value)).encode())
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}".encode())
        for key in sorted(value, key=str):
            _feed(h, str(key))
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"seq {len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif is_dataclass(value) and not isinstance(value, type):
        _feed(h, {f.name: getattr(value, f.name) for f in fields(value)})
    else:
        h.update(repr(value).encode())


class ResultCache:
    """Stored ``optimize`` results in ``folder/results/<key>/``: ``model.onnx`` (the
    optimized model), ``report.json``, and ``artifact/`` (the lowered files, named as
    the output was)."""

    def __init__(self, folder: str | os.PathLike):
        self.root = Path(folder) / "results"

    def key(self, model, target, output, **options) -> str:
        """The key of a result: ``model`` by its bytes (files, external data too) or its
        serialization, ``target`` by name and device fingerprint, ``output`` by what of
        its path changes the files written, the data options (``calibration``,
        ``validation``) by their files' bytes where they are files, ``calibration_file``
        (the cost calibration in use) by its bytes, every other option by value."""
        if isinstance(model, (str, os.PathLike)):
            source = [path for _, path in input_files(model)]
        else:
            source = model.content_hash() if isinstance(model, Model) else model
        try:
            fingerprint = target.fingerprint()
        except GraphoptError as exc:
            fingerprint = f"no fingerprint: {exc}"
        for name in ("calibration", "validation", "calibration_file"):
            value = options.get(name)
            if isinstance(value, (str, os.PathLike)) and Path(value).exists():
                options[name] = Path(value)  # by content; module:function by name
        written = None if output is None else \
            "<folder>" if is_folder_output(Path(output)) else Path(output).name
        return digest({"model": source, "target": target.name, "device": fingerprint,
                       "target_options": target.option_values(), "output": written,
                       **options})

    def restore(self, entry: Path, key: str, target_name: str, output):
        """``(model, report, artifact)`` of the stored result ``entry``, its artifact
        files copied to ``output``."""
        report = self.report(entry)
        report["cache"] = {"hit": True, "key": key, "folder": str(self.root.parent)}
        artifact = None
        if output is not None:
            main, files = self.copy_out(entry, Path(output))
            artifact = Artifact(target=target_name, path=main, files=files,
                                format=self.meta(entry)["format"] or "onnx")
            report["output_path"] = str(main)
            report["artifact_files"] = [str(f) for f in files]
        return load(self.model_path(entry)), report, artifact

    def entry(self, key: str) -> Path | None:
        path = self.root / key
        return path if (path / "report.json").is_file() else None

    def report(self, entry: Path) -> dict:
        return json.loads((entry / "report.json").read_text())

    def meta(self, entry: Path) -> dict:
        return json.loads((entry / "meta.json").read_text())

    def model_path(self, entry: Path) -> Path:
        return entry / "model.onnx"

    def copy_out(self, entry: Path, output: Path) -> tuple[Path, list[Path]]:
        """The stored artifact files copied to where ``output`` names them: ``(main
        file, every file)``."""
        meta = self.meta(entry)
        base = output if meta["folder"] else output.parent
        source = entry / "artifact"
        written = []
        for src in sorted(p for p in source.rglob("*") if p.is_file()):
            dst = base / src.relative_to(source)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            written.append(dst)
        return base / meta["main"], written

    def put(self, key: str, model: Model | onnx.ModelProto, report: dict,
            output: Path | None, artifact) -> None:
        """Store a result (atomically: a half-written entry is never read)."""
        self.root.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=self.root, prefix=TEMP_PREFIX))
        try:
            save(model, stage / "model.onnx")
            meta = {"folder": False, "main": None, "format": None}
            if output is not None and artifact is not None:
                folder = output.is_dir()
                base = output if folder else output.parent
                for f in artifact.files:
                    dst = stage / "artifact" / Path(f).relative_to(base)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, dst)
                meta = {"folder": folder, "main": str(Path(artifact.path).relative_to(base)),
                        "format": artifact.format}
            (stage / "meta.json").write_text(json.dumps(meta))
            (stage / "report.json").write_text(json.dumps(report, indent=1, default=float))
            final = self.root / key
            if final.exists():
                shutil.rmtree(final)
            os.replace(stage, final)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
