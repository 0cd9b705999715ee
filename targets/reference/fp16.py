"""The "fp16" format: a weight kept in half precision (a site a plan leaves unquantized).

| field    | dtype   | shape     |
|----------|---------|-----------|
| `weight` | float16 | [out, in] |

`meta` = {in_features, out_features}. This module owns only that layout.
"""

from __future__ import annotations

from typing import Any

import torch

from liftedge.types import QuantizedTensor
from liftedge.targets.reference.registry import Format, register_format


def encode_fp16(weight: torch.Tensor) -> QuantizedTensor:
    """Store a float weight [out, in] as fp16."""
    out_features, in_features = weight.shape
    return QuantizedTensor("fp16", {"weight": weight.detach().to(torch.float16).contiguous()},
                           dict(in_features=in_features, out_features=out_features))


@register_format("fp16")
class Fp16Format(Format):
    def tensor_specs(self, meta: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"weight": (torch.float16, (meta["out_features"], meta["in_features"]))}

    def example(self) -> QuantizedTensor:
        return encode_fp16(torch.randn(6, 10, generator=torch.Generator().manual_seed(0)))

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return qt.tensors["weight"].to(torch.float32)

    def dequantize_rows(self, qt: QuantizedTensor, rows: torch.Tensor) -> torch.Tensor:
        return qt.tensors["weight"][rows].to(torch.float32)
