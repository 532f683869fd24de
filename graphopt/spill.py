"""A run's large inline weights moved into a temporary data file.

The pass manager exports the model after every pass that changed it, clones it for
candidates and hands it to ONNX Runtime for checks: each of those copies every weight's
bytes when they live inside the model (an export of MiniLM's 90 MB took 0.27 s, 29 times
in one optimize run). A model loaded with external data has none of that cost: its
weights stay references to byte ranges of a file (``graphopt.external_data``). ``Spill``
gives every large model that form for the length of one run: the weights are written
once to a temporary file, the run works on references, and ``release`` reads the result's
weights back in before the file is removed (at exit at the latest, if the run fails).
Moving them is done on the IR (``data_files.move_out_constants``): an export for it
would copy every weight once more.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt import data_files, external_data
from graphopt.ir import Model
from graphopt.paths import TEMP_PREFIX

# Smaller models gain little: their copies are cheap (MobileNet-v2's 14 MB: optimize
# 0.89 -> 0.72 s with the spill).
SPILL_BYTES = 1 << 20
DATA_FILE = "weights.data"


class Spill:
    """``model`` (the run's own copy) with its large inline weights in a temporary file,
    as ``self.model``; unchanged when they add up to less than ``min_bytes``."""

    def __init__(self, model: Model, min_bytes: int | None = None):
        self.model, self.folder, self.moved, self._files = model, None, 0, itertools.count(1)
        self._lock = threading.Lock()
        self.min_bytes = SPILL_BYTES if min_bytes is None else min_bytes
        inline = sum(_inline_bytes(t) for t in model.initializers())
        if inline < self.min_bytes:
            return
        self._make_folder()
        self.moved = data_files.move_out_constants(model.graph, self.folder / DATA_FILE)

    def activate(self) -> None:
        """Until the enclosing ``scope()`` ends, ``refresh_active`` refreshes models with
        this spill (the pass manager calls it after each pass that changed the model)."""
        global _active
        if _scopes == 0:
            raise RuntimeError("Spill.activate() outside spill.scope()")
        _active = self

    def refresh(self, model: Model) -> Model:
        """``model`` (a pass pipeline's result) with its large new inline weights moved to
        the temporary folder too, in place: folding BatchNorm into every convolution, say,
        writes new arrays, and the verification sessions, the target's lowering and every
        export after would copy them again. Unchanged below the size that starts a
        spill."""
        inline = sum(size for t in model.initializers()
                     if (size := _inline_bytes(t)) >= external_data.MIN_MAPPED_BYTES)
        if inline < self.min_bytes:  # (smaller tensors would stay inline anyway)
            return model
        with self._lock:  # planner candidates may refresh from several threads
            if self.folder is None:
                self._make_folder()
        path = self.folder / f"weights-{next(self._files)}.data"
        self.moved += data_files.move_out_constants(model.graph, path,
                                                    external_data.MIN_MAPPED_BYTES)
        return model

    def release(self, result: Model) -> Model:
        """``result`` with the weights in the temporary files read back in, in place
        (those in the input's own data file stay references to it), and the temporary
        files removed."""
        if self.folder is None:
            return result
        data_files.read_back(result.graph, self.folder)
        self._remove()
        return result

    def _make_folder(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + "weights-"))
        self._remove = weakref.finalize(self, shutil.rmtree, self.folder, True)


_active: Spill | None = None
_scopes = 0


@contextlib.contextmanager
def scope():
    """The length of one optimize run (a decorator on it): a spill activated inside is
    inactive again after it, whether the run returned or raised."""
    global _active, _scopes
    before = _active
    _scopes += 1
    try:
        yield
    finally:
        _scopes -= 1
        _active = before


def refresh_active(model: Model) -> None:
    """``model`` with its large new inline weights moved into the running optimize's
    temporary folder, in place (nothing without an activated spill, e.g. in a worker
    process, or below the spill size)."""
    if _active is not None:
        _active.refresh(model)


def _inline_bytes(const: gs.Constant) -> int:
    """Bytes of ``const``'s values held in memory (not in a data file), without loading
    lazy values."""
    values = const._values  # noqa: SLF001 - reading it would load lazy values
    if external_data.mapped_source(values) is not None:
        return 0
    if isinstance(values, LazyValues):
        return math.prod(values.shape) * np.dtype(values.dtype).itemsize
    return int(np.asarray(values).nbytes)
