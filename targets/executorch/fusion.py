"""Fold a decoder block's RMSNorms and gated-MLP activation into the lift-project ops.

At decode a token's RMSNorm, SiLU and multiply are a few thousand flops, but each is an
operator call of its own (XNNPACK reshapes every operator of a delegate call per token; the
norm's mean is a portable kernel), and together they cost about as much as the lift-project
layers of a small model. With the layers already `ops.LqLinear` (`export.swap_sites`):

| pattern (per decoder block)                         | becomes                                  |
|-----------------------------------------------------|------------------------------------------|
| attention norm -> q_proj, k_proj, v_proj            | each `liftedge::lq_rms_linear`, the norm |
|                                                     | weight in its in_scale; the norm dropped |
| MLP norm -> gate_proj, up_proj -> act(gate) * up    | one `liftedge::lq_glu` (norm folded in)  |
| residual + o_proj(...), residual + down_proj(...)   | `liftedge::lq_linear_add` (graph pass,   |
|                                                     | `fuse_residual_adds`)                    |
| the three `lq_rms_linear` of one input (q, k, v)    | one `liftedge::lq_rms_linear3` (graph    |
|                                                     | pass, `fuse_shared_input_layers`)        |
| transpose -> RoPE (rotate-half) -> transpose of q,  | `liftedge::rope` on the [B, S, H, D]     |
| k; transpose -> transpose of v                      | projection (graph pass, `fuse_rope`)     |

A norm is folded only when every layer it feeds is a custom-op `LqLinear` and the module
computes exactly `x / sqrt(mean(x^2) + eps) * w` (w its weight, or 1 + weight as in Gemma 3),
which is checked numerically on the module itself, so an unfamiliar norm stays as it is; the
gate/up pair only when both are bias-free custom-op `LqLinear`s of the same shape and the
activation is SiLU or tanh-GELU, checked the same way. Which norm feeds the MLP is per family
(`MLP_NORM`). The residual adds are in the decoder block's own forward, not in a module, so
they are found in the exported graph instead: an `aten.add.Tensor` of two same-shape float32
tensors, one of them an `lq_linear` whose only user is that add. The result is the same model
up to float rounding (verification checks it).

This module owns the rewrite; the ops are `ops.py` (torch) and `kernels/lq_linear_et.cpp`.
"""

from __future__ import annotations

import torch
from torch import nn

from liftedge.targets.executorch import ops

# family -> the norm before the MLP (the attention's is `input_layernorm` in all of them)
MLP_NORM = {"llama": "post_attention_layernorm", "mistral": "post_attention_layernorm",
            "qwen2": "post_attention_layernorm", "qwen3": "post_attention_layernorm",
            "gemma3_text": "pre_feedforward_layernorm"}
ATTN_NORM = "input_layernorm"
# Error (|a - b| / (1 + |b|), elementwise) within which a module counts as the normalization or
# activation it is checked against: both sides are float32 evaluations of the same formula in
# another order, ~1e-7 apart; anything else (a mean subtraction, a bias, another eps, exact
# GELU for its tanh form: 2e-4) is off by more than 1e-5.
_MATCH_TOL = 1e-5


class FusedMlp(nn.Module):
    """down(lq_glu(x)): the gated MLP with gate, up and the activation in one op."""

    def __init__(self, glu: ops.LqGlu, down: nn.Module):
        super().__init__()
        self.glu, self.down_proj = glu, down  # down_proj: the site's own name in module paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.glu(x))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.isfinite(a).all()) and float(((a - b).abs() / (1 + b.abs())).max()) < _MATCH_TOL


def rms_weight(norm: nn.Module, width: int) -> tuple[torch.Tensor, float] | None:
    """(w, eps) when `norm(x) == x / sqrt(mean(x^2) + eps) * w` for this module, else None."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.shape != (width,) or not isinstance(eps, float):
        return None
    # small inputs (mean square 1e-4) so that the eps inside the module shows in its output
    x = 0.01 * torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = norm(x).float()
        for w in (weight.float(), 1.0 + weight.float()):
            if _close(y, ops.rms_normalize(x, eps) * w):
                return w.detach().clone(), eps
    return None


def glu_act(mlp: nn.Module) -> int | None:
    """The `lq_glu` code of the MLP's activation (SiLU or tanh-GELU), else None."""
    act = getattr(mlp, "act_fn", None)
    if act is None:
        return None
    t = torch.linspace(-8, 8, 257)
    with torch.no_grad():
        y = act(t)
    return next((code for code in ops.GLU_ACTS.values() if _close(y, ops.glu_activation(t, code))), None)


def _lq_layers(parent: nn.Module, names: tuple[str, ...]) -> list[ops.LqLinear] | None:
    layers = [getattr(parent, n, None) for n in names]
    return layers if all(isinstance(m, ops.LqLinear) and m.custom_op for m in layers) else None


def _fold(block: nn.Module, norm_name: str, layers: list[ops.LqLinear]) -> bool:
    norm = getattr(block, norm_name, None)
    found = None if norm is None else rms_weight(norm, layers[0].in_scale.shape[0])
    if found is None:
        return False
    for layer in layers:
        layer.fold_norm(*found)
    setattr(block, norm_name, nn.Identity())
    return True


def fuse_blocks(model: nn.Module, family: str | None) -> dict[str, int]:
    """Rewrite every decoder block of `model` it can (see the module doc); returns counts."""
    counts = {"attention_norms_folded": 0, "mlp_norms_folded": 0, "glu_fused": 0}
    if family not in MLP_NORM:
        return counts
    for block in model.modules():
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None or not hasattr(block, ATTN_NORM):
            continue
        qkv = _lq_layers(attn, ("q_proj", "k_proj", "v_proj"))
        if qkv is not None and _fold(block, ATTN_NORM, qkv):
            counts["attention_norms_folded"] += 1
        gate_up = _lq_layers(mlp, ("gate_proj", "up_proj"))
        act = glu_act(mlp)
        if (gate_up is None or act is None or any(m.bias is not None for m in gate_up)
                or gate_up[0].scale.shape != gate_up[1].scale.shape):
            continue
        if _fold(block, MLP_NORM[family], gate_up):
            counts["mlp_norms_folded"] += 1
        block.mlp = FusedMlp(ops.LqGlu(*gate_up, act), mlp.down_proj)
        counts["glu_fused"] += 1
    return counts


def _recompiled(program: torch.export.ExportedProgram, fused: int, force: bool = False) -> int:
    """After a pass: check the graph and regenerate the module's code when it changed; `fused`."""
    if fused or force:
        program.graph_module.graph.lint()
        program.graph_module.recompile()
    return fused


def _shape_key(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return (str(val.dtype), tuple(str(s) for s in val.shape)) if isinstance(val, torch.Tensor) else None


def fuse_residual_adds(program: torch.export.ExportedProgram) -> int:
    """Rewrite `residual + lq_linear(x, ...)` in the exported graph to one `lq_linear_add` call
    (see the module doc); returns how many adds were taken in. The add is elementwise on equal
    float32 shapes only (no broadcast, no `alpha`), so the op computes exactly what it replaces."""
    graph, linear = program.graph_module.graph, ops.op()
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.add.Tensor or node.kwargs or len(node.args) != 2:
            continue
        a, b = node.args
        lq = next((n for n in (b, a) if isinstance(n, torch.fx.Node) and n.target == linear and len(n.users) == 1), None)
        residual = a if lq is b else b
        key = _shape_key(node)
        if lq is None or key is None or key[0] != "torch.float32" or not (_shape_key(a) == _shape_key(b) == key):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.liftedge.lq_linear_add.default, (*lq.args, residual))
        new.meta = {**lq.meta, "val": node.meta["val"], _LAYERS_KEY: [_module_path(lq)]}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(lq)
        fused += 1
    return _recompiled(program, fused)


GRAPH_FUSED = {  # op of a graph pass -> what the per-site report says of its layers
    "lq_linear_add": "lift-project layer with the decoder block's residual add after it in the same call",
    "lq_rms_linear3": "q, k and v projections of the folded RMSNorm's output in one call (one norm, one "
                      "prepare hand-off, one pass over their rows)",
}
_LAYERS_KEY = "liftedge_layers"  # node meta: module paths of the layers a fused node computes


def _module_path(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def graph_fused_layers(program: torch.export.ExportedProgram) -> dict[str, str]:
    """Module path (as the exported graph records it, under the export wrapper) -> the graph
    pass's op (a `GRAPH_FUSED` key), for every layer the passes above rewrote."""
    found = {}
    for node in program.graph_module.graph.nodes:
        for op in GRAPH_FUSED:
            if node.target == getattr(torch.ops.liftedge, op).default:
                found.update({p: op for p in node.meta.get(_LAYERS_KEY, []) if p})
    return found


def fuse_shared_input_layers(program: torch.export.ExportedProgram) -> int:
    """Rewrite each three `lq_rms_linear` calls on the same input with the same eps (a block's
    q, k and v projections after the folded norm) to one `lq_rms_linear3` call; returns how
    many triples. Any other count (two, four) is left as it is."""
    import operator

    graph, rms = program.graph_module.graph, torch.ops.liftedge.lq_rms_linear.default
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups: dict[tuple, list] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target == rms and not node.kwargs:
            groups.setdefault((node.args[0], node.args[-1]), []).append(node)
    fused = 0
    for (x, eps), nodes in groups.items():
        if len(nodes) != 3:
            continue
        first = min(nodes, key=order.__getitem__)
        with graph.inserting_before(first):
            new = graph.call_function(torch.ops.liftedge.lq_rms_linear3.default,
                                      (x, *(a for n in nodes for a in n.args[1:-1]), eps))
            new.meta = {**first.meta, "val": tuple(n.meta["val"] for n in nodes),
                        _LAYERS_KEY: [_module_path(n) for n in nodes]}
            for i, node in enumerate(nodes):
                item = graph.call_function(operator.getitem, (new, i))
                item.meta = dict(node.meta)
                node.replace_all_uses_with(item)
        for node in nodes:
            graph.erase_node(node)
        fused += 1
    return _recompiled(program, fused)


def _is(node, target, *args) -> bool:
    """node is a call of `target` whose leading arguments equal `args` (None: any)."""
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target
            and not node.kwargs and len(node.args) >= len(args)
            and all(a is None or node.args[i] == a for i, a in enumerate(args)))


def _rotate_half_of(cat, x, dim) -> bool:
    """cat is torch.cat((-x[..., h:], x[..., :h]), -1) of the [B, H, S, D] x (dim: its last)."""
    aten = torch.ops.aten
    if not _is(cat, aten.cat.default) or len(cat.args) != 2 or cat.args[1] not in (-1, dim):
        return False
    parts = cat.args[0]
    if len(parts) != 2 or not _is(parts[0], aten.neg.default):
        return False
    hi, lo = parts[0].args[0], parts[1]
    if not (_is(hi, aten.slice.Tensor, x) and _is(lo, aten.slice.Tensor, x)) or len(hi.args) < 4 or len(lo.args) < 4:
        return False
    half = lo.args[3]
    return (hi.args[1] in (-1, dim) and lo.args[1] in (-1, dim) and lo.args[2] == 0 and hi.args[2] == half
            and isinstance(half, int) and 2 * half == x.meta["val"].shape[-1])


def _mul_by(node, x):
    """The other factor when node is mul(x, f) or mul(f, x), else None."""
    if not _is(node, torch.ops.aten.mul.Tensor) or len(node.args) != 2 or x not in node.args:
        return None
    return node.args[1] if node.args[0] is x else node.args[0]


def fuse_rope(program: torch.export.ExportedProgram) -> int:
    """RoPE in the [B, S, H, D] layout, no transposes: rewrite transpose(rope(transpose(v, 1, 2)),
    1, 2), rope(x) = x * cos + rotate_half(x) * sin with cos, sin unsqueezed at dim 1 (transformers'
    `apply_rotary_pos_emb` on q and k), to `liftedge::rope(v, cos, sin)`, and a transpose of a
    transpose (v on its way to the cache) to its input. Returns how many RoPEs were rewritten.
    Other forms (partial rotary, interleaved pairs) do not match and stay as they are."""
    aten, graph = torch.ops.aten, program.graph_module.graph
    fused = 0
    for add in list(graph.nodes):
        if not _is(add, aten.add.Tensor) or len(add.args) != 2 or len(add.users) != 1:
            continue
        (out,) = add.users
        if not (_is(out, aten.transpose.int, add, 1, 2) or _is(out, aten.transpose.int, add, 2, 1)):
            continue
        for first, second in (add.args, add.args[::-1]):
            x = first.args[0] if _is(first, aten.mul.Tensor) else None
            if not _is(x, aten.transpose.int, None, 1, 2) or len(x.users) != 3:
                continue
            cos, sin = _mul_by(first, x), None
            for cat in (a for a in getattr(second, "args", ()) if _is(a, aten.cat.default)):
                if _rotate_half_of(cat, x, 3):
                    sin = _mul_by(second, cat)
            if cos is None or sin is None or not all(_is(t, aten.unsqueeze.default, None, 1) for t in (cos, sin)):
                continue
            with graph.inserting_before(out):
                new = graph.call_function(torch.ops.liftedge.rope.default, (x.args[0], cos.args[0], sin.args[0]))
            new.meta = dict(out.meta)
            out.replace_all_uses_with(new)
            fused += 1
            break
    for node in list(graph.nodes):  # transpose(transpose(v, 1, 2), 1, 2) -> v
        inner = node.args[0] if _is(node, aten.transpose.int, None, 1, 2) else None
        if _is(inner, aten.transpose.int, None, 1, 2):
            node.replace_all_uses_with(inner.args[0])
    graph.eliminate_dead_code()
    return _recompiled(program, fused, force=True)
