"""What every quantizer shares: the `Quantizer` protocol, the registry, the integer grid.

A quantizer turns one weight [out_features, in_features] (float32, whatever the module's
storage layout) and, if it `needs_stats`, that site's calibration statistics (an object
with `hessian` = E[x x^T], [in, in] float32) into a `QuantizedTensor` of some registered
format. Quantizers are registered by method name with `@register_quantizer`; each is
built from its own frozen config dataclass.

The integer grid (shared by RTN and GPTQ) is asymmetric min-max per group, as in GPTQ:
the range [min(w_min, 0), max(w_max, 0)] is split into 2^bits - 1 steps, scale = step,
zero = round(-min / scale). Scales are rounded UP to the next fp16 value (they are stored
in fp16), so the grid still covers the range and every in-range weight is within scale/2
of a grid point.

This module owns the grid arithmetic and the registry; byte layouts belong to the formats
in `liftedge.targets.reference`, and the choice of sites to `liftedge.quantize`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from liftedge.targets.reference.integer import INT_BITS, symmetric_zero
from liftedge.types import QuantizedTensor

_FP16_MIN_SUBNORMAL = 2.0**-24
_FP16_MAX = 65504.0


@runtime_checkable
class Quantizer(Protocol):
    """One quantization method bound to its config."""

    name: str
    needs_stats: bool

    def quantize(self, weight: torch.Tensor, stats: Any | None) -> QuantizedTensor: ...


@dataclass(frozen=True)
class QuantMethod:
    """A registry entry: how to build a quantizer of method `name` from its config."""

    name: str
    config_cls: type
    build: Callable[[Any], Quantizer]
    needs_stats: bool
    example_config: Any = None  # a small valid config for tests; None = config_cls()

    def example(self) -> Any:
        return self.example_config if self.example_config is not None else self.config_cls()


QUANTIZERS: dict[str, QuantMethod] = {}


def register_quantizer(name: str, config_cls: type, needs_stats: bool, example_config: Any = None):
    """Class decorator: register a quantizer class whose constructor takes a `config_cls`.

    `example_config` is what the registry-wide tests use when `config_cls()` has no defaults.
    """

    def wrap(cls):
        if name in QUANTIZERS:
            raise ValueError(f"quantizer {name!r} is already registered")
        cls.name, cls.needs_stats = name, needs_stats
        QUANTIZERS[name] = QuantMethod(name, config_cls, cls, needs_stats, example_config)
        return cls

    return wrap


def get_method(name: str) -> QuantMethod:
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown quantization method {name!r}; choose one of {sorted(QUANTIZERS)}") from None


def make_quantizer(name: str, config: Any) -> Quantizer:
    """Build the quantizer `name` from `config` (an instance of its config class)."""
    method = get_method(name)
    if not isinstance(config, method.config_cls):
        raise ValueError(f"method {name!r} takes a {method.config_cls.__name__}, got {type(config).__name__}")
    return method.build(config)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-able dict (for manifests)."""
    return dataclasses.asdict(config)


@dataclass(frozen=True)
class IntConfig:
    """Integer grid: `bits` per weight, groups of `group_size` input columns.

    group_size >= in_features means one group per row (per-channel).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in INT_BITS:
            raise ValueError(f"bits must be one of {INT_BITS}, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")


def _round_up_fp16(scale: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= scale (as float32); scale must be positive."""
    if bool((scale > _FP16_MAX).any()):
        raise ValueError(f"a quantization step exceeds the fp16 range ({_FP16_MAX}); weights too large")
    scale = scale.clamp_min(_FP16_MIN_SUBNORMAL)
    half = scale.to(torch.float16)
    below = half.to(torch.float32) < scale
    # For positive fp16 values, +1 on the bit pattern is the next representable value.
    bumped = (half.view(torch.int16) + 1).view(torch.float16)
    return torch.where(below, bumped, half).to(torch.float32)


def int_grid(w: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max grid of w [out, n]: (scale [out], zero [out]), float32, scale fp16-exact."""
    maxq = (1 << bits) - 1
    xmin = w.min(dim=1).values.clamp_max(0)
    xmax = w.max(dim=1).values.clamp_min(0)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmax = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
        scale = _round_up_fp16(2 * xmax / maxq)
        return scale, torch.full_like(scale, float(symmetric_zero(bits)))
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = _round_up_fp16((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def group_grid(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids of every group of w [out, in]: (scale, zero), each [out, n_groups]; last group may be shorter."""
    pairs = [int_grid(w[:, c:c + group_size], bits, symmetric) for c in range(0, w.shape[1], group_size)]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (float32 holding integers in [0, 2^bits)) of w on a grid broadcastable to it."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the expected squared output error for inputs with E[x x^T] = H."""
    diff = (weight - approx).to(torch.float64)
    return float(((diff @ hessian.to(torch.float64)) * diff).sum())
