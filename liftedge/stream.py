"""Block-by-block streaming through a decoder (the "Catcher" technique of GPTQ).

Owns: capturing the inputs of decoder block 0 together with the arguments the model passes
to each of its blocks (attention mask, rotary position embeddings, position ids, cache off),
and running one block on carried hidden states. A caller walks the blocks in order, feeding
block i's outputs to block i+1, so peak memory is the model plus one block's activations.
Used by `calibrate` (statistics) and by quantizers that train each block on the quantized
model's carried activations. Does not own: what is done with the activations.

The arguments are recorded for *every* block, not only block 0: Gemma 3 alternates sliding
and full attention, so its blocks receive different masks and rotary tables. They depend
only on the batch shape (samples are unpadded), so one set is kept per distinct shape.

Typical use (a quantizer carrying the quantized model's activations):

    inputs = capture_block_inputs(model, tokens, batch_size=8)
    for i, block in enumerate(decoder_blocks(model)):
        targets = run_block(block, inputs, i)                # full-precision block outputs
        ...quantize `block`; train it with forward_block(block, inputs, i, k) vs targets[k]...
        advance_block(block, inputs, i)                      # carry the quantized outputs

`advance_block` replaces the carried batches one by one, so a stream costs one copy of the
activations, not two; streams that start equal may share tensors (nothing writes into them).

A stream may be *stored* narrower than blocks compute (`storage=torch.float16`): each batch is
cast up when a block reads it and down when it is stored, which halves the memory of a
carried stream. A batch whose values do not fit fp16 (|x| > 65504, e.g. a model with massive
residual activations) stays in the compute dtype, so storage never changes a value's range,
only rounds it (relative 2^-11, far below a quantized model's own error).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from liftedge.model import decoder_blocks
from liftedge.upcast import compute_dtype

log = logging.getLogger(__name__)


# The norm between the last block and the head, by attribute name on the base model.
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm whose output is the head's input (identity for a model without one)."""
    base = getattr(model, "base_model", model)
    for name in _FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    log.warning("%s has no final norm named %s; the head input is the last block's output",
                type(model).__name__, "/".join(_FINAL_NORM_NAMES))
    return nn.Identity()


# Blocks' call arguments besides the hidden states: (positional args, keyword args).
BlockCall = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class BlockInputs:
    """Carried hidden states (one tensor per batch) and the arguments every block receives.

    `hidden[k]` is batch k's input to the current block, [b, L, hidden]. `calls[shape][i]`
    holds block i's extra arguments for batches of that (b, L) shape.
    """

    hidden: list[torch.Tensor]
    calls: dict[tuple[int, int], list[BlockCall]] = field(default_factory=dict)
    # The dtype blocks take and return; `hidden` may hold a narrower copy (see `store`).
    compute_dtype: torch.dtype | None = None
    storage: torch.dtype | None = None

    def batch(self, k: int) -> torch.Tensor:
        """Batch k in the dtype the blocks compute in."""
        h = self.hidden[k]
        return h if self.compute_dtype is None else h.to(self.compute_dtype)

    def store(self, k: int, value: torch.Tensor) -> None:
        """Make `value` batch k, narrowed to the storage dtype where every value fits it."""
        self.hidden[k] = narrow(value, self.storage)

    def call_args(self, block_index: int, batch: int) -> BlockCall:
        """Block `block_index`'s extra (args, kwargs) for batch number `batch`."""
        shape = tuple(self.hidden[batch].shape[:2])
        return self.calls[shape][block_index]

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        """The same block arguments with new carried states (e.g. a block's outputs)."""
        if [h.shape[:2] for h in hidden] != [h.shape[:2] for h in self.hidden]:
            raise ValueError("new hidden states must keep the batch shapes")
        return BlockInputs(hidden=hidden, calls=self.calls, compute_dtype=self.compute_dtype, storage=self.storage)

    @property
    def ntokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def narrow(value: torch.Tensor, storage: torch.dtype | None) -> torch.Tensor:
    """`value` cast to `storage` if that keeps every value finite, else `value` unchanged."""
    if storage is None or value.dtype == storage:
        return value
    narrowed = value.to(storage)
    return narrowed if bool(torch.isfinite(narrowed).all()) else value


class _Stop(Exception):
    """Raised by the recorder in the last block: nothing after the blocks needs to run."""


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_dtype(model: nn.Module) -> torch.dtype:
    return compute_dtype(model)  # float32 for a narrow model computing in float32 (liftedge.upcast)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8,
                         storage: torch.dtype | None = None) -> BlockInputs:
    """Block 0's inputs for `tokens` [n, L] in batches, plus every block's call arguments.

    `storage` narrows the carried states (see `BlockInputs.store`); None keeps the model's dtype.

    Each block's `forward` is replaced, for the duration of one model call per batch, by a
    recorder that stores its arguments and passes the hidden states through unchanged; the
    last block stops the call, so the embedding is the only real work done.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n, L], got shape {tuple(tokens.shape)}")
    blocks = decoder_blocks(model)
    device = _model_device(model)
    hidden: list[torch.Tensor] = []
    calls: dict[tuple[int, int], list[BlockCall]] = {}
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        recorded = _record(model, blocks, batch)
        hidden.append(narrow(recorded[0][0], storage))
        calls.setdefault(tuple(batch.shape), [(args, kwargs) for _, args, kwargs in recorded])
    return BlockInputs(hidden=hidden, calls=calls, compute_dtype=_model_dtype(model), storage=storage)


def _record(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor) -> list[tuple]:
    recorded: list[tuple] = []
    last = len(blocks) - 1

    def recorder(index: int):
        def forward(hidden_states, *args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "layer_past")}
            args = tuple(None if _is_cache(a) else a for a in args)
            recorded.append((hidden_states, args, kwargs))
            if index == last:
                raise _Stop
            return hidden_states
        return forward

    with forwards_replaced(blocks, lambda i, _: recorder(i)):
        try:
            model(input_ids=batch, use_cache=False)
        except _Stop:
            pass
    if len(recorded) != len(blocks):
        raise RuntimeError(f"recorded {len(recorded)} of {len(blocks)} decoder blocks")
    return recorded


@contextlib.contextmanager
def forwards_replaced(modules, make):
    """Inside the `with`, module i's forward is `make(i, its current forward)`; after it, the
    forward it had before comes back (an instance wrapper such as `liftedge.upcast`'s stays)."""
    before = [m.__dict__.get("forward") for m in modules]
    for i, m in enumerate(modules):
        m.forward = make(i, m.forward)
    try:
        yield
    finally:
        for m, forward in zip(modules, before):
            if forward is None:
                del m.forward
            else:
                m.forward = forward


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache")


def forward_block(block: nn.Module, inputs: BlockInputs, block_index: int, batch: int,
                  hidden: torch.Tensor | None = None) -> torch.Tensor:
    """One batch through one block (gradients follow the caller's grad mode)."""
    args, kwargs = inputs.call_args(block_index, batch)
    h = inputs.batch(batch) if hidden is None else hidden
    out = block(h, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, block_index: int) -> list[torch.Tensor]:
    """`block`'s outputs for every carried batch: the next block's inputs."""
    return [forward_block(block, inputs, block_index, k) for k in range(len(inputs.hidden))]


@torch.no_grad()
def advance_block(block: nn.Module, inputs: BlockInputs, block_index: int) -> None:
    """Replace each carried batch of `inputs` by `block`'s output on it, in place.

    The same values as `run_block`, but a batch's input is released as soon as its output
    exists: one batch of extra activations instead of a second copy of the whole stream.
    """
    for k in range(len(inputs.hidden)):
        inputs.store(k, forward_block(block, inputs, block_index, k))
