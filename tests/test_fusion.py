"""fusion.py: a decoder block's RMSNorms and gated activation folded into the lift-project ops.

The rewritten model is run eagerly (the ops' torch implementations), so this checks the
rewrite itself; the C++ kernels of the fused ops are checked in test_executorch.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("executorch")

from conftest import make_tiny_pack  # noqa: E402
from liftedge.targets.executorch import export, fusion, ops  # noqa: E402


class _GemmaNorm(nn.Module):
    """Gemma 3's RMSNorm form: x / rms * (1 + w)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(n) * 0.1), 1e-6

    def forward(self, x):
        return ops.rms_normalize(x.float(), self.eps) * (1.0 + self.weight.float())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # x * w with SiLU; x * (1 + w) with tanh-GELU
def test_fused_model_equals_unfused(family, tmp_path):
    pack = make_tiny_pack(family, tmp_path / "pack", mixed=family == "llama")
    opts = dict(max_context=16, max_prefill=8)
    _, plain, _ = export.prepare_model(pack, export.ExportOptions(**opts, fuse_blocks=False))
    _, fused, sites = export.prepare_model(pack, export.ExportOptions(**opts))
    blocks = fused.model.layers
    mlp_norm = fusion.MLP_NORM[family]
    assert all(isinstance(b.input_layernorm, nn.Identity) and isinstance(getattr(b, mlp_norm), nn.Identity)
               and isinstance(b.mlp, fusion.FusedMlp) for b in blocks)
    assert all(not isinstance(b.input_layernorm, nn.Identity) for b in plain.model.layers)
    assert sites["model.layers.0.self_attn.q_proj"]["lowering"] == "liftedge::lq_rms_linear"
    assert sites["model.layers.0.mlp.gate_proj"]["lowering"] == "liftedge::lq_glu"
    ids = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(0))
    want, got = _logits(plain, ids), _logits(fused, ids)
    # the same fp32 math in another order (norm weight times in_scale first, mean of squares
    # summed differently): ~1e-6 relative; a norm folded into the wrong layers or a missing
    # weight is O(1)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_norm_and_activation_recognised_by_value():
    n = 12
    rms = _GemmaNorm(n)
    w, eps = fusion.rms_weight(rms, n)
    assert eps == 1e-6 and torch.allclose(w, 1.0 + rms.weight.detach())
    assert fusion.rms_weight(nn.LayerNorm(n), n) is None  # mean subtraction and a bias: not an RMSNorm
    assert fusion.rms_weight(rms, n + 1) is None  # another width than the layers it would feed
    mlp = nn.Module()
    for act, code in ((nn.SiLU(), 0), (nn.GELU(approximate="tanh"), 1), (nn.GELU(), None), (nn.ReLU(), None)):
        mlp.act_fn = act
        assert fusion.glu_act(mlp) == code, act


def test_other_families_and_custom_ops_off_unchanged(tmp_path):
    pack = make_tiny_pack("gpt2", tmp_path / "pack")
    _, model, _ = export.prepare_model(pack, export.ExportOptions(max_context=16, max_prefill=8))
    assert not any(isinstance(m, (ops.LqGlu, fusion.FusedMlp)) for m in model.modules())
    pack = make_tiny_pack("llama", tmp_path / "llama")
    _, model, _ = export.prepare_model(pack, export.ExportOptions(max_context=16, max_prefill=8, custom_ops=False))
    assert not any(isinstance(m, ops.LqGlu) for m in model.modules())


def test_fuse_blocks_option_and_flag():
    from liftedge.cli import build_parser
    from liftedge.targets.executorch import parse_options

    assert parse_options({})["fuse_blocks"] is True and parse_options({"fuse_blocks": False})["fuse_blocks"] is False
    args = build_parser().parse_args(["build", "m", "--target", "android", "--ram", "4GB", "-o", "x"])
    assert args.fuse_blocks is True
    args = build_parser().parse_args(["build", "m", "--target", "android", "--ram", "4GB", "--no-fuse-blocks", "-o", "x"])
    assert args.fuse_blocks is False


def test_graph_passes_fuse_residual_adds_qkv_and_rope(tmp_path):
    """residual + o_proj / down_proj becomes one lq_linear_add, q/k/v one lq_rms_linear3, RoPE
    one rope per q and k; the program computes the same."""
    pack = make_tiny_pack("llama", tmp_path / "pack", mixed=True)  # odd blocks' down_proj: int4
    opts = export.ExportOptions(max_context=16, max_prefill=8)
    _, model, _ = export.prepare_model(pack, opts)
    with torch.no_grad():
        plain = torch.export.export(export.attention.LlmOpsCacheWrapper(model, 16), args=(),
                                    kwargs={"input_ids": torch.zeros((1, 3), dtype=torch.long),
                                            "cache_position": torch.arange(3)}, strict=True)
    fused = export.export_program(model, opts)
    add = torch.ops.liftedge.lq_linear_add.default
    calls = lambda p: sum(n.target == add for n in p.graph_module.graph.nodes)  # noqa: E731
    assert calls(plain) == 0
    n_blocks = len(model.model.layers)
    # every o_proj and the LQ down_projs (the even blocks'); the int4 down_proj keeps its add
    assert calls(fused) == n_blocks + (n_blocks + 1) // 2
    paths = fusion.graph_fused_layers(fused)
    assert {p.split("layers.0.")[-1]: op for p, op in paths.items() if "layers.0." in p} == {
        "self_attn.o_proj": "lq_linear_add", "mlp.down_proj": "lq_linear_add", "self_attn.q_proj": "lq_rms_linear3",
        "self_attn.k_proj": "lq_rms_linear3", "self_attn.v_proj": "lq_rms_linear3"}
    rms3 = torch.ops.liftedge.lq_rms_linear3.default
    assert sum(n.target == rms3 for n in fused.graph_module.graph.nodes) == n_blocks  # q, k, v of every block
    # RoPE of q and k in [B, S, H, D], and no transpose left between the projections and attention
    targets = [n.target for n in fused.graph_module.graph.nodes]
    assert targets.count(torch.ops.liftedge.rope.default) == 2 * n_blocks
    assert torch.ops.aten.transpose.int not in targets and torch.ops.aten.neg.default not in targets
    ids, pos = torch.randint(0, 320, (1, 3), generator=torch.Generator().manual_seed(0)), torch.arange(3)
    with torch.no_grad():
        want = plain.module()(input_ids=ids, cache_position=pos)
        got = fused.module()(input_ids=ids, cache_position=pos)
    # the same float32 ops in the same order (the add moved into the op's torch implementation)
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
