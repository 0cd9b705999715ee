"""Checking a lowered artifact against the PyTorch reference of the same pack.

Every target (ExecuTorch, ONNX Runtime, Core ML) is verified the same way: run a fixed
prompt through the artifact and through the reference model (`liftedge.packed.load_packed`,
whose lift-project layers are `targets/reference`), then

- compare the prompt's logits (relative Frobenius error, a tolerance the target states), and
- decode greedily from both and require the same tokens, token for token.

The artifact decodes first; the reference then checks its tokens in one forward pass
(`reference_along`), which finds the reference's own greedy tokens exactly (see there) for the
cost of one pass, not one per token: at 8B each reference step unpacks ~16 GB of signs.

A target supplies a *step function*: `step(ids, start_pos) -> logits [len(ids), vocab]` that
feeds `ids` at positions `start_pos ...` into its own KV cache (prefill is one call with the
whole prompt, decode one call per token). `greedy` turns any step function into a `Run`, so
the loop, the prompt and the comparison live here once.

This module owns the prompt, the greedy loop, the comparison and `VerificationError`; the
runtimes' step functions belong to the targets.

Runner records: each target's verification lists, under `runners`, the standard LLM runners
that drove the artifact, one record each: `{"runner": name, "accepted": True}` plus what the
runner produced, or `{"runner": name, "accepted": None, "skipped": why}` where it cannot run
here; a runner that generates other greedy tokens raises `VerificationError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from liftedge.errors import ArtifactError

StepFn = Callable[[list[int], int], np.ndarray]

# A short, ordinary English prompt: verification wants text the model continues sensibly
# (logits with a clear argmax), not random ids whose greedy path is a coin toss.
VERIFY_PROMPT = "The capital of France is Paris. The capital of Germany is"
DEFAULT_NEW_TOKENS = 32


class VerificationError(ArtifactError):
    """The artifact's outputs do not match the reference; the build must not publish it."""


@dataclass
class Run:
    """What one engine produced for the verification prompt."""

    prompt_logits: np.ndarray          # [prompt_len, vocab] float32
    tokens: list[int]                  # greedily decoded continuation
    step_logits: list[np.ndarray] = field(default_factory=list)  # [vocab] per decoded token


def prompt_ids(tokenizer, text: str = VERIFY_PROMPT) -> list[int]:
    """The verification prompt as token ids, after BOS where the tokenizer adds one
    (`text.with_bos`: the model is verified on text as it was trained to see it)."""
    from liftedge.text import with_bos

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ArtifactError("the verification prompt tokenizes to nothing")
    return with_bos(ids, tokenizer)


def greedy(step: StepFn, prompt: list[int], new_tokens: int) -> Run:
    """Prefill `prompt` with one call, then decode `new_tokens` greedily one call each."""
    logits = np.asarray(step(list(prompt), 0), dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != len(prompt):
        raise ArtifactError(f"prefill returned logits of shape {list(logits.shape)}, "
                            f"expected [{len(prompt)}, vocab]")
    run = Run(prompt_logits=logits, tokens=[])
    last = logits[-1]
    for i in range(new_tokens):
        token = int(np.argmax(last))
        run.tokens.append(token)
        run.step_logits.append(last)
        if i + 1 < new_tokens:
            last = np.asarray(step([token], len(prompt) + i), dtype=np.float32)[-1]
    return run


def in_chunks(run_chunk: StepFn, ids: list[int], start_pos: int,
              max_prefill: int) -> np.ndarray:
    """Logits [len(ids), vocab] of `ids` fed at most `max_prefill` tokens per engine call.

    `run_chunk(part, position of its first token)` runs one call and returns [len(part), vocab];
    artifacts with a fixed prompt-chunk size (ExecuTorch, Core ML) build their steps on this.
    """
    return np.concatenate([np.asarray(run_chunk(ids[i:i + max_prefill], start_pos + i), np.float32)
                           for i in range(0, len(ids), max_prefill)], axis=0)


def reference_step(model: torch.nn.Module) -> StepFn:
    """A step function over a Hugging Face causal LM with its own KV cache (the oracle)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)

    @torch.no_grad()
    def step(ids: list[int], start_pos: int) -> np.ndarray:
        if cache.get_seq_length() != start_pos:
            raise ArtifactError(f"reference cache holds {cache.get_seq_length()} tokens, step starts at {start_pos}")
        x = torch.tensor([ids], dtype=torch.long)
        pos = torch.arange(start_pos, start_pos + len(ids))[None]
        out = model(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits[0].float().numpy()

    return step


def reference_run(model: torch.nn.Module, prompt: list[int], new_tokens: int = DEFAULT_NEW_TOKENS) -> Run:
    model.eval()
    return greedy(reference_step(model), prompt, new_tokens)


def reference_along(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> Run:
    """The reference's greedy run, found in one forward pass along an artifact's `tokens`.

    A causal model's logits at a position depend only on the tokens up to it, so one pass over
    `prompt + tokens[:-1]` gives the reference's next-token logits after every prefix of `tokens`.
    While the reference's argmax equals the artifact's token the two greedy paths are one path;
    at the first difference the argmax is the reference's own next token. So the returned `Run`
    holds exactly the tokens (and logits) `reference_run` would, up to and including the first
    difference, or all of them when there is none; `compare` needs no more.
    """
    from liftedge.targets.reference.registry import one_pass

    model.eval()
    ids = list(prompt) + list(tokens[:-1])
    with torch.no_grad(), one_pass():  # nothing decoded is kept: each layer runs once
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    logits = out.logits[0].float().numpy()
    run = Run(prompt_logits=logits[:len(prompt)], tokens=[])
    for i, token in enumerate(tokens):
        row = logits[len(prompt) - 1 + i]
        run.tokens.append(int(np.argmax(row)))
        run.step_logits.append(row)
        if run.tokens[-1] != token:
            break
    return run


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref|| (Frobenius), in float64."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise VerificationError(f"logits shape {list(got.shape)} != reference {list(ref.shape)}")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def compare(got: Run, ref: Run, tolerance: float, *, what: str = "artifact") -> dict[str, Any]:
    """The verification record; raises `VerificationError` when logits or tokens disagree.

    Decode-step logits are compared while both token streams agree (after a divergence the
    inputs differ and the comparison would mean nothing).
    """
    prompt_err = relative_error(got.prompt_logits, ref.prompt_logits)
    mismatch = next((i for i, (a, b) in enumerate(zip(got.tokens, ref.tokens)) if a != b), None)
    if mismatch is None and len(got.tokens) != len(ref.tokens):
        mismatch = min(len(got.tokens), len(ref.tokens))
    agree = len(got.tokens) if mismatch is None else mismatch
    step_errs = [relative_error(a, b) for a, b in zip(got.step_logits[:agree], ref.step_logits[:agree])]
    record = {
        "prompt_tokens": int(ref.prompt_logits.shape[0]),
        "new_tokens": len(ref.tokens),
        "tolerance": tolerance,
        "prompt_logits_rel_error": prompt_err,
        "decode_logits_max_rel_error": max(step_errs, default=0.0),
        "greedy_tokens_equal": mismatch is None,
        "first_mismatch": mismatch,
        "tokens": got.tokens,
        "reference_tokens": ref.tokens,
    }
    worst = max(prompt_err, record["decode_logits_max_rel_error"])
    record["passed"] = bool(mismatch is None and worst <= tolerance)
    if not record["passed"]:
        why = (f"greedy tokens differ from the reference at position {mismatch}" if mismatch is not None
               else f"logits relative error {worst:.3g} exceeds the tolerance {tolerance:.3g}")
        raise VerificationError(f"{what} failed verification: {why}")
    return record
