"""Native memory a runtime frees goes back to the system while graphopt lowers and checks.

glibc's malloc serves a block from its own mapping (returned to the system when freed)
only above a threshold, and raises that threshold to the size of each such block freed,
up to 32 MiB: once a process has freed one large weight, blocks up to that size come
from the heap, and a freed one stays resident for the next allocation to reuse. The
lowering and the artifact's checks make and free one runtime after another (the
flatbuffer and its constants, LiteRT's interpreter, ONNX Runtime's sessions with their
prepacked weights), so what each left in the heap stood under the next one's peak:
ResNet-50's ``.tflite`` write peaked in ONNX Runtime's timing session at 437 MiB of RSS,
of which 312 were resident before the session was made; with ``returned`` around the
lowering and the checks, 369.5-402.6 MiB in 12 runs, the peak LiteRT's interpreter's,
ONNX Runtime's session made at 166-207 MiB. A fixed threshold keeps big blocks in
mappings of their own, but costs numpy's temporaries of a few hundred KiB a mapping and
its page faults each (2x slower at 1 MiB, 8x at 128 KiB, measured), so it holds only
within ``returned``; after it the thresholds are the highest glibc would raise them to
itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform

M_TRIM_THRESHOLD = -1  # mallopt's parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
RETURNED = 128 << 10  # glibc's own initial threshold
AFTER = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where glibc stops raising it
AFTER_TRIM = 2 * AFTER  # what glibc sets the trim threshold to beside it


@functools.cache
def _mallopt():
    """glibc's ``mallopt``, or ``None`` (another C library, or none found)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def _set(threshold: int, trim: int | None = None) -> bool:
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if trim is not None:
        ok = bool(mallopt(M_TRIM_THRESHOLD, trim)) and ok
    return ok


@contextlib.contextmanager
def returned():
    """Within the block, every native block over ``RETURNED`` bytes has a mapping of its
    own, so freeing it returns its memory to the system; afterwards the thresholds are
    ``AFTER`` and ``AFTER_TRIM``. Yields whether glibc took the setting (elsewhere: a
    no-op)."""
    applied = _set(RETURNED)
    try:
        yield applied
    finally:
        if applied:
            _set(AFTER, AFTER_TRIM)
