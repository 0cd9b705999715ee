"""Export-time modules that replace a loaded pack's reference layers before `torch.export`.

| pack site            | module here             | graph                                              |
|----------------------|-------------------------|----------------------------------------------------|
| "liftquant" linear   | `ops.LqLinear`          | `liftedge::lq_linear` (or its stock-op expansion)  |
| "int" linear         | `IntDequantLinear`      | packed codes -> bit planes (bitwise_and) -> float, |
|                      |                         | (code - zero) * fp16 scale, then linear            |
| fp16 linear / norms  | unchanged (fp32)        | XNNPACK                                            |
| embedding (fp16)     | `Fp16Embedding`         | gather rows of the fp16 table, cast to fp32        |
| head (fp16, maybe tied) | `Fp16Head`           | fp16 linear on the same fp16 table, cast to fp32   |

The "int" dequantization is stock operators on the pack's own codes (any bit width, ragged
groups), so the artifact reproduces the pack's values exactly and stays at packed size;
torchao 8da4w would re-quantize the weights (different grid, 8-bit activations) and is used
only by the benchmark's baseline. This module owns those replacements; which site gets which
is decided in `export.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from liftedge.types import QuantizedTensor


def unpack_codes_graph(packed: torch.Tensor, nbits: int, n: int) -> torch.Tensor:
    """uint8 [rows, nbytes] -> float32 codes [rows, n] (liftedge.bitpack layout) in stock ops."""
    masks = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    bits = (torch.bitwise_and(packed.unsqueeze(-1), masks) != 0).reshape(packed.shape[0], -1)
    bits = bits[:, : n * nbits].reshape(packed.shape[0], n, nbits).to(torch.float32)
    weights = torch.tensor([float(1 << j) for j in range(nbits)])
    return torch.matmul(bits, weights)


class IntDequantLinear(nn.Module):
    """An "int" site (`targets/reference/integer.py`): packed codes dequantized in the graph."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None):
        super().__init__()
        self.meta = dict(qt.meta)
        self.register_buffer("codes", qt.tensors["codes"].clone())
        self.register_buffer("scale", qt.tensors["scale"].to(torch.float16).clone())
        if not self.meta["symmetric"]:
            self.register_buffer("zero", qt.tensors["zero"].clone())
        cols = torch.arange(self.meta["in_features"]) // self.meta["group_size"]
        self.register_buffer("cols", cols, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        m = self.meta
        codes = unpack_codes_graph(self.codes, m["bits"], m["in_features"])
        ng = self.scale.shape[1]
        if m["symmetric"]:
            zero = torch.full_like(self.scale, float(1 << (m["bits"] - 1)), dtype=torch.float32)
        else:
            zero = unpack_codes_graph(self.zero, m["bits"], ng)
        scale = self.scale.to(torch.float32)
        return (codes - zero[:, self.cols]) * scale[:, self.cols]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)


class Fp16Embedding(nn.Module):
    """Token embedding over an fp16 table (as packed); rows are cast to fp32 after the gather."""

    def __init__(self, table: torch.Tensor, scale: float | None = None):
        super().__init__()
        self.register_buffer("table", table.detach().to(torch.float16).clone())
        self.embed_scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = nn.functional.embedding(ids, self.table).to(torch.float32)
        return x if self.embed_scale is None else x * self.embed_scale


class Fp16Head(nn.Module):
    """Output head over an fp16 weight (tied: the embedding's own table, stored once).

    With `custom_op` it calls liftedge::fp16_linear (fp32 activations and sums, the table
    read as fp16 in place); otherwise a stock fp16 linear, which XNNPACK takes: it rounds
    the activation to fp16 and copies the table into its own blob (stored twice when tied).
    """

    def __init__(self, owner: nn.Module, attr: str, bias: torch.Tensor | None, custom_op: bool = True):
        super().__init__()
        self._owner = [owner]  # not a submodule: the table is registered once, on its owner
        self._attr = attr
        self.custom_op = custom_op
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liftedge.targets.executorch.ops import fp16_linear_op

        w = getattr(self._owner[0], self._attr)
        if self.custom_op:
            y = fp16_linear_op()(x, w)
        else:
            y = nn.functional.linear(x.to(torch.float16), w).to(torch.float32)
        return y if self.bias is None else y + self.bias
