"""The format registry: how each stored quantized format decodes, in plain PyTorch.

A format turns a `QuantizedTensor` (its `tensors` and `meta`) back into a float32 weight
[out_features, in_features] and into a Linear-like module. Every runtime target lowers
from these formats and is tested against them, so this is the oracle: clear, not fast.

Adding a format is one decorated class in its own module (plus that module's name in
`FORMAT_MODULES` of the package `__init__`):

    @register_format("myfmt")
    class MyFormat(Format):
        def tensor_specs(self, meta): ...   # field -> (dtype, shape), checked on load
        def dequantize(self, qt): ...       # -> Tensor[out, in] float32
        def example(self): ...              # a small valid QuantizedTensor, for the tests

A format's `meta` must hold `out_features` and `in_features` (the pack checks them against
the model's site) and everything else needed to decode its fields.

This module owns the registry and the shared base class; it does not own any byte layout
(each format's module documents its own) or how formats are chosen (the quantizers do).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from liftedge.errors import ArtifactError
from liftedge.types import QuantizedTensor


def stored_buffer(tensor: torch.Tensor) -> torch.Tensor:
    """A stored field as a reference module's buffer: the tensor itself, not a copy. A pack's
    tensors are views of its memory-mapped file (`liftedge.packed.read_weights`); a copy would
    put the whole pack on the heap (1.5 GB at 3B) beside the map. Nothing writes to them."""
    return tensor.detach()


FORMATS: dict[str, "Format"] = {}

# Rows decoded at once where a weight is decoded per call (a tied head, a one-pass model):
# 8192 rows of a 4096-wide layer are 134 MB as float32, against 2.1 GB for an 8B head whole.
DECODE_CHUNK_ROWS = 8192

# Whether reference modules keep what they decode (a float32 weight, unpacked signs) for their
# next call. Evaluation runs many batches and wants them kept; a single forward pass (the
# verification's `liftedge.verify.reference_along`) gains nothing, and at 8B they are GBs.
_keep_decoded = [True]


@contextmanager
def one_pass() -> Iterator[None]:
    """Within: reference modules decode per call, in row chunks where they can, and keep nothing."""
    _keep_decoded.append(False)
    try:
        yield
    finally:
        _keep_decoded.pop()


def keeps_decoded() -> bool:
    return _keep_decoded[-1]


def matmul_rows(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """x @ W^T for the stored weight `qt`, its rows decoded `DECODE_CHUNK_ROWS` at a time
    (`Format.dequantize_rows`), so no float32 copy of the whole weight is held."""
    fmt = get_format(qt.fmt)
    return matmul_chunked(x, int(qt.meta["out_features"]),
                          lambda start, stop: fmt.dequantize_rows(qt, torch.arange(start, stop)))


def matmul_chunked(x: torch.Tensor, out_features: int, rows) -> torch.Tensor:
    """x @ W^T with `rows(start, stop)` giving W's rows [start, stop), `DECODE_CHUNK_ROWS` at a time."""
    chunk = DECODE_CHUNK_ROWS
    return torch.cat([torch.matmul(x, rows(start, min(start + chunk, out_features)).to(x.device, x.dtype).t())
                      for start in range(0, out_features, chunk)], -1)


def register_format(name: str):
    """Class decorator: instantiate the format and register it under `name`."""

    def wrap(cls):
        if name in FORMATS:
            raise ValueError(f"format {name!r} is already registered")
        instance = cls()
        instance.name = name
        FORMATS[name] = instance
        return cls

    return wrap


def get_format(name: str) -> "Format":
    """The registered format `name`, or an ArtifactError listing the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ArtifactError(f"unknown weight format {name!r}; known formats: {sorted(FORMATS)}") from None


class Format:
    """Base class of a stored format; subclasses implement `tensor_specs`, `dequantize`, `example`."""

    name: str = ""

    def tensor_specs(self, meta: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The stored fields this format expects for `meta`: name -> (dtype, shape)."""
        raise NotImplementedError

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        """The weight [out_features, in_features] as float32."""
        raise NotImplementedError

    def example(self) -> QuantizedTensor:
        """A small valid stored tensor of this format (tests iterate the registry with it)."""
        raise NotImplementedError

    def make_module(self, qt: QuantizedTensor, bias: torch.Tensor | None) -> nn.Module:
        """A module computing x @ W^T + b, W decoded from the stored tensors."""
        return DequantLinear(qt, bias)

    def dequantize_rows(self, qt: QuantizedTensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (int64, any shape) of the weight as float32 [*rows.shape, in_features],
        decoding only those rows: what an embedding lookup needs. Formats that cannot serve as
        an embedding table (their rows are not independent) refuse."""
        raise ArtifactError(f"format {self.name!r} cannot store an embedding table (no row-wise decoding); "
                            "embedding tables take 'fp16' or 'int'")

    def decodes_rows(self) -> bool:
        """Whether this format implements `dequantize_rows`."""
        return type(self).dequantize_rows is not Format.dequantize_rows

    def check(self, qt: QuantizedTensor) -> None:
        """Raise ArtifactError if `qt`'s tensors do not match what its meta promises."""
        specs = self.tensor_specs(qt.meta)
        if set(specs) != set(qt.tensors):
            raise ArtifactError(f"format {self.name!r} expects fields {sorted(specs)}, got {sorted(qt.tensors)}")
        for field, (dtype, shape) in specs.items():
            t = qt.tensors[field]
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ArtifactError(
                    f"format {self.name!r} field {field!r}: expected {dtype} {list(shape)}, "
                    f"got {t.dtype} {list(t.shape)}"
                )


class DequantLinear(nn.Module):
    """Reference linear layer over a stored quantized weight: y = x @ W^T + b.

    The stored fields are kept as buffers named `q_<field>` (so `state_dict` shows the
    packed form); the float32 weight is decoded when first read (`weight`, the forward call)
    and cached in a non-persistent buffer, which keeps evaluation as fast as an ordinary
    Linear while a model whose layers a target swaps out before running never decodes it (an
    8B head is 2.1 GB as float32). Under `one_pass()` it decodes per call instead, by rows.
    The calling convention is the Linear/Conv1D one: x [..., in] -> y [..., out]; a GPT-2
    Conv1D site gets the same module, only its stored weight layout ([in, out]) differed.
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None):
        super().__init__()
        self.fmt = qt.fmt
        self.meta = dict(qt.meta)
        self._fields = tuple(qt.tensors)
        for field, tensor in qt.tensors.items():  # shared, not copied (`stored_buffer`)
            self.register_buffer(f"q_{field}", stored_buffer(tensor))
        self.out_features, self.in_features = int(qt.meta["out_features"]), int(qt.meta["in_features"])
        self.register_buffer("weight", None, persistent=False)  # decoded when first read (__getattr__)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())

    def stored(self) -> QuantizedTensor:
        """The stored weight as a QuantizedTensor (the buffers themselves, not copies)."""
        return QuantizedTensor(self.fmt, {f: self._buffers[f"q_{f}"] for f in self._fields}, self.meta)

    def __getattr__(self, name: str):
        if name == "weight" and "weight" in self._buffers and self._buffers["weight"] is None:
            self._buffers["weight"] = get_format(self.fmt).dequantize(self.stored())
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._buffers["weight"] is None and not keeps_decoded():
            fmt = get_format(self.fmt)
            y = matmul_rows(x, self.stored()) if fmt.decodes_rows() else \
                torch.matmul(x, fmt.dequantize(self.stored()).to(x.dtype).t())
        else:
            y = torch.matmul(x, self.weight.to(x.dtype).t())
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}, in_features={self.in_features}, out_features={self.out_features}"
