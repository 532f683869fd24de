"""Where a command reads and writes, checked before any work starts, and its outputs
written all at once.

* ``input_files`` lists every file a command reads: the model and its external-data
  files, ``--data``, the calibration and validation files (a folder: every file in it).
* ``check_outputs`` refuses (``UsageError``, nothing written) an output that would
  overwrite an input (paths resolved, symlinks and hard links followed), two outputs
  that are the same file, and an output that cannot be written: its folder read-only,
  a file where a folder should be, a name longer than the file system allows.
* ``Staging`` writes the command's outputs into a temporary folder beside the output,
  then moves all of them into place at once: a failure leaves nothing behind.

An output ``-o`` is a file (``out.onnx``; a target may write ``out.onnx.data`` and
``out.onnx.session.json`` beside it) or a folder (an existing folder, or a path without
a suffix) that the target fills: no input may lie inside it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from graphopt.errors import GraphoptError, UsageError

# Beside a model file ``-o out.onnx`` a target may write these (external data, ORT
# session options).
SIDECAR_SUFFIXES = (".data", ".session.json")
# Prefix of temporary names: short, so a temporary beside a long output name still fits.
TEMP_PREFIX = ".go-"
# Names a target writes into an output folder (a report there must not take them).
_FOLDER_NAMES = ("manifest.json", "model.", "tuning", "index.html", "run.js", "ort-web")

Labeled = Sequence[tuple[str, Path]]


def input_files(model: Any = None, *, data: Any = None, calibration: Any = None,
                validation: Any = None, replay: Any = None) -> list[tuple[str, Path]]:
    """(what, path) of every existing file the command reads; sources that are not paths
    (bytes, protos, arrays, ``module:function`` of an importable module) have none."""
    from graphopt.ir import model_files  # ir imports nothing from here; avoid a cycle

    found: list[tuple[str, Path]] = []
    if _is_path(model):
        found += [("the input model" if i == 0 else "the input model's external data", p)
                  for i, p in enumerate(model_files(model))]
    for what, source in (("--data", data), ("--calibration-data", calibration),
                         ("--validation-data", validation), ("--replay", replay)):
        if not _is_path(source):
            continue
        path = Path(os.fspath(source))
        if not _exists(path) and ":" in path.name:  # module:function, or file.py:function
            path = path.with_name(path.name.rpartition(":")[0])
        if os.path.isdir(path):
            found += [(what, p) for p in sorted(path.rglob("*")) if os.path.isfile(p)]
        elif os.path.isfile(path):
            found.append((what, path))
    return found


def output_files(output: Path) -> tuple[list[Path], Path | None]:
    """(files a model output may write, the folder it fills or ``None``)."""
    output = Path(output)
    if is_folder_output(output):
        return [], output
    return [output, *(output.with_name(output.name + s) for s in SIDECAR_SUFFIXES)], None


def check_outputs(inputs: Labeled, output: Path | None, report: Path | None = None) -> None:
    """Refuse outputs that would overwrite an input or each other, or cannot be written
    (see the module docstring). Writes nothing."""
    outputs: list[tuple[str, Path]] = []
    folder = None
    if output is not None:
        _check_path_text(output, "-o")
        files, folder = output_files(output)
        outputs += [("-o", p) for p in files]
        check_writable(output, "-o")
    if report is not None:
        _check_path_text(report, "--report")
        outputs.append(("--report", Path(report)))
        check_writable(report, "--report")
    for what_in, path_in in inputs:
        for what_out, path_out in outputs:
            if same_file(path_in, path_out):
                raise UsageError(f"{what_out} {path_out} would overwrite {what_in} "
                                 f"({path_in})", hint="choose another output path; graphopt "
                                                      "never modifies its input")
        if folder is not None and _inside(path_in, folder):
            raise UsageError(f"-o {folder} is an output folder the target fills, and "
                             f"{what_in} {path_in} lies inside it",
                             hint="choose an output folder that holds none of the inputs")
    if report is not None and output is not None:
        report = Path(report)
        if same_file(report, output) or any(same_file(report, p) for p in files):
            raise UsageError(f"--report {report} would overwrite the output {output}"
                             if same_file(report, output) else
                             f"--report {report} is a file the output {output} may write "
                             f"beside it", hint="give the report its own path, e.g. "
                                                "report.json")
        inner = _resolved(report).relative_to(_resolved(folder)).parts \
            if folder is not None and _inside(report, folder) else ()
        if inner and inner[0].startswith(_FOLDER_NAMES):
            raise UsageError(f"--report {report} takes a name the target writes into the "
                             f"output folder {folder}",
                             hint="name the report e.g. report.json, or put it elsewhere")


def check_writable(path: Path, what: str) -> None:
    """Refuse ``path`` when the file (or folder) cannot be created there: the nearest
    existing folder above it is a file or not writable, or a name is too long."""
    path = Path(os.path.abspath(path))
    start = path if os.path.isdir(path) else path.parent
    missing = [] if os.path.isdir(path) else [path.name]
    existing = start
    while not _exists(existing):
        missing.append(existing.name)
        existing = existing.parent
    if not os.path.isdir(existing):
        raise UsageError(f"{what} {path}: {existing} is a file, not a folder",
                         hint="choose an output path inside a folder")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for name in missing:
        if len(os.fsencode(name)) > name_max:
            raise UsageError(f"{what}: the name {name[:40]!r}... is {len(os.fsencode(name))} "
                             f"bytes long; the file system allows {name_max}",
                             hint="choose a shorter output name")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: cannot write into {existing} (read-only or no "
                         f"permission)", hint="choose an output folder you can write to")


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same resolved path (symlinks followed),
    or the same file on disk (hard links)."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


class Staging:
    """Outputs written into a temporary folder beside ``output`` and moved into place by
    ``commit`` (the report last); on failure everything staged, and every folder created
    for it, is removed. ``staged_output`` is where to lower; an output folder that
    already exists is lowered into in place (the target merges with what is there, e.g.
    a tuning database), and only the report is staged."""

    def __init__(self, output: Path, report: Path | None = None):
        self.output = Path(output)
        self.report = Path(report) if report is not None else None
        self._created: list[Path] = []
        self._stage: Path | None = None
        self._report_tmp: Path | None = None
        self.staged_output = self.output

    def __enter__(self) -> "Staging":
        try:
            if not os.path.isdir(self.output):
                self._make_parents(self.output.parent)
                self._stage = Path(tempfile.mkdtemp(dir=os.path.abspath(self.output.parent),
                                                    prefix=TEMP_PREFIX))
                self.staged_output = self._stage / self.output.name
            if self.report is not None:  # made now: a report that cannot be written
                self._make_parents(self.report.parent)  # fails before any work
                fd, tmp = tempfile.mkstemp(dir=self.report.parent, prefix=TEMP_PREFIX)
                os.close(fd)
                self._report_tmp = Path(tmp)
        except OSError as exc:
            self._cleanup()
            raise _write_error(exc) from exc
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cleanup(failed=exc_type is not None)
        if isinstance(exc, GraphoptError) and exc.args:  # name the paths the user gave
            exc.args = (self.final_paths(str(exc.args[0])), *exc.args[1:])

    def final_paths(self, value: Any) -> Any:
        """``value`` (a report, a message) with the staging folder's paths replaced by the
        final ones."""
        if self._stage is None:
            return value
        if isinstance(value, str):
            staged = str(self._stage) + os.sep
            return value.replace(staged, "" if str(self.output.parent) == "." else
                                 str(self.output.parent) + os.sep)
        if isinstance(value, dict):
            return {k: self.final_paths(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.final_paths(v) for v in value)
        return value

    def commit(self, report_text: str | None = None) -> None:
        """Write the report's temporary, then move the staged outputs and the report into
        place (renames within a folder)."""
        try:
            moves = []
            if self._stage is not None:
                moves = [(p, self.output.parent / p.name) for p in sorted(self._stage.iterdir())]
            if self.report is not None and any(same_file(self.report, dst)
                                               for _, dst in moves):
                raise UsageError(f"--report {self.report} is a file the target writes",
                                 hint="give the report its own path")
            if self._report_tmp is not None:
                self._report_tmp.write_text(report_text or "", encoding="utf-8")
                os.chmod(self._report_tmp, 0o644)  # mkstemp makes 0600
            for src, dst in moves:
                _move(src, dst)
            if self._report_tmp is not None:
                os.replace(self._report_tmp, self.report)
                self._report_tmp = None
        except OSError as exc:
            raise _write_error(exc) from exc

    # ------------------------------------------------------------------ internals
    def _make_parents(self, folder: Path) -> None:
        missing = []
        while not _exists(folder):
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir()
            self._created.append(path)

    def _cleanup(self, failed: bool = True) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
        if self._report_tmp is not None:
            self._report_tmp.unlink(missing_ok=True)
        if failed:
            for folder in reversed(self._created):
                try:
                    folder.rmdir()  # only if empty
                except OSError:
                    pass


def write_text(path: Path, text: str, what: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: into a temporary file beside it,
    then renamed over it, so ``path`` is either as it was or complete. Missing folders
    are created. ``what`` names the path in errors (``UsageError``)."""
    path = Path(path)
    check_writable(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.abspath(path.parent), prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise _write_error(exc) from exc


def _move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; a folder onto an existing folder (one made for the
    report, say) moves its contents in."""
    if os.path.isdir(src) and os.path.isdir(dst) and not os.path.islink(dst):
        for child in sorted(src.iterdir()):
            _move(child, dst / child.name)
        return
    os.replace(src, dst)


def _write_error(exc: OSError) -> UsageError:
    where = f" {exc.filename}" if exc.filename else ""
    return UsageError(f"cannot write{where}: {exc.strerror or exc}",
                      hint="choose an output path you can write to")


def is_folder_output(output: Path) -> bool:
    return os.path.isdir(output) or not output.suffix


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and not isinstance(source, bytes)


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path, folder: Path) -> bool:
    return _resolved(path).is_relative_to(_resolved(folder))


def _check_path_text(path: Path, what: str) -> None:
    if "\0" in os.fspath(path):
        raise UsageError(f"{what}: the path contains a NUL byte")

