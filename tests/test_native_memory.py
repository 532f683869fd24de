"""What a runtime frees while graphopt lowers and checks leaves the process
(``graphopt.native_memory``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from graphopt import native_memory

pytestmark = pytest.mark.skipif(native_memory._mallopt() is None,
                                reason="glibc's malloc only (Linux)")

# A fresh process each: glibc's thresholds are per process and this one's are unknown.
CHURN = textwrap.dedent("""
    import sys
    import numpy as np
    from graphopt import native_memory

    def rss():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) << 10 for line in fh
                        if line.startswith("VmRSS:"))

    def churn():
        np.ones(6 << 20, np.float32)  # 24 MiB, mapped and freed: glibc raises its threshold
        blocks, pins = [], []
        for _ in range(48):  # 2 MiB blocks (a layer's weights), live 96 KiB ones between
            blocks.append(np.ones(512 << 10, np.float32))
            pins.append(np.ones(12 << 10))
        before = rss()
        del blocks
        return before - rss(), pins

    if sys.argv[1] == "returned":
        with native_memory.returned() as applied:
            assert applied
            freed, pins = churn()
    else:  # "after": the heap keeps them again, as glibc would after a large block
        if sys.argv[1] == "after":
            with native_memory.returned():
                pass
        freed, pins = churn()
    print(freed)
""")


def _freed(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


def test_blocks_freed_within_returned_leave_the_process():
    blocks = 48 * (2 << 20)
    kept = _freed("default")  # the heap keeps them for reuse
    assert kept < 0.25 * blocks, kept
    freed = _freed("returned")
    assert freed > 0.9 * blocks, freed
    after = _freed("after")  # numpy's temporaries are off the system's mappings again
    assert after < 0.25 * blocks, after
