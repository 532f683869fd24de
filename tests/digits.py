"""Real data for compression tests: scikit-learn's 8x8 digits and two small networks
trained on them here (seeded, a few seconds each), exported to ONNX as a user's model
would be (BatchNorm folded into the convolutions by the exporter)."""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort

from tests.zoo import _disk_cached


TRAINED_ON = 1000  # the networks learn from x_train[:1000]; x_train[1000:] is held out


@functools.lru_cache(maxsize=None)
def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): images [N, 1, 8, 8] scaled to [0, 1],
    a stratified 70/30 split (1257 / 540 images). The networks below are trained on the
    first ``TRAINED_ON`` training images only: the other 257 are unseen data to measure
    accuracy budgets on (``validation_split``), so the test images stay untouched."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, data.target.astype(np.int64), test_size=0.3,
                                          random_state=0, stratify=data.target)
    return xtr, ytr, xte, yte


def validation_split() -> tuple[np.ndarray, np.ndarray]:
    """Training-split images the networks never saw (257), with labels."""
    xtr, ytr, _, _ = digits_data()
    return xtr[TRAINED_ON:], ytr[TRAINED_ON:]


def _train(net, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 3e-3):
    import torch
    from torch import nn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add overhead
    try:
        torch.manual_seed(0)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        xs, ys = torch.from_numpy(x), torch.from_numpy(y)
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            net.train()
            perm = torch.randperm(len(xs), generator=gen)
            for i in range(0, len(xs), 32):
                idx = perm[i:i + 32]
                opt.zero_grad()
                nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
                opt.step()
            sched.step()
        net.eval()
    finally:
        torch.set_num_threads(threads)
    return net


def _export(net, example: np.ndarray) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.from_numpy(example), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = ""
    return proto.SerializeToString()


@_disk_cached
def _digits_cnn_bytes() -> bytes:
    import torch
    from torch import nn

    torch.manual_seed(0)

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU()]

    net = nn.Sequential(*block(1, 32), *block(32, 64), nn.MaxPool2d(2),
                        *block(64, 64), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10))
    xtr, ytr, _, _ = digits_data()
    _train(net, xtr[:TRAINED_ON], ytr[:TRAINED_ON], epochs=12)
    return _export(net, xtr[:2])


@_disk_cached
def _digits_mlp_bytes() -> bytes:
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    xtr, ytr, _, _ = digits_data()
    _train(net, xtr[:TRAINED_ON].reshape(-1, 64), ytr[:TRAINED_ON], epochs=30)
    return _export(net, xtr[:2].reshape(-1, 64))


def digits_cnn() -> onnx.ModelProto:
    """3 conv (32, 64, 64 channels, 3x3, BatchNorm folded in, ReLU; MaxPool after the
    2nd and 3rd) -> Flatten -> Gemm(256 -> 128) -> ReLU -> Gemm(128 -> 10): 1.83 M MACs
    per image, 99.4% test accuracy. Input ``input`` [batch, 1, 8, 8], output ``logits``
    [batch, 10]."""
    return onnx.load_from_string(_digits_cnn_bytes())


def digits_mlp() -> onnx.ModelProto:
    """Gemm 64 -> 256 -> 256 -> 10 with ReLUs. Input ``input`` [batch, 64]."""
    return onnx.load_from_string(_digits_mlp_bytes())


def accuracy(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``proto`` on images ``x`` (reshaped to the model's input rank)."""
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rank = len(sess.get_inputs()[0].shape)
    x = x.reshape(len(x), -1) if rank == 2 else x
    return float((sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == y).mean())
