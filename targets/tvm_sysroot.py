"""The aarch64 sysroot that runs TVM artifacts for the ``arm*`` targets under qemu-user.

    python -m graphopt.targets.tvm_sysroot [DIR] [--force] [--check] [--serve [HOST:]PORT]

``DIR`` defaults to ``$GRAPHOPT_AARCH64_SYSROOT`` or ``~/.cache/graphopt/aarch64-sysroot``.
It gets an aarch64 Python 3.11 with its C libraries (Debian 12 "bookworm" arm64 packages,
fetched with ``apt-get download`` into a private apt state, so the host's apt setup,
architectures and installed packages are left alone, and unpacked with ``dpkg -x``) plus
numpy and the TVM runtime (the aarch64 ``apache-tvm`` and ``apache-tvm-ffi`` wheels from
PyPI, at exactly the versions installed here, so the runtime matches the compiler).
TVM's compiler library is not kept: only the runtime runs there.

Idempotent: a finished sysroot carries ``.graphopt-sysroot.json`` describing what is in
it; running again with the same description does nothing, a different one (e.g. TVM was
upgraded here) rebuilds it. The sysroot is built beside ``DIR`` and moved into place, so
``DIR`` is either the previous complete sysroot or the new complete one.

``--serve [HOST:]PORT`` runs a TVM RPC server on the emulated device (the runtime-only
``tvm_rpc_server.py`` under qemu-user), so ``--rpc HOST:PORT`` can be tried without a
board; what it times is emulation.

Needs on the host: ``apt-get`` and ``dpkg`` (Debian/Ubuntu), the Debian archive keyring
(``/usr/share/keyrings/debian-archive-keyring.gpg``), pip, and network access to
deb.debian.org and PyPI. Running it needs ``qemu-aarch64`` (``apt-get install
qemu-user``); without it the sysroot is built but not smoke-tested.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

FORMAT = 1
STAMP = ".graphopt-sysroot.json"
PYTHON = "python3.11"  # bookworm's Python; the wheels are cp311
PYTHON_VERSION = "3.11"
SUITE = "bookworm"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SOURCES = (
    f"http://deb.debian.org/debian {SUITE} main",
    f"http://deb.debian.org/debian {SUITE}-updates main",
    f"http://deb.debian.org/debian-security {SUITE}-security main",
)
# The runtime closure of python3.11-minimal + libpython3.11-stdlib + libstdc++6 (apt-cache
# depends --recurse), less what only installs packages (dpkg, perl, tar, mailcap, ...).
DEBS = (
    "gcc-12-base", "libbz2-1.0", "libc6", "libcom-err2", "libcrypt1", "libdb5.3",
    "libexpat1", "libffi8", "libgcc-s1", "libgdbm6", "libgssapi-krb5-2", "libk5crypto3",
    "libkeyutils1", "libkrb5-3", "libkrb5support0", "liblzma5", "libncursesw6", "libnsl2",
    "libpython3.11-minimal", "libpython3.11-stdlib", "libreadline8", "libsqlite3-0",
    "libssl3", "libstdc++6", "libtinfo6", "libtirpc-common", "libtirpc3", "libuuid1",
    "media-types", "python3.11-minimal", "readline-common", "zlib1g",
)
# Wheels, pinned to the versions installed here where there are any.
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions")
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
# Not needed to run a compiled library: the compiler (LLVM inside, 240 MB), sources, web.
PRUNE = ("tvm/lib/libtvm_compiler.so", "tvm/src", "tvm/include", "tvm/3rdparty", "tvm/web",
         "tvm_ffi/include", "tvm_ffi/src", "tvm_ffi/3rdparty")
SITE_PACKAGES = "usr/lib/python3/dist-packages"  # on Debian's Python's sys.path
RPC_SERVER = Path(__file__).with_name("tvm_rpc_server.py")


class SysrootError(RuntimeError):
    pass


def default_dir() -> Path:
    env = os.environ.get("GRAPHOPT_AARCH64_SYSROOT")
    return Path(env) if env else Path.home() / ".cache" / "graphopt" / "aarch64-sysroot"


def _installed(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def spec() -> dict:
    """What a sysroot built now contains (compared with the stamp of an existing one)."""
    return {"format": FORMAT, "suite": SUITE, "python": PYTHON, "debs": sorted(DEBS),
            "wheels": {w: _installed(w) for w in WHEELS}}


def python_path(root: Path) -> Path:
    return root / "usr" / "bin" / PYTHON


def status(root: Path | None = None) -> tuple[Path | None, str]:
    """``(root, "")`` when a complete sysroot matching this machine's TVM is at ``root``,
    else ``(None, why not)``."""
    root = Path(root) if root else default_dir()
    stamp = root / STAMP
    if not stamp.is_file() or not python_path(root).exists():
        return None, f"no aarch64 sysroot at {root}"
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None, f"the sysroot at {root} has an unreadable {STAMP}"
    wanted = spec()
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        have = recorded.get("spec", {}).get("wheels", {}).get(dist)
        want = wanted["wheels"][dist]
        if want and have != want:
            return None, (f"the sysroot at {root} has {dist} {have}, this machine {want} "
                          f"(rebuild it)")
    return root, ""


def qemu() -> str | None:
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def build(root: Path | None = None, force: bool = False, log=print) -> Path:
    """Build (or keep) the sysroot at ``root``; returns it."""
    root = Path(root) if root else default_dir()
    wanted = spec()
    stamp = root / STAMP
    if not force and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("spec") == wanted:
                log(f"aarch64 sysroot up to date: {root}")
                return root
        except ValueError:
            pass
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise SysrootError(f"{tool} not found: building the sysroot needs a Debian or "
                               f"Ubuntu host")
    if root.exists() and not stamp.is_file() and any(root.iterdir()):
        raise SysrootError(f"{root} exists and is not a graphopt sysroot: choose a new or "
                           f"empty folder")
    if not Path(KEYRING).is_file():
        raise SysrootError(f"{KEYRING} not found (apt-get install debian-archive-keyring)")
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        new_root = work / "root"
        new_root.mkdir()
        debs = _download_debs(work / "apt", log)
        log(f"unpacking {len(debs)} Debian arm64 packages")
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(new_root)])
        wheels = _download_wheels(work / "wheels", wanted["wheels"], log)
        site = new_root / SITE_PACKAGES
        site.mkdir(parents=True, exist_ok=True)
        log(f"unpacking {len(wheels)} aarch64 wheels")
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(site)
        for rel in PRUNE:
            target = site / rel
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        smoke = _smoke_test(new_root, log)
        (new_root / STAMP).write_text(json.dumps(
            {"spec": wanted, "wheel_files": [w.name for w in wheels],
             "deb_files": [d.name for d in debs], "smoke_test": smoke}, indent=2))
        old = None
        if root.exists():
            old = work / "old"
            os.replace(root, old)
        os.replace(new_root, root)
        log(f"aarch64 sysroot ready: {root}")
        return root
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _apt_options(state: Path) -> list[str]:
    """apt with a private state, cache and source list: arm64 only, host untouched."""
    return [f"-oDir::State={state / 'state'}", f"-oDir::State::status={state / 'status'}",
            f"-oDir::Cache={state / 'cache'}", f"-oDir::Etc::SourceList={state / 'sources.list'}",
            f"-oDir::Etc::SourceParts={state / 'parts'}", "-oAPT::Architecture=arm64",
            "-oAPT::Architectures::=arm64", "-oDebug::NoLocking=1", "-qq"] + \
        (["-oAPT::Sandbox::User=root"] if os.geteuid() == 0 else [])


def _download_debs(state: Path, log) -> list[Path]:
    for sub in ("state/lists/partial", "cache/archives/partial", "parts", "debs"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "status").write_text("")
    (state / "sources.list").write_text("".join(
        f"deb [arch=arm64 signed-by={KEYRING}] {line}\n" for line in SOURCES))
    opts = _apt_options(state)
    log(f"fetching the Debian {SUITE} arm64 package lists")
    _run(["apt-get", *opts, "update"])
    log(f"downloading {len(DEBS)} Debian arm64 packages")
    _run(["apt-get", *opts, "download", *DEBS], cwd=state / "debs")
    debs = sorted((state / "debs").glob("*.deb"))
    if len(debs) < len(DEBS):
        raise SysrootError(f"apt-get download gave {len(debs)} of {len(DEBS)} packages")
    return debs


def _download_wheels(dest: Path, pins: dict[str, str | None], log) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    reqs = [f"{name}=={pin}" if pin else name for name, pin in pins.items()]
    log(f"downloading aarch64 wheels: {' '.join(reqs)}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "--dest", str(dest),
           "--disable-pip-version-check", "-q"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    _run(cmd + reqs)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(pins):
        raise SysrootError(f"pip download gave {[w.name for w in wheels]}, expected {reqs}")
    return wheels


def _smoke_test(root: Path, log) -> str:
    emulator = qemu()
    if emulator is None:
        log("qemu-aarch64 not found: sysroot not smoke-tested (apt-get install qemu-user)")
        return "skipped: no qemu-aarch64"
    code = ("import numpy, tvm, tvm.runtime.vm; "
            "print('numpy', numpy.__version__, 'tvm', tvm.__version__)")
    out = _run(qemu_command(root, emulator) + ["-c", code], env=qemu_env()).strip()
    log(f"smoke test under qemu: {out}")
    return out


def qemu_command(root: Path, emulator: str | None = None, cpu: str | None = None) -> list[str]:
    """The command prefix that runs the sysroot's Python (isolated: no host site, no
    PYTHON* variables) under qemu-user."""
    cmd = [emulator or qemu() or "qemu-aarch64"]
    if cpu:
        cmd += ["-cpu", cpu]
    return cmd + ["-L", str(root), str(python_path(root)), "-I"]


def rpc_server_command(root: Path, port: int, host: str = "127.0.0.1", *,
                       cpu: str | None = None, tracker: str | None = None,
                       key: str | None = None, emulator: str | None = None) -> list[str]:
    """The command that starts a TVM RPC server on the emulated aarch64 device: the
    runtime-only ``tvm_rpc_server.py`` run by the sysroot's Python under qemu-user
    (``port`` exactly; with ``tracker`` "HOST:PORT" and ``key`` it registers there).
    Run it with ``env=qemu_env()``."""
    cmd = qemu_command(root, emulator, cpu) + [str(RPC_SERVER), "--host", host,
                                               "--port", str(port), "--port-end",
                                               str(port + 1)]
    if tracker:
        cmd += ["--tracker", tracker, "--key", key or "aarch64"]
    return cmd


def qemu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "QEMU_"))}
    env["TVM_USE_RUNTIME_LIB"] = "1"
    return env


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SysrootError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{tail}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphopt.targets.tvm_sysroot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", type=Path, default=None,
                        help=f"where to build it (default: {default_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--check", action="store_true",
                        help="only report whether a usable sysroot is there (exit 1 if not)")
    parser.add_argument("--serve", metavar="[HOST:]PORT",
                        help="run a TVM RPC server on the emulated aarch64 device (for "
                             "trying --rpc HOST:PORT without a board; timings are emulated)")
    parser.add_argument("--cpu", default="cortex-a72", help="qemu -cpu model for --serve")
    args = parser.parse_args(argv)
    if args.serve:
        root, why = status(args.dir)
        if root is None or qemu() is None:
            print(f"error: {why or 'no qemu-aarch64 (apt-get install qemu-user)'}",
                  file=sys.stderr)
            return 1
        host, _, port = args.serve.rpartition(":")
        cmd = rpc_server_command(root, int(port), host or "0.0.0.0", cpu=args.cpu)
        os.execvpe(cmd[0], cmd, qemu_env())  # the server replaces this process (signals)
    if args.check:
        root, why = status(args.dir)
        print(f"ok: {root}" if root else why)
        return 0 if root else 1
    try:
        build(args.dir, force=args.force)
    except SysrootError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
