"""Running a ``web`` artifact folder in headless Chromium: a local HTTP server for the
folder and the system's Chromium driven by the ``playwright`` package.

    python -m graphopt.targets.web_browser FOLDER [--port N]

serves a folder the way the page needs it (for a person to open in a browser).

* ``serve(folder)``: a ``http.server`` on 127.0.0.1 (a free port) that sends
  ``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy:
  require-corp`` with every file, so the page is cross-origin isolated and ONNX Runtime
  Web may use wasm threads (``SharedArrayBuffer``), and the MIME types browsers insist
  on for ``.wasm`` (streaming compilation) and ``.mjs`` (module scripts).
* ``page(folder)``: the folder's ``index.html`` open in headless Chromium with its
  session created. One browser per process and thread (launching one costs about a
  second, more than a small model's run) and one page per folder version are kept and
  reused; every request a page makes is recorded (``Page.requests``) and any that is not
  to its own server is refused, so an artifact that would need the network fails here.

Only the system Chromium is used (``GRAPHOPT_CHROMIUM``, else ``chromium`` on the PATH):
playwright never downloads a browser for graphopt.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from graphopt.errors import GraphoptError, UsageError

CHROMIUM_ENV = "GRAPHOPT_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "chromium-headless-shell")
# Headless, no sandbox (root in containers), no GPU, nothing in the background that
# would reach the network on its own.
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-default-apps", "--disable-extensions",
        # WebGPU on SwiftShader, Chromium's software adapter: the same results on every
        # machine (a CPU runs the shaders; no GPU's time is ever reported from it)
        "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader"]
# ONNX Runtime's verbose log of where each node runs (``?log=verbose``): a header per
# execution provider ("All nodes placed on ..." when there is one), then one line per
# node: "  OpType (node name)".
PLACED = re.compile(r"(?:Node\(s\)|All nodes) placed on \[(\w+)\]\. Number of nodes: (\d+)")
PLACED_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{2,}(\w+) \((.*)\)\s*$")
TIMEOUT_MS = 300_000  # creating a session of a model of gigabytes takes a while
HEADERS = {"Cross-Origin-Opener-Policy": "same-origin",
           "Cross-Origin-Embedder-Policy": "require-corp",
           "Cache-Control": "no-store"}
MAX_PAGES = 4


def chromium_path() -> str | None:
    """The system Chromium's executable, if there is one."""
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given if os.access(given, os.X_OK) else None
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@functools.lru_cache(maxsize=4)
def _version(path: str) -> str | None:
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def chromium_version() -> str | None:
    """``chromium --version`` of the system Chromium (``None``: none here)."""
    path = chromium_path()
    return None if path is None else _version(path)


def why_unavailable() -> str | None:
    """``None`` when artifacts can run in a browser here, else what is missing."""
    if chromium_path() is None:
        where = f"${CHROMIUM_ENV} ({os.environ[CHROMIUM_ENV]}) is not executable" \
            if os.environ.get(CHROMIUM_ENV) else "no chromium on the PATH"
        return f"Chromium is missing: {where} (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing (pip install playwright; it " \
               "drives the system Chromium, no browser is downloaded)"
    return None


# ---------------------------------------------------------------------- HTTP server
class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".mjs": "text/javascript",
                      ".js": "text/javascript", ".json": "application/json",
                      ".onnx": "application/octet-stream", ".html": "text/html"}

    def end_headers(self) -> None:
        for key, value in HEADERS.items():
            self.send_header(key, value)
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's name
        pass  # a page load is a dozen requests: not for the user's terminal


class Server:
    """``folder`` served on 127.0.0.1 from a daemon thread until ``close``."""

    def __init__(self, folder: Path, port: int = 0):
        handler = functools.partial(_Handler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name="graphopt-web-server")
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------- browser
class Page:
    """A folder's ``index.html`` open in Chromium with its ONNX Runtime session made."""

    def __init__(self, browser, folder: Path, threads: int | None, placement: bool = False):
        """``placement``: ask ONNX Runtime for its verbose log while the session is made,
        and keep where each node runs (``facts["placement"]``)."""
        self.server = Server(folder)
        self.requests: list[str] = []
        self.refused: list[str] = []
        self.errors: list[str] = []
        self.log: list[str] = []
        self.page = browser.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.route("**/*", self._route)
        query = "&".join([*([f"threads={threads}"] if threads else []),
                          *(["log=verbose"] if placement else [])])
        query = f"?{query}" if query else ""
        try:
            self.page.goto(self.server.url + "index.html" + query, wait_until="load")
            self.page.wait_for_function("() => window.graphopt && window.graphopt.ready")
            self.facts = self.page.evaluate("() => window.graphopt.ready")
            if placement:
                self.facts["placement"] = placement_of(self.log)
        except Exception as exc:
            self.close()
            raise GraphoptError(f"the page {folder}/index.html failed in Chromium: "
                                f"{_first_line(exc)}"
                                + (f" (page errors: {'; '.join(self.errors[:3])})"
                                   if self.errors else "")) from exc

    def _console(self, message) -> None:
        text = message.text
        if "[V:onnxruntime" in text or "[I:onnxruntime" in text:  # the verbose log
            self.log.append(text)
        elif message.type == "error":
            self.errors.append(text)

    def _route(self, route) -> None:
        if route.request.url.startswith(self.server.url):
            route.continue_()
        else:
            self.refused.append(route.request.url)
            route.abort()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            got = self.page.evaluate("feeds => window.graphopt.run(feeds)", encode(feeds))
        except Exception as exc:
            raise GraphoptError(f"session.run failed in Chromium: {_first_line(exc)}") from exc
        return {name: decode(t) for name, t in got.items()}

    def time(self, feeds: dict[str, np.ndarray], repeat: int) -> list[float]:
        """Seconds of each of ``repeat`` runs after a warm-up (100 ms of runs, at most 20),
        timed inside the page with ``performance.now()`` (5 us resolution when
        cross-origin isolated)."""
        try:
            ms = self.page.evaluate("([feeds, n]) => window.graphopt.time(feeds, n)",
                                    [encode(feeds), repeat])
        except Exception as exc:
            raise GraphoptError(f"session.run failed in Chromium: {_first_line(exc)}") from exc
        return [t / 1e3 for t in ms]

    def close(self) -> None:
        try:
            self.page.close()
        except Exception:  # noqa: BLE001 - the browser may be gone already
            pass
        self.server.close()


class Browser:
    """A headless system Chromium and the pages open in it (at most ``MAX_PAGES``)."""

    def __init__(self):
        missing = why_unavailable()
        if missing:
            raise UsageError(f"cannot run a web artifact here: {missing}")
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        try:
            self.browser = self._playwright.chromium.launch(
                executable_path=chromium_path(), args=ARGS)
        except Exception as exc:
            self._playwright.stop()
            raise UsageError(f"cannot start Chromium ({chromium_path()}): "
                             f"{_first_line(exc)}") from exc
        self.version = self.browser.version
        self.pages: OrderedDict[tuple, Page] = OrderedDict()

    def page(self, folder: Path, threads: int | None = None, placement: bool = False) -> Page:
        folder = Path(folder).resolve()
        manifest = folder / "manifest.json"
        key = (str(folder), manifest.stat().st_mtime_ns if manifest.exists() else 0, threads,
               placement)
        if key in self.pages:
            self.pages.move_to_end(key)
            return self.pages[key]
        for old in [k for k in self.pages if k[0] == key[0]]:  # an older version
            self.pages.pop(old).close()
        while len(self.pages) >= MAX_PAGES:
            self.pages.popitem(last=False)[1].close()
        self.pages[key] = Page(self.browser, folder, threads, placement)
        return self.pages[key]

    def close(self) -> None:
        for page in self.pages.values():
            page.close()
        self.pages.clear()
        try:
            self.browser.close()
        finally:
            self._playwright.stop()


_local = threading.local()  # playwright's sync objects belong to the thread that made them
_all: list[Browser] = []


def browser() -> Browser:
    """This thread's Chromium, launched on first use and closed at exit."""
    found = getattr(_local, "browser", None)
    if found is None:
        found = _local.browser = Browser()
        _all.append(found)
    return found


def page(folder: Path, threads: int | None = None, placement: bool = False) -> Page:
    return browser().page(folder, threads, placement)


def placement_of(log: list[str]) -> dict:
    """Where ONNX Runtime placed the nodes, from its verbose log: per execution provider
    the node count and the op types (memory copies between providers counted apart),
    and ``cpu_ops``: the op types the CPU provider runs, by count."""
    out: dict = {}
    current = None
    cpu_nodes: list[str] = []
    for line in log:
        header = PLACED.search(line)
        if header:
            current = out.setdefault(header.group(1), {"nodes": int(header.group(2)),
                                                       "ops": {}})
            provider = header.group(1)
            continue
        node = PLACED_NODE.search(line)
        if node and current is not None:
            op = node.group(1)
            current["ops"][op] = current["ops"].get(op, 0) + 1
            if provider == "CPUExecutionProvider":
                cpu_nodes.append(node.group(2))
    cpu = out.get("CPUExecutionProvider", {}).get("ops", {})
    copies = {op: n for p in out.values() for op, n in p["ops"].items()
              if op.startswith("Memcpy")}
    return {"providers": out, "cpu_ops": dict(sorted(cpu.items())),
            "cpu_nodes": cpu_nodes, "copies": dict(sorted(copies.items()))}


def last_facts() -> dict | None:
    """What the most recently used page of this thread said of its session."""
    current = getattr(_local, "browser", None)
    if current is None or not current.pages:
        return None
    return next(reversed(current.pages.values())).facts


def last_run() -> str | None:
    """Where this thread's last page ran: Chromium's version, ONNX Runtime Web's version
    and execution provider, its threads or (WebGPU) its adapter and where the nodes ran
    (``None``: no page open)."""
    facts = last_facts()
    if facts is None:
        return None
    current = _local.browser
    threads = facts.get("threads")
    where = (f"this machine's Chromium {current.version} (headless), onnxruntime-web "
             f"{facts.get('onnxruntime_web')} {facts.get('ep', 'wasm')}")
    if facts.get("ep") != "webgpu":
        return where + f", {threads} thread{'s' * (threads != 1)}"
    adapter = facts.get("adapter") or {}
    where += f" on the {adapter.get('architecture') or 'unknown'} adapter" + \
        (" (software: the shaders ran on this CPU)" if adapter.get("software") else "")
    providers = facts.get("placement", {}).get("providers", {})
    if providers:
        gpu = sum(p["nodes"] for name, p in providers.items() if "Gpu" in name)
        cpu = facts["placement"]["cpu_ops"]
        copies = facts["placement"]["copies"]
        where += f"; {gpu} nodes on WebGPU, {sum(cpu.values())} on the CPU" + \
            (" (" + ", ".join(f"{op} x{n}" for op, n in cpu.items()) + ")" if cpu else "") + \
            (f" in {facts['placement']['islands']} islands"
             if "islands" in facts["placement"] else "") + \
            f", {copies.get('MemcpyToHost', 0)} copies GPU to CPU"
    return where


@atexit.register
def close_all() -> None:
    """Close every browser this process launched (a test module's teardown, and exit)."""
    while _all:
        try:
            _all.pop().close()
        except Exception:  # noqa: BLE001 - at exit, or already gone
            pass
    _local.__dict__.pop("browser", None)


# ---------------------------------------------------------------------- tensors
def encode(feeds: dict[str, np.ndarray]) -> dict[str, dict]:
    """Arrays as the page takes them: dtype name, shape and base64 of the bytes."""
    out = {}
    for name, value in feeds.items():
        array = np.ascontiguousarray(value)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        if array.dtype.kind not in "biuf":
            raise UsageError(f"input {name!r}: dtype {array.dtype} cannot be passed to "
                             f"ONNX Runtime Web by graphopt")
        out[name] = {"dtype": array.dtype.name, "shape": list(array.shape),
                     "data": base64.b64encode(array.tobytes()).decode("ascii")}
    return out


def decode(tensor: dict) -> np.ndarray:
    """An output of the page as a numpy array of its dtype and shape."""
    data = base64.b64decode(tensor["data"])
    return np.frombuffer(data, dtype=np.dtype(tensor["dtype"])).reshape(tensor["shape"]).copy()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m graphopt.targets.web_browser",
                                     description="Serve a web artifact folder on 127.0.0.1 "
                                                 "with the headers wasm threads need.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if not (args.folder / "index.html").is_file():
        raise SystemExit(f"{args.folder} has no index.html: not a web artifact folder")
    server = Server(args.folder, args.port)
    print(f"open {server.url}index.html (Ctrl-C stops)")
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
