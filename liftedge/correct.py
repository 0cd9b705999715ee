"""Intra-block correction (paper section 3.3 and appendix A).

After coding, each decoder block is fine-tuned so that its output on the *quantized*
model's carried activations matches the full-precision block's output on the
full-precision activations: minimise MSE(block_q(x_q), block_fp(x_fp)). Trained are the
fused decode T* (here its factors: in_scale, mix1, mix2, block_scale, the layer's
codebook M, the output scale) with Adam at `lr_transform`, and the signs through a
straight-through estimator on a latent float copy at `lr_signs`.

The paper's schedule (2 epochs over 4096 x 2048 tokens, lr 1e-3 / 2e-5) is scaled to the
small calibration sets a laptop can afford by taking more passes over fewer samples;
`CorrectionConfig` keeps every knob explicit.

This module owns the trainable layer and the per-block loop; the streaming over blocks
and the choice of what to quantize belong to `liftedge.quantize.pipeline`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from liftedge.bitpack import unpack_signs_torch
from liftedge.packed import replace_module
from liftedge.stream import BlockInputs, forward_block
from liftedge.targets.reference.liftquant import (
    encode_liftquant,
    factors,
    weight_from_factors,
)
from liftedge.types import QuantizedTensor

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine")
_FLOAT_FACTORS = ("scale", "in_scale", "mix1", "mix2", "block_scale", "codebook")


@dataclass(frozen=True)
class CorrectionConfig:
    """How each block is fine-tuned after coding."""

    epochs: int = 4
    lr_transform: float = 1e-3   # paper: 1e-3 for T*
    lr_signs: float = 2e-5       # paper: 2e-5 for Wq (3B-14B models)
    # Latent signs start at ±margin: a sign flips after about margin / lr_signs Adam steps
    # that push the same way, so noise in one step cannot flip it but a consistent
    # gradient over a few dozen steps can.
    sign_margin: float = 5e-4
    # "constant" keeps both learning rates; "cosine" (default) anneals them to zero over the block's
    # steps, so the last passes refine instead of oscillating around the optimum.
    schedule: str = "cosine"
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown correction schedule {self.schedule!r}; expected one of {SCHEDULES}")


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latent):
        return torch.where(latent >= 0, 1.0, -1.0).to(latent.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class TrainableLift(nn.Module):
    """A lift-project linear whose float factors are parameters, and its signs too (via STE).

    With `sign_margin=None` the signs are frozen: they stay bit-packed (uint8, 1 bit per
    sign) and are unpacked on each call, so a whole model of such layers costs no more
    memory than its pack (end-to-end fine-tuning, `liftedge.finetune`).
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, sign_margin: float | None):
        super().__init__()
        f = factors(qt)
        self.meta = dict(qt.meta)
        self.sign_width = f["signs"].shape[1]
        if sign_margin is None:
            self.latent = None
            self.register_buffer("packed_signs", qt.tensors["signs"].clone())
        else:
            self.latent = nn.Parameter(f["signs"] * sign_margin)
            self.packed_signs = None
        for name in _FLOAT_FACTORS:
            setattr(self, name, nn.Parameter(f[name].clone()))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def signs(self) -> torch.Tensor:
        """±1 [out, n_blocks * D]: the STE of the latent signs, or the frozen unpacked ones."""
        if self.latent is None:
            return unpack_signs_torch(self.packed_signs, self.sign_width)
        return _SignSTE.apply(self.latent)

    def weight(self) -> torch.Tensor:
        """The dense weight. While training, its intermediates are recomputed in backward.

        The rebuild keeps ~6 weight-sized tensors for backward (the float signs alone are D/d
        times the weight): ~85 MB for a SmolLM2 block, a third of the correction's working
        set, for ~20% more correction time. Recomputing gives the same gradients bit for bit.
        """
        float_factors = [getattr(self, n) for n in _FLOAT_FACTORS]
        if not torch.is_grad_enabled():
            return weight_from_factors(self.signs(), *float_factors)
        return checkpoint(self._rebuild, self.latent, *float_factors, use_reentrant=False)

    def _rebuild(self, latent: torch.Tensor | None, *float_factors: torch.Tensor) -> torch.Tensor:
        signs = _SignSTE.apply(latent) if latent is not None else self.signs()
        return weight_from_factors(signs, *float_factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)

    def export(self) -> QuantizedTensor:
        with torch.no_grad():
            signs = torch.where(self.signs() >= 0, 1.0, -1.0)
        qt = encode_liftquant(signs, *(getattr(self, n).detach() for n in _FLOAT_FACTORS))
        qt.meta.update({k: v for k, v in self.meta.items() if k not in qt.meta})
        return qt


@contextlib.contextmanager
def installed(model: nn.Module, layers: dict[str, nn.Module]):
    """Put `layers` where the model's submodules of those names are; put the originals back after."""
    originals = {name: model.get_submodule(name) for name in layers}
    for name, layer in layers.items():
        replace_module(model, name, layer)
    try:
        yield
    finally:
        for name, module in originals.items():
            replace_module(model, name, module)


@contextlib.contextmanager
def trainable_only(module: nn.Module, layers: list[nn.Module]):
    """Inside the `with`, only the parameters of `layers` (installed in `module`) take gradients.

    Every other parameter of `module` that took gradients is frozen and thawed again after;
    the layers' parameters end frozen (they are exported, not trained further).
    """
    own = {id(p) for layer in layers for p in layer.parameters()}
    others = [p for p in module.parameters() if p.requires_grad and id(p) not in own]
    for p in others:
        p.requires_grad_(False)
    for layer in layers:
        layer.requires_grad_(True)
    try:
        yield
    finally:
        for layer in layers:
            layer.requires_grad_(False)
        for p in others:
            p.requires_grad_(True)


def module_bias(model: nn.Module, name: str) -> torch.Tensor | None:
    """The bias of the submodule `name` (detached), or None: what a replacement layer keeps."""
    bias = getattr(model.get_submodule(name), "bias", None)
    return None if bias is None else bias.detach()


def _param_groups(layers: list[TrainableLift], cfg: CorrectionConfig) -> list[dict]:
    signs = [layer.latent for layer in layers]
    rest = [getattr(layer, n) for layer in layers for n in _FLOAT_FACTORS]
    return [{"params": signs, "lr": cfg.lr_signs}, {"params": rest, "lr": cfg.lr_transform}]


def correct_block(block: nn.Module, block_index: int, layers: dict[str, TrainableLift],
                  x_q: BlockInputs, targets: list[torch.Tensor], cfg: CorrectionConfig) -> dict[str, float]:
    """Train the TrainableLift modules already installed in `block`; return the loss history.

    `x_q` are the quantized model's inputs to this block, `targets` the full-precision
    block's outputs (one tensor per batch). Every other parameter of the block is frozen.
    """
    torch.manual_seed(cfg.seed * 7919 + block_index)
    trainable = list(layers.values())
    with trainable_only(block, trainable):
        optimizer = torch.optim.Adam(_param_groups(trainable, cfg))
        steps = max(1, cfg.epochs * len(targets))
        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
                     if cfg.schedule == "cosine" else None)
        scale = torch.stack([t.float().pow(2).mean() for t in targets]).mean().clamp_min(1e-12)
        history = {"loss_before": _eval_loss(block, block_index, x_q, targets, scale)}
        order = torch.Generator().manual_seed(cfg.seed * 31 + block_index)
        for _ in range(cfg.epochs):
            for b in torch.randperm(len(targets), generator=order).tolist():
                optimizer.zero_grad(set_to_none=True)
                out = forward_block(block, x_q, block_index, b)
                loss = (out - targets[b].to(out.dtype)).pow(2).mean() / scale
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
        history["loss_after"] = _eval_loss(block, block_index, x_q, targets, scale)
    log.debug("block %d correction: relative MSE %.4g -> %.4g", block_index,
              history["loss_before"], history["loss_after"])
    return history


@torch.no_grad()
def _eval_loss(block, block_index, x_q, targets, scale) -> float:
    total = 0.0
    for b, target in enumerate(targets):
        out = forward_block(block, x_q, block_index, b)
        total += float((out - target.to(out.dtype)).pow(2).mean() / scale)
    return total / len(targets)
