"""The export rewrites of `targets/executorch/delegate_friendly.py` compute what transformers does."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import tiny_config

from liftedge.targets.executorch import delegate_friendly as df


@pytest.mark.parametrize("family", sorted(df.FAMILIES))
def test_rms_norm_fc_matches_the_family_norm(family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(family))
    norm = model.model.norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 5, norm.weight.shape[0], generator=torch.Generator().manual_seed(1)) * 3
    expected = norm(x)
    n_norms = sum(type(m).__name__ == df.FAMILIES[family] for m in model.modules())
    assert df.apply(model) == n_norms > 0
    assert isinstance(model.model.norm, df.RmsNormFc) and model.model.norm.weight is norm.weight
    # mean as sum(x*x)/n in another order: float32 rounding, ~1e-7 relative
    torch.testing.assert_close(model.model.norm(x), expected, rtol=1e-5, atol=1e-6)


def test_other_families_are_left_alone():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("gemma3_text"))  # (1 + w) norms
    assert df.family(model) is None and df.apply(model) == 0
    with df.rope_patched(model) as patched:
        assert patched is False


def test_rope_without_slices_matches_transformers():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    modeling = importlib.import_module("transformers.models.llama.modeling_llama")
    original = modeling.apply_rotary_pos_emb
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 6, 16, generator=g), torch.randn(1, 2, 6, 16, generator=g)
    cos, sin = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    expected = original(q, k, cos, sin)
    with df.rope_patched(model) as patched:
        assert patched and modeling.apply_rotary_pos_emb is not original
        got = modeling.apply_rotary_pos_emb(q, k, cos, sin)
        # another layout (batch 2) takes the sliced form, also equal
        q2, k2, cos2, sin2 = (torch.cat([t, t]) for t in (q, k, cos, sin))
        got2 = modeling.apply_rotary_pos_emb(q2, k2, cos2, sin2)
    assert modeling.apply_rotary_pos_emb is original        # restored after the export
    # the half swap is a ±1 permutation: exact; products and sums as transformers orders them
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(got2, expected):
        torch.testing.assert_close(a[:1], b, rtol=0, atol=0)
