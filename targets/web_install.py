"""Where the ``web`` target gets ONNX Runtime Web: the npm package ``onnxruntime-web``.

    python -m graphopt.targets.web_install [--check]

installs the pinned version with npm into graphopt's cache folder
(``~/.cache/graphopt/npm``, or ``$XDG_CACHE_HOME/graphopt/npm``); ``--check`` only says
whether a usable copy is there. ``GRAPHOPT_ORT_WEB`` names another copy instead (a
``node_modules/onnxruntime-web`` folder, e.g. a web project's own).

The package is not vendored into graphopt: it is 150 MB of builds for every backend, of
which an artifact folder needs three files (``DIST_FILES``, or ``WEBGPU_FILES``). Lowering copies those into
the folder, so the folder runs without npm, without the cache and without the network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from graphopt.errors import UsageError

PACKAGE = "onnxruntime-web"
# The version lowering is tested with (the newest on npm when the target was written).
VERSION = "1.31.1"
ENV = "GRAPHOPT_ORT_WEB"
# The wasm-only build (no WebGPU/WebGL/WebNN code), as an ES module, and the Emscripten
# module it imports with its WebAssembly binary: the SIMD + threads build, which also
# runs single-threaded where the page is not cross-origin isolated. The ``.bundle``
# variant would embed the second file, but a page that points ``env.wasm.wasmPaths`` at
# local copies (the artifact does: no CDN) imports it from there anyway.
DIST_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
ENTRY = DIST_FILES[0]
# The WebGPU build: ONNX Runtime's native WebGPU execution provider (C++ over the
# browser's WebGPU, compiled with asyncify), whose CPU execution provider runs what it
# has no kernel for. (``ort.all``'s older JavaScript WebGPU provider, JSEP, failed on the
# example CNN's Conv in 1.31.1: "dilations should be 2D".)
WEBGPU_FILES = ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs",
                "ort-wasm-simd-threaded.asyncify.wasm")
RUNTIMES = {"wasm": DIST_FILES, "webgpu": WEBGPU_FILES}
# The WebGPU provider's operator table, shipped in the package.
WEBGPU_OPERATORS = "docs/webgpu-operators.md"


def cache_folder() -> Path:
    """The npm prefix graphopt installs into (``node_modules/`` below it)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "graphopt" / "npm"


def install_command() -> str:
    """What installs the package where ``find_package`` looks (for error hints)."""
    return f"python -m graphopt.targets.web_install  (npm install --prefix " \
           f"{cache_folder()} {PACKAGE}@{VERSION})"


def candidate() -> tuple[Path, str]:
    """The folder looked at, and what named it."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]), f"${ENV}"
    return cache_folder() / "node_modules" / PACKAGE, "graphopt's npm cache"


def why_missing(folder: Path | None = None) -> str | None:
    """``None`` when ``folder`` (default: ``candidate()``) holds a usable package, else
    what is wrong with it."""
    where = "" if folder is not None else f" ({candidate()[1]})"
    folder = folder if folder is not None else candidate()[0]
    if not (folder / "package.json").is_file():
        return f"no {PACKAGE} npm package at {folder}{where}"
    missing = [name for name in DIST_FILES + WEBGPU_FILES
               if not (folder / "dist" / name).is_file()]
    if missing:
        return f"{folder}{where} has no dist/{', dist/'.join(missing)} (version " \
               f"{package_version(folder)}; graphopt uses {VERSION})"
    return None


def find_package() -> Path:
    """The ``onnxruntime-web`` folder to copy the runtime from; a UsageError naming the
    install command where there is none."""
    folder, _ = candidate()
    problem = why_missing()
    if problem:
        raise UsageError(f"target 'web' needs ONNX Runtime Web: {problem}; install it "
                         f"with: {install_command()}",
                         hint=f"or set {ENV} to a node_modules/{PACKAGE} folder")
    return folder


def webgpu_operators(folder: Path | None = None) -> frozenset[tuple[str, str]] | None:
    """(domain, op) of every operator the package's WebGPU provider lists
    (``docs/webgpu-operators.md``: "| Add | ai.onnx(7-12,13,14+) | |"); ``None`` when the
    package or the table is missing."""
    import re

    folder = folder if folder is not None else candidate()[0]
    try:
        text = (folder / WEBGPU_OPERATORS).read_text()
    except OSError:
        return None
    ops = set()
    for op, versions in re.findall(r"^\|\s*(\w+)\s*\|\s*([^|]+)\|", text, re.M):
        for domain in re.findall(r"([\w.]+)\(", versions):
            ops.add(("" if domain == "ai.onnx" else domain, op))
    return frozenset(ops) or None


def package_version(folder: Path) -> str | None:
    try:
        return json.loads((folder / "package.json").read_text()).get("version")
    except (OSError, ValueError):
        return None


def install(prefix: Path | None = None) -> Path:
    """``npm install`` the pinned version under ``prefix`` (default ``cache_folder()``);
    returns the package folder. A UsageError says what failed (no npm, no registry)."""
    prefix = prefix or cache_folder()
    npm = shutil.which("npm")
    if npm is None:
        raise UsageError("npm is not installed", hint="install Node.js and npm (Debian: "
                                                      "apt-get install nodejs npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    # --ignore-scripts: the runtime files are in the tarball; nothing needs building.
    command = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
               "--ignore-scripts", f"{PACKAGE}@{VERSION}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        raise UsageError(f"npm install {PACKAGE}@{VERSION} failed: {' / '.join(tail)}")
    folder = prefix / "node_modules" / PACKAGE
    problem = why_missing(folder)
    if problem:
        raise UsageError(f"npm installed {PACKAGE}, but {problem}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphopt.targets.web_install",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only report whether a usable copy is installed")
    args = parser.parse_args(argv)
    if args.check:
        problem = why_missing()
        print(problem or f"{candidate()[0]}: {PACKAGE} {package_version(candidate()[0])}")
        return 1 if problem else 0
    if os.environ.get(ENV):
        print(f"note: ${ENV} is set, so the web target uses {os.environ[ENV]}, not the "
              f"copy installed now", file=sys.stderr)
    try:
        folder = install()
    except UsageError as exc:
        print(f"error: {exc}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 2
    print(f"{folder}: {PACKAGE} {package_version(folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
