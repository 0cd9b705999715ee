"""Quality of a model on a text: perplexity and KL divergence from a reference model.

Owns the standard perplexity protocol on token ids (non-overlapping windows of `ctx` tokens,
the tail dropped, every token after the first of its window scored; for a model trained with
BOS, each window is BOS + `ctx - 1` text tokens, all of them scored) and the mean
KL(P_ref || P_model) of next-token distributions over the same scored tokens, computed
window by window so no more than one window's logits of each model are ever held.
Does not own: reading or tokenizing the text (`text`), loading models (`model`, `packed`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from liftedge.errors import LiftedgeError
from liftedge.progress import progress

log = logging.getLogger(__name__)

# Positions whose log-softmax is formed at once: bounds the float32 temporaries at
# 4 x chunk x vocab (about 800 MB for a 49k vocabulary) instead of 4 x ctx x vocab.
_POSITION_CHUNK = 1024


@dataclass(frozen=True)
class EvalResult:
    """Perplexity (and KL when a reference was given) over `tokens_scored` tokens."""

    ppl: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    kl: float | None  # mean KL(P_ref || P_model) per scored token, in nats; None without reference
    tokens_scored: int
    windows: int
    ctx: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_module(model) -> nn.Module:
    """Accept a `LoadedModel` where a module is expected."""
    return model if isinstance(model, nn.Module) else model.model


def count_windows(ntokens: int, ctx: int, bos: int | None = None) -> int:
    """How many whole non-overlapping windows of `ctx` tokens `ntokens` hold (BOS included)."""
    return ntokens // (ctx - 1 if bos is not None else ctx)


def _check_ctx(model: nn.Module, ctx: int) -> None:
    if ctx < 2:
        raise LiftedgeError(f"--ctx must be at least 2 tokens, got {ctx}")
    # Learned absolute positions (GPT-2's n_positions) cannot go beyond their table.
    limit = getattr(model.config, "n_positions", None)
    if limit is not None and ctx > limit:
        raise LiftedgeError(f"--ctx {ctx} exceeds this model's {limit} learned positions; use --ctx {limit} or less")
    trained = getattr(model.config, "max_position_embeddings", None)
    if trained is not None and ctx > trained:
        log.warning("ctx %d is beyond the %d positions the model was configured for", ctx, trained)


@torch.no_grad()
def evaluate(model, token_ids: torch.Tensor, *, ctx: int = 2048, windows: int | None = None,
             reference=None, bos: int | None = None) -> EvalResult:
    """Perplexity of `model` on `token_ids` [T] (and KL from `reference` when given).

    `bos`: the BOS id (`text.bos_id`) for a model that expects one; each window is then BOS
    followed by `ctx - 1` text tokens, and every text token is scored (ctx - 1 per window,
    as without BOS)."""
    model = _as_module(model)
    reference = _as_module(reference) if reference is not None else None
    _check_ctx(model, ctx)
    token_ids = token_ids.reshape(-1)
    available = count_windows(token_ids.numel(), ctx, bos)
    width = ctx - 1 if bos is not None else ctx
    if available == 0:
        raise LiftedgeError(f"the text gives {token_ids.numel()} tokens; one window of --ctx {ctx} needs {ctx}")
    if windows is not None and not 1 <= windows <= available:
        raise LiftedgeError(f"--windows must be between 1 and {available} (the text holds {available} "
                            f"windows of {ctx} tokens), got {windows}")
    n_windows = windows or available
    nll_sum, kl_sum = 0.0, 0.0
    for w in progress(range(n_windows), desc="evaluate", unit="window"):
        ids = token_ids[w * width : (w + 1) * width]
        if bos is not None:
            ids = torch.cat([ids.new_tensor([bos]), ids])
        ids = ids[None]
        nll, kl = _score_window(model, reference, ids)
        nll_sum += nll
        kl_sum += kl
    scored = n_windows * (ctx - 1)
    nll = nll_sum / scored
    return EvalResult(ppl=math.exp(nll), nll=nll, kl=kl_sum / scored if reference is not None else None,
                      tokens_scored=scored, windows=n_windows, ctx=ctx)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits[0, :-1]


def _score_window(model: nn.Module, reference: nn.Module | None, ids: torch.Tensor) -> tuple[float, float]:
    """(sum of NLL, sum of KL) over the ctx-1 predicted tokens of one window."""
    logits = _logits(model, ids)
    ref_logits = _logits(reference, ids) if reference is not None else None
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise LiftedgeError(f"the reference model predicts {ref_logits.shape[-1]} token ids, the model "
                            f"{logits.shape[-1]}: they must share a tokenizer")
    targets = ids[0, 1:].to(logits.device)
    nll_sum, kl_sum = 0.0, 0.0
    for start in range(0, targets.numel(), _POSITION_CHUNK):
        sl = slice(start, start + _POSITION_CHUNK)
        logp = F.log_softmax(logits[sl].float(), dim=-1)
        nll_sum -= float(logp.gather(-1, targets[sl, None]).double().sum())
        if ref_logits is not None:
            ref_logp = F.log_softmax(ref_logits[sl].float(), dim=-1)
            kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum(-1).double().sum())
    return nll_sum, kl_sum
