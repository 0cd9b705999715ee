"""Round-to-nearest: each weight to the nearest point of its group's min-max integer grid.

The baseline every other quantizer must beat; needs no calibration data. Produces the
"int" format (`liftedge.targets.reference.integer`).
"""

from __future__ import annotations

from typing import Any

import torch

from liftedge.quantize.base import IntConfig, group_grid, quantize_codes, register_quantizer
from liftedge.targets.reference.integer import encode_int
from liftedge.types import QuantizedTensor


@register_quantizer("rtn", IntConfig, needs_stats=False)
class RTNQuantizer:
    def __init__(self, config: IntConfig):
        self.config = config

    def quantize(self, weight: torch.Tensor, stats: Any | None = None) -> QuantizedTensor:
        c = self.config
        w = weight.detach().to(torch.float32)
        g = min(c.group_size, w.shape[1])
        scale, zero = group_grid(w, c.bits, g, c.symmetric)
        cols = torch.arange(w.shape[1], device=w.device) // g
        codes = quantize_codes(w, scale[:, cols], zero[:, cols], c.bits)
        return encode_int(codes, scale, zero, c.bits, g, c.symmetric)
