"""Tensors stay on the device they came on (issue 17 §5: `plan --device cuda` crashed in the int
dequantizer, which built its column index on the CPU).

A second device type is had on every machine: `meta` (shapes only). A decode that mixes a
CPU-made helper tensor into tensors on another device fails there just as it fails on CUDA.
The `cuda` test runs the same path on a GPU (`pytest -m cuda` on a machine that has one).
"""

from __future__ import annotations

import pytest
import torch

from liftedge.quantize.rtn import IntConfig, RTNQuantizer
from liftedge.targets.reference.integer import IntFormat
from liftedge.types import QuantizedTensor


def _moved(qt: QuantizedTensor, device) -> QuantizedTensor:
    return QuantizedTensor(qt.fmt, {k: v.to(device) for k, v in qt.tensors.items()}, qt.meta)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int_dequantize_stays_on_the_tensors_device(symmetric):
    qt = RTNQuantizer(IntConfig(bits=4, group_size=32, symmetric=symmetric)).quantize(torch.randn(8, 96))
    out = IntFormat().dequantize(_moved(qt, "meta"))
    assert out.device.type == "meta" and out.shape == (8, 96)
    rows = IntFormat().dequantize_rows(_moved(qt, "meta"), torch.tensor([1, 5]))
    assert rows.device.type == "meta" and rows.shape == (2, 96)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run with -m cuda on a GPU machine)")
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_quantize_and_dequantize_on_cuda_match_cpu(symmetric):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    quantizer = RTNQuantizer(IntConfig(bits=4, group_size=64, symmetric=symmetric))
    cpu = IntFormat().dequantize(quantizer.quantize(w))
    gpu = IntFormat().dequantize(quantizer.quantize(w.cuda()))
    assert gpu.device.type == "cuda"
    # Same grid and rounding on both devices; float32 scale arithmetic may differ in the last ulp.
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
