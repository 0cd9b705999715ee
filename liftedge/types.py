"""The small frozen dataclasses that flow between liftedge's stages.

`Site`  : one weight tensor that can be quantized (a linear layer, an embedding, the head).
`Rate`  : a LiftQuant code D/d (D sign bits for every d weights).
`QuantizedTensor`: the canonical quantized form of one site, before any target repacks it.

Stages own their own configs and results (calibration statistics live in `calibrate`,
plans in `plan`); this module holds only what several stages exchange.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import torch

SiteKind = Literal["linear", "embedding", "head"]


@dataclass(frozen=True)
class Site:
    """One quantizable weight of a model.

    `name` is the module path (e.g. "model.layers.0.self_attn.q_proj"); the weight is
    `<name>.weight`. Weights are described as [out_features, in_features] whatever their
    storage: GPT-2's Conv1D stores [in, out] and is marked `transposed`. `block` is the
    decoder block index, None for embeddings and the head. `tied_to` names the site whose
    weight this one shares (counted and quantized once, under the owner).
    """

    name: str
    kind: SiteKind
    out_features: int
    in_features: int
    block: int | None = None
    transposed: bool = False
    tied_to: str | None = None

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Rate:
    """A LiftQuant code LQ-D/d: blocks of d weights coded by D signs (D/d bits per weight)."""

    D: int
    d: int

    def __post_init__(self) -> None:
        if self.d < 1 or self.D <= self.d:
            raise ValueError(f"a rate needs D > d >= 1, got {self.D}/{self.d}")

    @property
    def bits_per_weight(self) -> float:
        return self.D / self.d

    @property
    def fraction(self) -> Fraction:
        return Fraction(self.D, self.d)

    @property
    def name(self) -> str:
        return f"{self.D}/{self.d}"

    @property
    def slug(self) -> str:
        """File-name form, e.g. "lq-24-10"."""
        return f"lq-{self.D}-{self.d}"

    @classmethod
    def parse(cls, text: str) -> "Rate":
        m = _RATE_RE.match(text)
        if not m:
            raise ValueError(f"a rate is written D/d, e.g. 24/10; got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"LQ-{self.name}"


@dataclass
class QuantizedTensor:
    """The canonical quantized form of one site's weight.

    `fmt` names the format (a key of the format registry in `liftedge.targets.reference`,
    e.g. "int", "liftquant", "fp16"); `tensors` are the stored arrays (already packed: their
    `nbytes` are what the site costs on disk); `meta` is JSON-able (bits, group size, rate,
    shapes) and, with `fmt`, is enough to decode `tensors`.
    """

    fmt: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
