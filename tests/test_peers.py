"""Peer quantizers of the quality benchmark (benchmarks/peers.py) read back against their runtimes.

The ORT check runs the real ONNX Runtime on the quantized MatMulNBits graph with an identity
input, so its output is the runtime's own dequantized weight: our numpy reading of the packed
initializers must equal it. The other checks pin the byte accounting to the formats' layouts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers


def _weight(out_f=96, in_f=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * 0.05


def _runtime_dense(model, k: int) -> np.ndarray:
    """W [K, N] as ONNX Runtime computes it: identity @ W through the MatMulNBits node."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = np.eye(k, dtype=np.float32)
    return sess.run(None, {"A": a})[0]


# (algo, bits, block, sym): every algorithm and bit width the quantizer offers here; in=320 with
# block 64 gives an odd 5 blocks (zero points padded per row), block 128 pads K (320 -> 384).
CASES = [("default", 4, 32, False), ("default", 4, 128, False), ("default", 2, 64, False),
         ("default", 8, 32, False), ("default", 4, 32, True), ("hqq", 4, 64, False), ("hqq", 2, 32, False),
         ("rtn", 4, 32, False), ("kquant", 4, 32, False)]


@pytest.mark.parametrize("algo,bits,block,sym", CASES)
def test_ort_dequantization_matches_runtime(algo, bits, block, sym):
    w = _weight()
    model = peers.ort_quantize_model(w, algo, bits, block, sym, dtype="fp32")
    ours, fields = peers.read_matmulnbits(model)
    ref = _runtime_dense(model, w.shape[1]).T
    # fp32 graph: the runtime's dequantize-then-matmul with a one-hot row is exact up to
    # float32 rounding of (q - zp) * scale, a few ulps of weights of size ~0.2.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    # and it is a quantization of w: error well under the weights' spread (std 0.05); 2-bit is coarse.
    err = np.abs(ours - w.numpy()).mean()
    assert err < (0.03 if bits == 2 else 0.01), err
    # the packed indices alone take bits/8 bytes per (K-padded) weight
    k_pad = -(-w.shape[1] // block) * block
    assert min(fields.values()) > 0 and max(fields.values()) == w.shape[0] * k_pad * bits // 8


# hqq is a benchmark-only dependency (not installed by .ci/setup): run with `pytest -m slow`
# after `pip install hqq`.
@pytest.mark.slow
def test_hqq_bytes_and_error():
    pytest.importorskip("hqq")
    w = _weight(64, 256)
    pt = peers.hqq_quantize(w, bits=4, group=64)
    # 4-bit indices packed 2 per byte + fp16 scale and zero per group of 64
    assert pt.nbytes == w.numel() // 2 + 2 * 2 * w.numel() // 64, pt.fields
    assert (pt.weight - w).abs().mean() < 0.01


def test_palettize_bytes_and_levels():
    pytest.importorskip("coremltools")
    w = _weight(64, 128)
    pt = peers.palettize_quantize(w, bits=2, group=32)
    # 2 LUTs (64 rows / 32) of 4 fp16 entries, 2-bit indices
    assert pt.nbytes == w.numel() * 2 // 8 + 2 * 4 * 2, pt.fields
    for rows in (pt.weight[:32], pt.weight[32:]):
        assert rows.unique().numel() <= 4
