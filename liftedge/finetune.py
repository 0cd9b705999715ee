"""End-to-end fine-tuning of a LiftQuant model's continuous parameters (paper appendix B).

After the block-by-block pass (`liftedge.quantize.pipeline`) every lift-project layer keeps
its signs; only its float factors are trained, all layers at once, so that the quantized
model's next-token distribution matches the float model's over the calibration tokens.
Two learning rates as in the paper: the scales (per-output `scale`, `in_scale` = s1^-1,
`block_scale` = s2^-1) and the transform (the Kronecker factors and the codebook M).

The loss is the KL divergence from the float model, not the paper's cross entropy on the
text: calibration text from the evaluation's domain (WikiText validation here) would let
cross entropy adapt the model to that domain and credit the quantizer with a gain the float
model does not have. The teacher is kept as its top-k log-probabilities per calibration
token, taken before quantization (`teacher_topk`), and the divergence is computed over the
k tokens plus one bucket for the rest of the vocabulary (an exact KL between those coarsened
distributions), so no second model is held in memory.

Memory: the signs stay bit-packed (`TrainableLift` with frozen signs), each decoder block runs
under activation checkpointing (the backward pass holds one block's intermediates at a time),
and a step sees one calibration sample. A fine-tune that does not lower the KL on the
calibration tokens is discarded, as a block correction that does not pay is.

This module owns the teacher targets, the loss and the training loop; what to quantize and
how the pack is written belong to the callers (`quantize/save.py`, `benchmarks/quality.py`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from liftedge.correct import TrainableLift, installed, module_bias, trainable_only
from liftedge.progress import progress
from liftedge.sites import decoder_blocks, list_sites, set_site_weight
from liftedge.stream import forwards_replaced
from liftedge.targets.reference import dequantize
from liftedge.types import QuantizedTensor

log = logging.getLogger(__name__)

_SCALES = ("scale", "in_scale", "block_scale")
_TRANSFORM = ("mix1", "mix2", "codebook")
# Teacher tokens kept per position. For a 49k-token vocabulary the top 64 hold nearly all of
# the float model's probability mass on text; the rest is one bucket of the divergence.
TOPK = 64


@dataclass(frozen=True)
class FinetuneConfig:
    """How the whole quantized model is fine-tuned after the block-by-block pass."""

    epochs: int = 1
    lr_transform: float = 3e-4  # paper appendix B: 3e-4 for the transformation parameters
    lr_scale: float = 1e-5      # paper appendix B: 1e-5 for the quantization scales
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"fine-tuning needs at least one epoch, got {self.epochs}")


@dataclass
class TeacherTargets:
    """The float model's top-k log-probabilities per calibration token: [n, L, k] each."""

    index: torch.Tensor
    logprob: torch.Tensor


@torch.no_grad()
def teacher_topk(model: nn.Module, tokens: torch.Tensor, k: int = TOPK) -> TeacherTargets:
    """The (float) model's top-k next-token log-probabilities for every calibration token."""
    index, logprob = [], []
    for row in progress(tokens, desc="teacher", unit="sample"):
        lp = torch.log_softmax(_logits(model, row[None]).float(), -1)
        top = lp.topk(k, dim=-1)
        index.append(top.indices)
        logprob.append(top.values)
    return TeacherTargets(torch.cat(index), torch.cat(logprob))


def coarse_kl(logits: torch.Tensor, index: torch.Tensor, teacher_lp: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over positions, on the teacher's top k tokens + the rest.

    `logits` [.., V] are the student's; `index`, `teacher_lp` [.., k] the teacher's top k.
    """
    lq = torch.log_softmax(logits.float(), -1).gather(-1, index)
    p = teacher_lp.exp()
    rest_p = (1 - p.sum(-1)).clamp_min(1e-9)
    rest_q = (1 - lq.exp().sum(-1)).clamp_min(1e-9)
    kl = (p * (teacher_lp - lq)).sum(-1) + rest_p * (rest_p.log() - rest_q.log())
    return kl.mean()


def finetune(model: nn.Module, qtensors: dict[str, QuantizedTensor], tokens: torch.Tensor,
             teacher: TeacherTargets, cfg: FinetuneConfig) -> tuple[dict[str, QuantizedTensor], dict]:
    """Fine-tune every "liftquant" site of `model` end to end; return the new tensors and a record.

    `model` holds the decoded weights of `qtensors` (as `quantize_streaming` leaves it) and is
    left holding the decoded weights of the returned tensors.
    """
    lq_sites = [s for s in list_sites(model) if qtensors.get(s.name) is not None
                and qtensors[s.name].fmt == "liftquant"]
    if not lq_sites:
        return qtensors, {"kept": False, "why": "no liftquant site"}
    device = next(model.parameters()).device
    layers = {s.name: TrainableLift(qtensors[s.name], module_bias(model, s.name), None).to(device) for s in lq_sites}
    with installed(model, layers), trainable_only(model, list(layers.values())), \
            _checkpointed(decoder_blocks(model)):
        record = _train(model, list(layers.values()), tokens, teacher, cfg)
        new = {name: layer.export() for name, layer in layers.items()}
    if record["kl_after"] >= record["kl_before"]:
        return qtensors, {**record, "kept": False}
    with torch.no_grad():
        for s in lq_sites:
            set_site_weight(model, s, dequantize(new[s.name]).to(device))
    return {**qtensors, **new}, {**record, "kept": True}


def _train(model, layers: list[TrainableLift], tokens, teacher: TeacherTargets, cfg: FinetuneConfig) -> dict:
    optimizer = torch.optim.Adam([
        {"params": [getattr(layer, n) for layer in layers for n in _SCALES], "lr": cfg.lr_scale},
        {"params": [getattr(layer, n) for layer in layers for n in _TRANSFORM], "lr": cfg.lr_transform}])
    steps = cfg.epochs * tokens.shape[0]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    record = {"kl_before": _eval_kl(model, tokens, teacher), "epochs": []}
    order = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        total = 0.0
        for i in progress(torch.randperm(tokens.shape[0], generator=order).tolist(),
                          desc=f"fine-tune {epoch + 1}/{cfg.epochs}", unit="sample"):
            optimizer.zero_grad(set_to_none=True)
            loss = _sample_kl(model, tokens, teacher, i)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
        record["epochs"].append(total / tokens.shape[0])
    record["kl_after"] = _eval_kl(model, tokens, teacher)
    log.info("fine-tune: calibration KL %.4f -> %.4f", record["kl_before"], record["kl_after"])
    return record


@torch.no_grad()
def _eval_kl(model, tokens, teacher: TeacherTargets) -> float:
    total = 0.0
    for i in range(tokens.shape[0]):
        total += float(_sample_kl(model, tokens, teacher, i))
    return total / tokens.shape[0]


def _sample_kl(model, tokens, teacher: TeacherTargets, i: int) -> torch.Tensor:
    """The divergence on calibration sample i (a batch of one)."""
    device = tokens.device
    return coarse_kl(_logits(model, tokens[i:i + 1]), teacher.index[i:i + 1].to(device),
                     teacher.logprob[i:i + 1].to(device))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _run_checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def _checkpointed(blocks: nn.ModuleList):
    """Recompute each block's intermediates in the backward pass instead of keeping them.

    The model stays in eval mode (no dropout), so the recomputation is exact.
    """
    with forwards_replaced(blocks, lambda _, forward: functools.partial(_run_checkpointed, forward)):
        yield
