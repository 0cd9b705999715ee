"""The reference oracle: `reference_along` (one pass along an artifact's tokens) finds the same
greedy tokens and logits as `reference_run` (one step per token), and stops at a divergence."""

from __future__ import annotations

import numpy as np
import pytest

from liftedge.packed import load_packed
from liftedge.verify import VerificationError, compare, prompt_ids, reference_along, reference_run, relative_error

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def oracle(tiny_lq_pack):
    loaded = load_packed(tiny_lq_pack)
    prompt = prompt_ids(loaded.tokenizer)
    return loaded.model, prompt, reference_run(loaded.model, prompt, NEW_TOKENS)


def test_one_pass_along_the_greedy_tokens_is_the_greedy_run(oracle):
    model, prompt, stepped = oracle
    along = reference_along(model, prompt, stepped.tokens)
    assert along.tokens == stepped.tokens
    # Both are the same fp32 model; one pass over the sequence and one call per token with a KV
    # cache differ only in summation order (~1e-7 relative). 1e-5 is far below any real
    # disagreement (a wrong position or mask is O(1)).
    assert relative_error(along.prompt_logits, stepped.prompt_logits) < 1e-5
    assert max(relative_error(a, b) for a, b in zip(along.step_logits, stepped.step_logits)) < 1e-5
    assert compare(stepped, along, 1e-5)["passed"]


def test_a_divergent_token_stream_is_caught_at_its_first_difference(oracle):
    model, prompt, stepped = oracle
    vocab = stepped.prompt_logits.shape[-1]
    wrong = list(stepped.tokens)
    wrong[3] = (wrong[3] + 1) % vocab
    along = reference_along(model, prompt, wrong)
    # The reference's own token at the divergence, and nothing after it (past it the two
    # paths have different inputs).
    assert along.tokens == stepped.tokens[:4]
    got = type(stepped)(prompt_logits=stepped.prompt_logits, tokens=wrong, step_logits=stepped.step_logits)
    with pytest.raises(VerificationError, match="position 3"):
        compare(got, along, 1.0)


def test_no_new_tokens_checks_the_prompt_only(oracle):
    model, prompt, stepped = oracle
    along = reference_along(model, prompt, [])
    assert along.tokens == [] and along.prompt_logits.shape == stepped.prompt_logits.shape
    np.testing.assert_allclose(along.prompt_logits, stepped.prompt_logits, rtol=1e-4, atol=1e-4)
