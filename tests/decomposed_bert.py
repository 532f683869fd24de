"""BERT exports whose LayerNorms (and optionally GELUs) are decomposed into elementwise ops,
as exporters produce them: the inputs of the transformer fusion tests.

* ``exporter="torchscript"`` exports at opset 14, where the TorchScript exporter writes
  ``nn.LayerNorm`` as ReduceMean → Sub → Pow → ReduceMean → Add → Sqrt → Div → Mul → Add
  (``LayerNormalization`` only exists from opset 17).
* ``exporter="dynamo"`` exports at opset 18 with every ``nn.LayerNorm`` swapped for a
  module written in plain tensor ops (as older Hugging Face code and T5 do), so the
  decomposition is the dynamo exporter's own (axes as inputs, its operand order).

The tiny BERT uses ``hidden_act="gelu_new"`` (the tanh approximation, written out in
tensor ops by transformers; the zoo's tiny BERT has the erf GELU). Exports are cached like
the zoo's (per process, and on disk under ``GRAPHOPT_ZOO_CACHE``), keyed by this file too.
"""

from __future__ import annotations

import io
import os

import onnx

from tests import zoo

TORCHSCRIPT_OPSET = 14


def _decompose_layer_norms(module) -> int:
    """Swap every ``nn.LayerNorm`` of ``module`` for the same computation in tensor ops."""
    import torch
    from torch import nn

    class DecomposedLayerNorm(nn.Module):
        def __init__(self, norm: nn.LayerNorm):
            super().__init__()
            self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

        def forward(self, x):
            mean = x.mean(-1, keepdim=True)
            centered = x - mean
            var = centered.pow(2).mean(-1, keepdim=True)
            return centered / torch.sqrt(var + self.eps) * self.weight + self.bias

    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, DecomposedLayerNorm(child))
                swapped += 1
    return swapped


def _export(bert, exporter: str, vocab: int, return_hidden: bool) -> bytes:
    import torch

    model, (ids, mask), outputs, dynamic = zoo.bert_export_args(bert, vocab, return_hidden)
    names = ["input_ids", "attention_mask"]
    with zoo._quiet(), torch.no_grad():
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(model, (ids, mask), buf, dynamo=False,
                              opset_version=TORCHSCRIPT_OPSET, input_names=names,
                              output_names=outputs, dynamic_axes=dynamic,
                              do_constant_folding=False)
            proto = onnx.load_from_string(buf.getvalue())
        else:
            _decompose_layer_norms(model)
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            shapes = {"input_ids": {0: batch, 1: sequence},
                      "attention_mask": {0: batch, 1: sequence}}
            program = torch.onnx.export(model, (ids, mask), None, dynamo=True,
                                        opset_version=zoo.DYNAMO_OPSET, input_names=names,
                                        output_names=outputs, dynamic_shapes=shapes,
                                        optimize=False, verbose=False)
            proto = program.model_proto
    proto.doc_string = ""
    return proto.SerializeToString()


@zoo._disk_cached
def _tiny_bytes(exporter: str) -> bytes:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=zoo.BERT_TINY_VOCAB, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=256,
                        max_position_embeddings=zoo.BERT_TINY_MAX_POSITIONS,
                        hidden_act="gelu_new")
    bert = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters (fresh ones are 1 and 0)
        gen = torch.Generator().manual_seed(3)
        for m in bert.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return _export(bert, exporter, zoo.BERT_TINY_VOCAB, True)


@zoo._disk_cached
def _minilm_bytes(exporter: str) -> bytes:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import BertModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with zoo._quiet():
        bert = BertModel.from_pretrained(str(zoo.minilm_path()), add_pooling_layer=False,
                                         local_files_only=True).eval()
    return _export(bert, exporter, bert.config.vocab_size, False)


def bert_tiny(exporter: str = "torchscript") -> onnx.ModelProto:
    """The zoo's tiny BERT shape (random LayerNorm parameters too) with 5 decomposed
    LayerNorms and 2 tanh GELUs."""
    return onnx.load_from_string(_tiny_bytes(exporter))


def bert_minilm(exporter: str = "torchscript") -> onnx.ModelProto:
    """The real all-MiniLM-L6-v2 encoder with decomposed LayerNorms (13) and erf GELUs (6)."""
    return onnx.load_from_string(_minilm_bytes(exporter))
