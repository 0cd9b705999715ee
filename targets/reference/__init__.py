"""Plain-PyTorch reference layers: the oracle every runtime target is tested against.

`FORMATS` maps a format name ("int", "fp16", ...) to an object with
`dequantize(qt) -> Tensor[out, in] float32`, `make_module(qt, bias) -> nn.Module` and
`tensor_specs(meta)` (and, for formats an embedding table can take, `dequantize_rows`;
`make_embedding` / `TiedHead` are the lookup and tied-head modules over such a table).
Each format lives in its own module with its byte layout as a table; registering a new one
is `@register_format("name")` on its class plus its module name in `FORMAT_MODULES` below.

This package owns decoding only; quantizers (`liftedge.quantize`) produce the tensors and
`liftedge.packed` stores them.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from liftedge.types import QuantizedTensor
from liftedge.targets.reference.registry import FORMATS, DequantLinear, Format, get_format, register_format
from liftedge.targets.reference.embedding import TableEmbedding, TiedHead

# One entry per format module; importing a module registers its formats.
FORMAT_MODULES = ("integer", "fp16", "liftquant")

for _name in FORMAT_MODULES:
    importlib.import_module(f"{__name__}.{_name}")


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Decode any registered format to a float32 weight [out, in]."""
    return get_format(qt.fmt).dequantize(qt)


def make_module(qt: QuantizedTensor, bias: torch.Tensor | None = None) -> nn.Module:
    """The reference module of `qt`'s format (x @ W^T + b)."""
    return get_format(qt.fmt).make_module(qt, bias)


def make_embedding(qt: QuantizedTensor, embed_scale: float | None = None) -> nn.Module:
    """The reference embedding lookup over a stored table (rows decoded on lookup)."""
    get_format(qt.fmt).check(qt)
    return TableEmbedding(qt, embed_scale)


__all__ = ["FORMATS", "FORMAT_MODULES", "DequantLinear", "Format", "TableEmbedding", "TiedHead", "dequantize",
           "get_format", "make_embedding", "make_module", "register_format"]
