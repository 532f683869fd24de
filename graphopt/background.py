"""Work that runs in a background thread while the main thread goes on: ONNX Runtime
runs and hashing let go of the GIL, so on a machine of two cores or more they overlap
with Python work (the passes, the summaries)."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None


def submit(fn: Callable[..., T], *args) -> Future:
    """``fn(*args)`` in the background; its ``Future``."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1)),
                                   thread_name_prefix="graphopt")
    return _pool.submit(fn, *args)
