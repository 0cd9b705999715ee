"""Export-time modules that replace a loaded pack's reference layers before `torch.export`.

| pack site            | module here             | graph                                              |
|----------------------|-------------------------|----------------------------------------------------|
| "liftquant" linear   | `ops.LqLinear`          | `liftedge::lq_linear` (or its stock-op expansion)  |
| "int" linear         | `IntDequantLinear`      | packed codes -> bit planes (bitwise_and) -> float, |
|                      |                         | (code - zero) * fp16 scale, then linear            |
| fp16 linear          | `Fp16Head` over its own | `liftedge::fp16_linear` (custom_ops=False:         |
|                      |  fp16 weight            |  unchanged, XNNPACK fp32)                          |
| norms                | unchanged (fp32), or    | XNNPACK; folded into `liftedge::lq_rms_linear` /   |
|                      | folded (`fusion.py`)    | `lq_glu` where only lift-project layers read them  |
| embedding (fp16)     | `Fp16Embedding`         | gather rows of the fp16 table, cast to fp32        |
| head (fp16, maybe tied) | `Fp16Head`           | fp16 linear on the same fp16 table, cast to fp32   |
| embedding ("int")    | `IntEmbedding`          | index_select of code/scale/zero rows, dequantized  |
| head tied to it      | `IntTiedHead`           | `liftedge::int_linear` over the embedding's codes   |
|                      |                         | (custom_ops=False: stock-op dequant + linear)      |
| untied "int" head    | `IntDequantLinear`      | `liftedge::int_linear` (custom_ops=False: as any   |
|                      |  (custom_op=True)       | "int" linear)                                       |

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
        self.custom_op = False  # decoder-block sites: stock ops; an output head may set it (`export.swap_sites`)

    def weight(self) -> torch.Tensor:
        return dequant_rows(self, self.codes, self.scale, getattr(self, "zero", None))

    @property
    def kernel_supported(self) -> bool:
        """Whether liftedge::int_linear reads this table (4/8-bit codes with stored zero points)."""
        from liftedge.targets.executorch.ops import INT_LINEAR_BITS

        return self.meta["bits"] in INT_LINEAR_BITS and not self.meta["symmetric"]

    def linear(self, x: torch.Tensor, custom_op: bool, bias: torch.Tensor | None) -> torch.Tensor:
        """x · W^T (+ bias): the C++ kernel over the packed fields, or stock-op dequant + linear."""
        if custom_op and self.kernel_supported:
            from liftedge.targets.executorch.ops import int_linear_op

            y = int_linear_op()(x, self.codes, self.scale, self.zero, self.meta["bits"], self.meta["group_size"])
            return y if bias is None else y + bias
        return nn.functional.linear(x, self.weight(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.custom_op, self.bias)


def dequant_rows(table: "IntDequantLinear", codes: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None) -> torch.Tensor:
    """(code - zero) * scale per group for packed rows `codes` [r, nbytes] of `table`'s format
    (scale [r, ng] fp16, zero [r, packed ng] or None when symmetric): float32 [r, in]."""
    m = table.meta
    values = unpack_codes_graph(codes, m["bits"], m["in_features"])
    if zero is None:
        z = torch.full_like(scale, float(1 << (m["bits"] - 1)), dtype=torch.float32)
    else:
        z = unpack_codes_graph(zero, m["bits"], scale.shape[1])
    s = scale.to(torch.float32)
    return (values - z[:, table.cols]) * s[:, table.cols]


class IntEmbedding(IntDequantLinear):
    """An "int" embedding table: the looked-up rows of codes, scales and zero points are
    gathered (index_select on the packed uint8 rows) and only they are dequantized."""

    def __init__(self, qt: QuantizedTensor, scale: float | None = None):
        super().__init__(qt, None)
        self.embed_scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        pick = lambda t: torch.index_select(t, 0, flat)  # noqa: E731
        zero = getattr(self, "zero", None)
        rows = dequant_rows(self, pick(self.codes), pick(self.scale), None if zero is None else pick(zero))
        rows = rows.reshape(*ids.shape, self.meta["in_features"])
        return rows if self.embed_scale is None else rows * self.embed_scale


class IntTiedHead(nn.Module):
    """The head tied to an `IntEmbedding`, over its table (registered on the embedding only, so
    stored once): liftedge::int_linear with `custom_op`, else stock-op dequant + float linear
    (exact, but the whole table is dequantized per call)."""

    def __init__(self, owner: IntEmbedding, bias: torch.Tensor | None, custom_op: bool = True):
        super().__init__()
        self._owner = [owner]  # not a submodule: the table is registered once, on its owner
        self.custom_op = custom_op
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._owner[0].linear(x, self.custom_op, self.bias)


class Fp16Embedding(nn.Module):
    """Token embedding over an fp16 table (as packed); rows are cast to fp32 after the gather."""

    def __init__(self, table: torch.Tensor, scale: float | None = None):
        super().__init__()
        self.register_buffer("table", table.detach().to(torch.float16))  # a pack's fp16 table: no copy
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


def fp16_linear(weight: torch.Tensor, bias: torch.Tensor | None, custom_op: bool = True) -> Fp16Head:
    """An `Fp16Head` over its own copy of `weight` in fp16 (an untied head, or a linear the pack
    keeps fp16); the table is registered on a holder the module keeps."""
    holder = nn.Module()
    holder.register_buffer("weight", weight.detach().to(torch.float16))  # a pack's fp16 weight: no copy
    layer = Fp16Head(holder, "weight", bias, custom_op)
    layer.holder = holder
    return layer


def int8_head(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A head over `weight` (the fp16 table) as torchao's int8 dynamic-activation, int8
    per-row weight linear, which ExecuTorch's XNNPACK partitioner lowers to its int8 GEMM
    (qd8-f32-qc8w): one int8 byte per weight plus an fp32 scale per row, held in the XNNPACK
    blob (a tied table is therefore stored a second time, in int8, beside the fp16 one the
    embedding reads). Activations are quantized per token to int8 at run time."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight.detach().float())
        if bias is not None:
            lin.bias.copy_(bias.detach().float())
    holder = nn.Sequential(lin)
    quantize_(holder, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)))
    return holder[0]
