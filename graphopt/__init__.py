"""graphopt: a plugin-based, compiler-style graph optimizer for ONNX models.

Data flows one way: load -> analyse -> transform (passes) -> verify -> lower -> report.
"""

from graphopt.api import (ArtifactCheck, OptimizeResult, compare, get_target, inspect, optimize,
                          verify_artifact)
from graphopt.errors import GraphoptError, ModelError, PluginError, UsageError, VerificationError
from graphopt.ir import Model, load, save
from graphopt.pass_infra import Pass, PassContext, PassResult

__all__ = [
    "optimize", "load", "save", "inspect", "compare", "get_target", "OptimizeResult",
    "verify_artifact", "ArtifactCheck",
    "Model", "Pass", "PassContext", "PassResult",
    "GraphoptError", "ModelError", "PluginError", "UsageError", "VerificationError",
]
