"""Export-time rewrites that keep a decoder layer's small operators inside XNNPACK partitions.

XNNPACK's partitioner rejects two patterns that every Llama-style layer has, and each rejected
node splits a partition in two:

- RMSNorm's variance, `x.pow(2).mean(-1, keepdim=True)`: XNNPACK lowers `mean` only over the
  two innermost dimensions of a 4D tensor (global average pooling);
- rope's `rotate_half`, two `slice_copy`s of the head and a `cat`: slices on a dynamic shape
  (the sequence dimension) are not delegated.

In a lift-project program (whose linears are our operator, outside XNNPACK) that made ~7
delegate calls per layer where 3 are needed, at ~6 us of XNNPACK's per-call overhead each plus
the portable `mean`, `slice_copy` and `unsqueeze_copy` calls between them: ~15% of SmolLM2's
decode time (`liftedge profile`). The rewrites, same function in other operators:

- `RmsNormFc`: the variance as a [hidden -> 1] linear of x*x whose weight is 1/hidden
  (XNNPACK's fully-connected), the rest as in transformers;
- `rope_without_slices`: `rotate_half(x)` as `x @ R`, R the signed half-swap permutation
  (exact: each output element is one input times ±1), and cos/sin broadcast over the heads
  without `unsqueeze` where the batch is 1 (always, in these programs).

Numerics: rotate_half is exact; the variance sums x*x/hidden instead of x*x then /hidden,
a float32 rounding difference (~1e-7 relative), far inside verification's tolerance.

Applied to the families whose modeling code has these exact forms (`FAMILIES`); other
families export unchanged. `apply(model)` swaps the norms (permanent); `rope_patched(model)`
patches the family's `apply_rotary_pos_emb` for the duration of one export.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
from torch import nn

# model_type -> the RMSNorm class name of that family's modeling module (weight * x / rms).
ROTATION_BUFFER = "liftedge_rope_rotation"
FAMILIES = {"llama": "LlamaRMSNorm", "mistral": "MistralRMSNorm", "qwen2": "Qwen2RMSNorm", "qwen3": "Qwen3RMSNorm"}


class RmsNormFc(nn.Module):
    """RMSNorm over the last dimension with its variance as a linear (XNNPACK-delegable)."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, 1, 1, x.shape[-1])   # [rows, 1, 1, hidden]: XNNPACK lowers a 4D mean
        variance = (rows * rows).mean((2, 3), keepdim=True)           # over the two innermost dims
        return (self.weight * (rows * torch.rsqrt(variance + self.eps))).reshape(_static(x.shape))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def _static(shape) -> list[int]:
    """`shape` with its traced (symbolic) size as -1: XNNPACK delegates a reshape only when
    every size is a constant (one -1 allowed). Programs here have one dynamic dimension."""
    return [d if isinstance(d, int) else -1 for d in shape]


def family(model: nn.Module) -> str | None:
    """The model's family if these rewrites apply to it, else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if model_type in FAMILIES else None


def apply(model: nn.Module) -> int:
    """Swap every RMSNorm of a supported family for `RmsNormFc`; returns how many."""
    name = FAMILIES.get(family(model) or "")
    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ == name:
                setattr(parent, child_name, RmsNormFc(child.weight, child.variance_epsilon))
                swapped += 1
    return swapped


def rotation_weight(head_dim: int) -> torch.Tensor:
    """R^T [head_dim, head_dim], R the matrix with x @ R == cat(-x[h:], x[:h]), as a linear's
    weight (`linear(x, R^T) == x @ R`)."""
    h, i = head_dim // 2, torch.arange(head_dim // 2)
    r = torch.zeros(head_dim, head_dim)
    r[i + h, i] = -1.0
    r[i, i + h] = 1.0
    return r.T.contiguous()


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *, rotation: torch.Tensor):
    """transformers' `apply_rotary_pos_emb` for q, k [1, H, S, D] and cos, sin [1, S, D] without
    slices or unsqueezes (same result; `rotation` = `rotation_weight(D)`); other layouts as
    transformers computes them."""
    if not (q.dim() == 4 and q.shape[0] == 1 and cos.shape[0] == 1 and unsqueeze_dim == 1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return (q * cos) + _rotate_half_sliced(q) * sin, (k * cos) + _rotate_half_sliced(k) * sin
    return (q * cos) + _rotate_half(q, rotation) * sin, (k * cos) + _rotate_half(k, rotation) * sin


def _rotate_half(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) of x [B, H, S, D]'s last dimension as a 2D linear on the [B, S, H, D]
    tensor it was transposed from (a 4D linear decomposes to bmm; reshaping the transposed
    tensor would copy it)."""
    b, h, s, d = x.shape
    rows = x.transpose(1, 2).reshape(-1, d)
    return nn.functional.linear(rows, rotation.to(x.dtype)).reshape(_static((b, s, h, d))).transpose(1, 2)


def _rotate_half_sliced(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@contextlib.contextmanager
def rope_patched(model: nn.Module) -> Iterator[bool]:
    """While open, the family's modeling module computes rope with `apply_rotary_pos_emb`
    above; yields whether it patched (False for other families)."""
    fam = family(model)
    module = sys.modules.get(f"transformers.models.{fam}.modeling_{fam}") if fam else None
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None:
        yield False
        return
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # A buffer of the model read through it while tracing: the export holds it once, as a
    # weight XNNPACK takes (a tensor made while tracing would be traced, a global one lifted
    # as a constant the XNNPACK lowering rejects).
    model.register_buffer(ROTATION_BUFFER, rotation_weight(head_dim), persistent=False)
    module.apply_rotary_pos_emb = lambda q, k, cos, sin, unsqueeze_dim=1: apply_rotary_pos_emb(
        q, k, cos, sin, unsqueeze_dim, rotation=getattr(model, ROTATION_BUFFER))
    try:
        yield True
    finally:
        module.apply_rotary_pos_emb = original


def drop_inverse_transposes(program: torch.export.ExportedProgram) -> int:
    """Remove `transpose(transpose(x, a, b), a, b)` pairs from an exported graph (in place);
    returns how many. transformers' attention turns V to [B, H, S, D] and the LLM-op cache
    turns it back: in a partition that swallows both, XNNPACK would output its own input,
    which it rejects ("pass through arguments")."""
    graph = program.graph_module.graph
    transpose = torch.ops.aten.transpose.int
    dropped = 0
    for node in list(graph.nodes):
        inner = node.args[0] if node.target is transpose else None
        if isinstance(inner, torch.fx.Node) and inner.target is transpose \
                and {node.args[1], node.args[2]} == {inner.args[1], inner.args[2]}:
            node.replace_all_uses_with(inner.args[0])
            graph.erase_node(node)
            dropped += 1
    if dropped:
        graph.eliminate_dead_code()
        program.graph_module.recompile()
    return dropped
