"""An ONNX graph run by PyTorch, node by node, so that its weights can be trained.

``TorchGraph(proto, trainable)`` holds the graph's float initializers named in
``trainable`` as ``torch.nn.Parameter`` (keyed by initializer name) and every other
constant as a fixed tensor; ``forward(feeds, fetch)`` runs the nodes the fetched tensors
depend on with the matching torch operators and returns {name: tensor}, so any tensor of
the graph (an intermediate feature, not only an output) can enter a loss. The trained
numbers go back into the ONNX graph by initializer name (``values()``): the graph itself
(nodes, names, attributes) is never rebuilt.

This is an interpreter rather than a converter to ``torch.fx`` (onnx2torch): training
needs the tensors by their ONNX names and the weights by initializer name, which an
interpreter has by construction, and onnx2torch imports torchvision, whose Linux wheels on
PyPI need the CUDA build of torch. The ops (``torch_ops``) are the standard ones of
exported CNNs, MLPs and transformers (opsets 7 to 21, both the attribute and the input
forms of axes, splits, pads and clip bounds), QDQ, and ONNX Runtime's fused forms that
graphopt's passes write (FusedConv, FusedMatMul, Gelu, BiasGelu, FastGelu,
SkipLayerNormalization). Anything else raises ``Unsupported`` naming the op and the node,
before any training. ``fake_quant`` names DequantizeLinear outputs whose weights train as
float shadows through fake quantization (``torch_ops.FakeQuant``).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from graphopt.capture import needed_nodes
from graphopt.passes.recover.torch_ops import (OPS, QRANGE, FakeQuant, Unsupported,
                                               dequantize, to_torch)

__all__ = ["TorchGraph", "Unsupported", "to_torch"]


class TorchGraph(torch.nn.Module):
    """``proto``'s graph as a torch module (see the module docstring)."""

    def __init__(self, proto: onnx.ModelProto, trainable: Iterable[str] = (),
                 fake_quant: Iterable[str] = ()):
        super().__init__()
        graph = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                          13)
        self.graph = graph
        self.nodes = list(graph.node)
        for node in self.nodes:
            if node.domain not in ("", "ai.onnx", "com.microsoft"):
                raise Unsupported(f"op {node.domain}.{node.op_type} (node {node.name!r})")
            if OPS.get(node.op_type) is None:
                raise Unsupported(f"op {node.op_type} (node {node.name!r}) has no torch "
                                  f"form here")
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in node.attribute):
                raise Unsupported(f"op {node.op_type} with a subgraph (node {node.name!r})")
        wanted = set(trainable)
        self.params = torch.nn.ParameterDict()
        self.keys: dict[str, str] = {}  # initializer name -> ParameterDict key
        self.consts: dict[str, torch.Tensor] = {}
        for init in graph.initializer:
            value = to_torch(numpy_helper.to_array(init))
            if init.name in wanted and value.is_floating_point():
                key = f"p{len(self.keys)}"
                self.keys[init.name] = key
                self.params[key] = torch.nn.Parameter(value)
            else:
                self.consts[init.name] = value
        missing = wanted - set(self.keys)
        if missing:
            raise ValueError(f"not float initializers of the graph: {sorted(missing)[:5]}")
        self.types = {t.name: t.data_type for t in graph.initializer}
        self.attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                      for n in self.nodes]
        # quantized weights trained as float "shadows", fake-quantized in the forward
        self.fake: dict[int, FakeQuant] = {}
        by_output = {n.output[0]: i for i, n in enumerate(self.nodes) if n.output}
        for name in fake_quant:
            i = by_output.get(name)
            node = self.nodes[i] if i is not None else None
            if node is None or node.op_type != "DequantizeLinear" or \
                    node.input[0] not in self.types or node.input[1] not in self.keys:
                raise ValueError(f"{name} is not the output of a DequantizeLinear of a "
                                 f"constant whose scale trains")
            site = FakeQuant(node, self.attrs[i], QRANGE[self.types[node.input[0]]])
            codes = self.consts[node.input[0]]
            zero = self.consts.get(node.input[2]) if len(node.input) > 2 and \
                node.input[2] else None
            with torch.no_grad():
                scale = self.params[self.keys[node.input[1]]]
                shadow = dequantize(codes, scale, zero, self.attrs[i])
            site.key = f"w{len(self.fake)}"
            self.params[site.key] = torch.nn.Parameter(shadow)
            self.fake[i] = site
        for node, attrs in zip(self.nodes, self.attrs):
            if node.op_type == "Split":
                attrs["_outputs"] = len(node.output)
            if node.op_type == "QuantizeLinear" and len(node.input) > 2:
                attrs["_zero_type"] = self.types.get(node.input[2])
        self._plans: dict[tuple, list[int]] = {}

    def values(self) -> dict[str, np.ndarray]:
        """The trainable initializers' current values, by initializer name (the codes of
        fake-quantized weights as int16 arrays, to be cast to their ONNX type)."""
        out = {name: self.params[key].detach().cpu().numpy().copy()
               for name, key in self.keys.items()}
        with torch.no_grad():
            for site in self.fake.values():
                scale = self.params[self.keys[site.node.input[1]]]
                zero = self._zero(site)
                out[site.node.input[0]] = site.codes(self.params[site.key], scale, zero) \
                    .round().to(torch.int16).numpy()
        return out

    def _zero(self, site: "FakeQuant"):
        name = site.node.input[2] if len(site.node.input) > 2 else ""
        return self.consts.get(name) if name else None

    def _plan(self, fetch: tuple[str, ...], given: frozenset[str]) -> list[int]:
        key = (fetch, given)
        if key not in self._plans:
            self._plans[key] = sorted(needed_nodes(self.graph, list(fetch), given))
        return self._plans[key]

    def forward(self, feeds: Mapping[str, torch.Tensor], fetch: Sequence[str]
                ) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self.consts)
        env.update({name: self.params[key] for name, key in self.keys.items()})
        env.update(feeds)
        env[""] = None
        for i in self._plan(tuple(fetch), frozenset(feeds)):
            node = self.nodes[i]
            args = [env.get(name) if name else None for name in node.input]
            if any(a is None and name for a, name in zip(args, node.input)):
                absent = [n for a, n in zip(args, node.input) if a is None and n]
                raise ValueError(f"node {node.name!r} reads {absent}, which no feed or "
                                 f"node gives")
            try:
                if i in self.fake:
                    site = self.fake[i]
                    out = site(self.params[site.key], args[1], self._zero(site))
                else:
                    out = OPS[node.op_type](self, args, self.attrs[i])
            except Unsupported as exc:
                raise Unsupported(f"{node.op_type} (node {node.name!r}): {exc}") from None
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
                raise RuntimeError(f"{node.op_type} (node {node.name!r}) on inputs of "
                                   f"shapes {shapes}: {exc}") from exc
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for name, value in zip(node.output, outs):
                if name:
                    env[name] = value
        return {name: env[name] for name in fetch}
