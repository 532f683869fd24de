"""Where independent evaluations run: here, one after another, or on a Ray cluster
(``--workers N``: a local cluster of N worker processes; ``--workers ray://HOST:PORT``:
an existing one). The planner builds and scores its candidates through ``Workers.map``;
what it times it times here, one model at a time, so that candidates do not compete for
the cores they are timed on.

Results come back in the order of the inputs and do not depend on where they ran:
every evaluation is a pure function of its arguments and the seed.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from graphopt.errors import UsageError

# A local cluster's object store (Ray's minimum is 75 MB; small containers have little
# shared memory to give it).
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


def parse(spec: str | int | None) -> str | int | None:
    """``None``/``0``/``1``: here; ``N``: a local Ray cluster of N workers;
    ``ray://HOST:PORT`` (or ``auto``): an existing cluster."""
    if spec is None or isinstance(spec, int):
        if isinstance(spec, int) and spec < 0:
            raise UsageError(f"--workers must be >= 0, got {spec}")
        return None if not spec or spec == 1 else spec
    text = str(spec).strip()
    if text.isdigit():
        return parse(int(text))
    if text == "auto" or text.startswith("ray://"):
        return text
    raise UsageError(f"cannot read --workers {spec!r}",
                     hint="a number of local workers, ray://HOST:PORT or auto")


class Workers:
    """Runs ``fn(item)`` for each item: here (``spec`` None) or on Ray."""

    def __init__(self, spec: str | int | None = None):
        self.spec = parse(spec)
        self._started = False

    @property
    def remote(self) -> bool:
        return self.spec is not None

    def describe(self) -> str:
        if self.spec is None:
            return "here, one after another"
        if isinstance(self.spec, int):
            return f"a local Ray cluster of {self.spec} workers"
        return f"the Ray cluster at {self.spec}"

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any],
            done: Callable[[int, int], None] | None = None) -> list[Any]:
        """``[fn(item) for item in items]``, here or on the cluster; ``done(count,
        total)`` is told as results come in (here: before each item and at the end)."""
        tell = done or (lambda count, total: None)
        if self.spec is None or len(items) < 2:
            out = []
            for item in items:
                tell(len(out), len(items))
                out.append(fn(item))
            tell(len(out), len(items))
            return out
        ray = self._ray()
        task = ray.remote(num_cpus=1)(fn)
        refs = [task.remote(item) for item in items]
        pending = list(refs)
        while pending:
            tell(len(refs) - len(pending), len(refs))
            _, pending = ray.wait(pending, num_returns=1)
        tell(len(refs), len(refs))
        return ray.get(refs)

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def _ray(self):
        try:
            import ray
        except ImportError:
            raise UsageError("--workers needs Ray", hint="pip install 'graphopt[ray]'") \
                from None
        if not ray.is_initialized():
            if isinstance(self.spec, int):
                ray.init(num_cpus=self.spec, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                         include_dashboard=False, log_to_driver=False,
                         configure_logging=False,
                         runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}})
            else:
                ray.init(address=self.spec, log_to_driver=False, configure_logging=False)
            self._started = True
        return ray

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pythonpath() -> str:
    """The driver's import path, so local workers import the same graphopt and plugins."""
    import sys

    paths = [p for p in sys.path if p and os.path.isdir(p)]
    return os.pathsep.join(dict.fromkeys(paths))
