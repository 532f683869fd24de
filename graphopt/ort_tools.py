"""Modules of ONNX Runtime's ``onnxruntime/tools`` package, imported without running that
package's ``__init__``: it imports torch whenever torch is installed (6 s of a 13 s
MiniLM run), for a helper graphopt never calls. The modules are loaded as submodules of
a stand-in package over the same folder, so their relative imports work and the real
``onnxruntime.tools`` is left as it is."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

_PACKAGE = "graphopt._onnxruntime_tools"


def ort_tool(name: str) -> types.ModuleType:
    """``onnxruntime.tools.<name>`` (dotted for subpackages), loaded as described."""
    if _PACKAGE not in sys.modules:
        import onnxruntime

        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(Path(onnxruntime.__file__).parent / "tools")]
        sys.modules[_PACKAGE] = package
    return importlib.import_module(f"{_PACKAGE}.{name}")
