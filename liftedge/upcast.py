"""Run a model whose weights stay in their checkpoint's narrow dtype, computing in float32.

Checkpoints of the models people put on phones are fp16 or bf16. Loaded as float32, the whole
model is converted into heap memory: 4 bytes per weight, 32 GB for an 8B model, although the
streaming quantizer and the calibration passes need one decoder block at a time. Loaded in
its own dtype, a safetensors checkpoint stays a memory map of the file (`liftedge.pages`), and
this module makes that model compute in float32 module by module:

* each decoder block and the final norm run with float32 copies of their narrow parameters
  and buffers swapped in for the call (the module's own tensors are never
  written, so the map's pages stay clean), on float32 inputs; the copies live for the
  call, and the pages the call read are given back afterwards (`release_clean_pages`).
  A block's plain linears are `NarrowLinear`s instead, widening their weight themselves;
  only the small rest (norms, biases of other layers) is copied;
* the token (and position) embeddings return their looked-up rows in float32 (fp16 and bf16
  values are exactly representable: the cast loses nothing);
* a plain Linear output head becomes a `NarrowLinear`, which widens its weight per call, a
  slice of rows at a time when the copy would be large (forward and backward).

A float32 copy of fp16 weights holds the same values, so a block computes exactly what it
computes when the model is loaded in float32 (tested). Under autograd with large copies (a
backward pass through the whole model, as the Fisher statistics take) a block runs through
non-reentrant activation checkpointing, so the copies are made again in the backward pass
instead of being held for it: memory stays below one block's float weights either way.

Owns the wrappers and `compute_dtype`, the dtype a (possibly wrapped) model computes in.
Loading a model this way is `liftedge.model.load_model(..., mapped=True)`.

A pack's plain fp16 layers (the linears a plan leaves unquantized, an fp16 embedding and head)
take the lighter form: `NarrowLinear` / `NarrowEmbedding` widen their weight per call
(`keep_narrow`, used by `liftedge.packed.load_packed`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any

import torch
from torch import nn

from liftedge.pages import release_clean_pages

log = logging.getLogger(__name__)

_ATTR = "_liftedge_compute_dtype"
# Above this many bytes of float copies, a block under autograd is checkpointed (the copies
# are remade in the backward pass rather than held for it). Below it, only small tensors are
# narrow (norm weights while the block's linears are trainable float32 layers, as in the
# intra-block correction) and recomputing the block would cost more than holding them.
_CHECKPOINT_MIN_NBYTES = 16 << 20


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in: float32 for a wrapped narrow model, else its parameters'."""
    dtype = getattr(model, _ATTR, None)
    if dtype is not None:
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def compute_in(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Make a model whose floating weights are narrower than `dtype` compute in `dtype`.

    Wraps the model's embeddings, decoder blocks, final norm and output head (see the module
    docstring) and returns the model. A model already in `dtype` is returned unchanged. Raises
    if a narrow parameter sits outside every wrapped module (a family this does not cover).
    """
    narrow = [name for name, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype]
    if not narrow:
        return model
    from liftedge.sites import decoder_blocks
    from liftedge.stream import final_norm

    blocks = decoder_blocks(model)
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    covered: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.Embedding) and id(module) not in in_blocks:
            module.register_forward_hook(_cast_output(dtype))
            covered.append(module)
    wrapped = [*blocks, final_norm(model)]
    head = model.get_output_embeddings()
    if head is not None and narrowable([head]):
        # widened a slice of rows at a time when large (an 8B head's float copy is 2.1 GB)
        keep_narrow([head])
        covered.append(head)
    else:
        wrapped.append(head)
    for module in wrapped:
        if module is not None and any(True for _ in module.parameters()):
            _wrap(module, dtype)
            covered.append(module)
    inside = {id(p) for m in covered for p in m.parameters()}
    outside = [name for name, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype
               and id(p) not in inside]
    if outside:
        raise ValueError(f"{type(model).__name__}: narrow weights outside the blocks, norm, head and embeddings "
                         f"cannot be computed in {dtype}: {outside[:3]}")
    setattr(model, _ATTR, dtype)
    # What the model computes in, as a float32-loaded one says: packs copy this config.
    model.config.dtype = dtype
    log.info("%s keeps %d narrow tensors mapped, computing in %s", type(model).__name__, len(narrow), dtype)
    return model


def _cast_output(dtype: torch.dtype):
    def hook(module, args, output):
        return _cast(output, dtype)
    return hook


def _wrap(module: nn.Module, dtype: torch.dtype) -> None:
    """Replace `module.forward` by one that runs it on float copies of its narrow tensors.

    Its plain linears become `NarrowLinear`s first: they widen their own weight per call (a
    slice of rows at a time when large, and in the backward pass again), so the call holds one
    slice of a large projection rather than float copies of the whole block. At 8B that is
    ~0.2 GB instead of 0.87 GB, through the Fisher pass's recomputed backward too."""
    linears = [m for m in module.modules()
               if type(m) is nn.Linear and m.weight.is_floating_point() and m.weight.dtype != dtype]
    keep_narrow(linears)
    own_weights = {id(m.weight) for m in module.modules() if isinstance(m, NarrowLinear)}
    inner = module.forward

    def forward(*args, **kwargs):
        args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
        narrow = _narrow_tensors(module, dtype)
        nbytes = sum(t.numel() for t in narrow.values()) * dtype.itemsize
        copied = {name: t for name, t in narrow.items() if id(t) not in own_weights}

        def run(*a, **k):
            with _swapped(module, {name: t.detach().to(dtype) for name, t in copied.items()}):
                return inner(*a, **k)

        try:
            if torch.is_grad_enabled() and nbytes >= _CHECKPOINT_MIN_NBYTES and _wants_grad(args, kwargs, module):
                return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)
        finally:
            release_clean_pages(narrow.values())  # the mapped pages this call read

    module.forward = forward


@contextlib.contextmanager
def _swapped(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """Inside the `with`, the named parameters / buffers of `module` are `tensors`.

    The module's tables are pointed at the copies and back; nothing is written into a tensor,
    and autograd keeps the copies it saw. (`torch.func.functional_call` does the same but
    calls the module again, which would run its forward hooks twice.)
    """
    saved = []
    try:
        for name, tensor in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            table = owner._parameters if leaf in owner._parameters else owner._buffers
            saved.append((table, leaf, table[leaf]))
            table[leaf] = tensor
        yield
    finally:
        for table, leaf, tensor in reversed(saved):
            table[leaf] = tensor


def _narrow_tensors(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = itertools.chain(module.named_parameters(remove_duplicate=False),
                              module.named_buffers(remove_duplicate=False))
    return {name: t for name, t in tensors if t.is_floating_point() and t.dtype != dtype}


def _wants_grad(args, kwargs, module: nn.Module) -> bool:
    tensors = [t for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


def _leaves(value: Any):
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """`value` with every narrower floating tensor (in tuples, lists and dicts) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        narrower = value.is_floating_point() and value.dtype != dtype and value.element_size() < dtype.itemsize
        return value.to(dtype) if narrower else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if type(value) is dict:
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value  # caches, model outputs, None, ints


# A narrow weight whose widened copy would pass this many bytes is widened a slice of rows at
# a time, forward and backward (an 8B output head, 128256 x 4096, would be a 2.1 GB copy; a
# 64 MB slice keeps the matrix products long enough to run at full speed).
SLICE_NBYTES = 64 << 20


class _SlicedLinear(torch.autograd.Function):
    """x Wᵀ for a narrow W widened `rows` rows at a time, in the forward and the backward pass:
    no float copy of the whole weight is made, nor saved for the backward pass (which widens
    the slices again). Each slice's mapped pages are given back once it is used."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape[0], weight.shape[0])
        for part in _row_slices(weight, rows):
            out[:, part].copy_(flat @ _widened(weight[part], x.dtype).T)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.rows = rows
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = g.new_zeros(g.shape[0], weight.shape[1])
            for part in _row_slices(weight, ctx.rows):
                grad_x.addmm_(g[:, part], _widened(weight[part], g.dtype))
            grad_x = grad_x.reshape(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = (g.T @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None


def _row_slices(weight: torch.Tensor, rows: int) -> list[slice]:
    return [slice(r, r + rows) for r in range(0, weight.shape[0], rows)]


def _widened(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    wide = part.to(dtype)
    release_clean_pages([part])
    return wide


class NarrowLinear(nn.Linear):
    """A Linear whose weight stays in its stored narrow dtype (a pack's fp16, a view of the
    mapped file) and is widened to the input's dtype for each call: the numbers of a float32
    Linear holding the widened weight (the cast is exact), without keeping that copy. A weight
    whose copy would pass `SLICE_NBYTES` is widened a slice of rows at a time (`_SlicedLinear`;
    equal to the whole product up to the float32 summation order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        w = self.weight
        if w.dtype == x.dtype or w.numel() * x.element_size() <= SLICE_NBYTES:
            return nn.functional.linear(x, w.to(x.dtype), bias)
        rows = max(1, SLICE_NBYTES // (w.shape[1] * x.element_size()))
        out = _SlicedLinear.apply(x, w, rows)
        return out if bias is None else out + bias


class NarrowEmbedding(nn.Embedding):
    """An Embedding over a narrow table whose looked-up rows come out float32 (exact)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(torch.float32)


# Plain module types that compute exactly in float32 over a narrow weight once given the
# class beside them; subclasses (Gemma 3's scaled embedding, GPT-2's Conv1D) are not covered.
_NARROW_CLASSES: dict[type, type] = {nn.Linear: NarrowLinear, nn.Embedding: NarrowEmbedding}


def narrowable(modules: list[nn.Module]) -> bool:
    """Whether a weight held by `modules` (more than one when tied) can stay narrow."""
    return bool(modules) and all(type(m) in _NARROW_CLASSES for m in modules)


def keep_narrow(modules: list[nn.Module]) -> None:
    """Make `modules` (see `narrowable`) compute in float32 over their narrow weight, in place:
    their class becomes the narrow one; parameters, ties and hooks are kept."""
    for m in modules:
        m.__class__ = _NARROW_CLASSES[type(m)]


def widen(module: nn.Module) -> nn.Module:
    """Undo `keep_narrow` inside `module`: each narrow layer holds its weight as float32 again
    (a tied weight stays one parameter) and is a plain Linear / Embedding. For consumers that
    need float weights in place (an exporter's stock float linear, a dense float model)."""
    plain = {narrow: base for base, narrow in _NARROW_CLASSES.items()}
    widened: dict[int, nn.Parameter] = {}
    for m in module.modules():
        if type(m) in plain:
            w = m.weight
            if id(w) not in widened:
                widened[id(w)] = nn.Parameter(w.detach().float(), requires_grad=w.requires_grad)
            m.weight = widened[id(w)]
            m.__class__ = plain[type(m)]
    return module
