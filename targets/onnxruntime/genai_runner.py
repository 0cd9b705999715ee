"""The onnxruntime-genai check: the artifact folder driven by `og.Model` + `og.Generator`.

An app that uses onnxruntime-genai writes no token loop: it opens the folder (genai_config.json,
the model, the tokenizer files) and generates. This check does exactly that, greedily, once
from `model.onnx` and once from `model.ort` (the config's `decoder.filename` overlaid), and
requires the reference's greedy tokens. onnxruntime-genai is optional: without it the check
is skipped and the report says so (`RUNNER` with `skipped`).

This module owns that run and its record; the config file belongs to `genai`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from liftedge.verify import Run, VerificationError, relative_error

RUNNER = "onnxruntime-genai"


def available() -> str | None:
    """The installed onnxruntime_genai version, or None."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    return str(og.__version__)


def generate(folder: Path, model_file: str, prompt: list[int], new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation of `prompt` by onnxruntime-genai from `folder` with `model_file`,
    and the logits [vocab] the generator chose each token from."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"filename": model_file}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(list(prompt))
    logits = []
    while not generator.is_done():
        logits.append(np.asarray(generator.get_logits(), np.float32).reshape(-1))
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):], logits


def tokens_match(got: list[int], ref: Run, eos: list[int]) -> int | None:
    """The first position where `got` and the reference's greedy tokens differ, or None.

    A shorter `got` is equal when it stops at an end-of-sequence token the reference produced
    at the same place (onnxruntime-genai stops there; the reference loop does not).
    """
    for i, (a, b) in enumerate(zip(got, ref.tokens)):
        if a != b:
            return i
    if len(got) == len(ref.tokens):
        return None
    # genai stopped at an end-of-sequence token the reference produced there (the sequence may or
    # may not hold that token: 0.18 leaves it out when it is the step's choice)
    if len(got) < len(ref.tokens) and ((got and got[-1] in eos) or ref.tokens[len(got)] in eos):
        return None
    return min(len(got), len(ref.tokens))


def check(folder: Path, files: list[str], prompt: list[int], ref: Run, eos: list[int],
          tolerance: float) -> dict[str, Any]:
    """Run every model file of `files` through onnxruntime-genai; raise on different tokens, or
    on logits further than `tolerance` (relative) from the reference's while the tokens agree."""
    version = available()
    if version is None:
        return {"runner": RUNNER, "accepted": None,
                "skipped": "onnxruntime_genai is not installed (pip install onnxruntime-genai)"}
    record: dict[str, Any] = {"runner": RUNNER, "version": version, "accepted": False, "files": {}}
    for name in files:
        try:
            got, logits = generate(folder, name, prompt, len(ref.tokens))
        except Exception as exc:  # noqa: BLE001 - onnxruntime-genai raises RuntimeError for every failure
            raise VerificationError(f"{RUNNER} {version} cannot run {folder / name}: "
                                    f"{str(exc).splitlines()[0][:300]}") from None
        mismatch = tokens_match(got, ref, eos)
        agree = len(got) if mismatch is None else mismatch
        worst = max((relative_error(a, b) for a, b in zip(logits[:agree], ref.step_logits)), default=0.0)
        record["files"][name] = {"greedy_tokens_equal": mismatch is None, "first_mismatch": mismatch,
                        "logits_max_rel_error": worst, "tokens": got}
        if mismatch is not None:
            raise VerificationError(f"{RUNNER} {version} on {folder / name}: greedy tokens differ from the "
                                    f"reference at position {mismatch}")
        if worst > tolerance:
            raise VerificationError(f"{RUNNER} {version} on {folder / name}: logits relative error {worst:.3g} "
                                    f"exceeds the tolerance {tolerance:.3g}")
    record["accepted"] = True
    return record
