"""Verifying a `.mlpackage` on Linux: read back, check bits and structure, interpret, compare.

Core ML has no Linux runtime, so "running the artifact" means executing the program read
back from the saved files (not the in-memory program that wrote them) with
`interpreter.Interpreter`, through the same greedy loop and comparison as every target
(`liftedge.verify`). examples/ios/verify_on_mac.py runs the same package with Core ML.

This module owns the verification sequence and the tolerance; the checks are `readback`,
the op semantics `interpreter`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from liftedge.targets.coreml.interpreter import Interpreter
from liftedge.targets.coreml.program import CAUSAL_MASK, INPUT_IDS, PACKAGE_NAME
from liftedge.targets.coreml.readback import (
    check_spec,
    check_storage,
    check_structure,
    check_weights,
    load_program,
)

from liftedge.verify import (
    StepFn,
    VerificationError,
    compare,
    greedy,
    in_chunks,
    prompt_ids,
    reference_along,
)

log = logging.getLogger(__name__)

# The program computes in fp32 like the reference but keeps its KV cache in fp16 (Core ML
# states are fp16 only): each cached key/value carries a relative rounding error of up to
# 2^-11 ~ 4.9e-4, which measured as 1e-4 to 1e-3 relative logits error on the tiny models
# and on SmolLM2-135M (see the report). 1e-2 leaves a 10x margin for longer decodes while
# still catching any wrong weight, transform or mask (those give errors of order 1).
TOLERANCE = 1e-2
# The standard runner this package is written for (a runner record, `liftedge.verify`).
RUNNER = {"runner": "swift-transformers LanguageModel (stateful, Core ML)", "accepted": None,
          "skipped": "Core ML does not run on Linux: the spec's interface was checked against the runner's "
                     "contract (names, dtypes, flexible ranges, states, metadata) and the program was "
                     "interpreted with its input convention"}
# The masked entries of causalMask: -max(fp16), as swift-transformers' additive masks use.
MASK_MIN = np.float16(-65504.0)


def causal_mask(n_tokens: int, position: int) -> np.ndarray:
    """causalMask [1, 1, T, position + T] for T tokens at `position`, as the stateful Core ML
    examples build it: 0 where a token may attend, the most negative fp16 where it may not."""
    end = position + n_tokens
    allowed = np.arange(end)[None, :] <= np.arange(position, end)[:, None]
    return np.where(allowed, 0.0, MASK_MIN).astype(np.float16)[None, None]


def step_function(predict: Callable[[dict[str, np.ndarray]], np.ndarray], reset: Callable[[], None],
                  max_prefill: int) -> StepFn:
    """`step(ids, start_pos)` over any engine of the package's signature.

    `predict({"inputIds": int32 [1, T], "causalMask": fp16 [1, 1, T, E]}) -> logits [1, T, vocab]`
    runs one call against the engine's state; `reset()` empties the state (a new prompt at
    position 0). Prompts longer than max_prefill go in chunks. The numpy interpreter here and
    Core ML on a Mac (examples/ios/verify_on_mac.py) both plug in.
    """
    def run_chunk(part: list[int], position: int) -> np.ndarray:
        feed = {INPUT_IDS: np.asarray([part], np.int32), CAUSAL_MASK: causal_mask(len(part), position)}
        return np.asarray(predict(feed), np.float32)[0]

    def step(ids: list[int], start_pos: int) -> np.ndarray:
        if start_pos == 0:
            reset()
        return in_chunks(run_chunk, ids, start_pos, max_prefill)

    return step


def interpreter_step(interp: Interpreter, max_prefill: int) -> StepFn:
    return step_function(lambda feed: interp(**feed)[0], interp.reset, max_prefill)


def verify_package(out: Path, pack: Path, report: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    from liftedge.packed import load_packed, read_manifest, read_quantized, read_weights

    package = Path(out) / PACKAGE_NAME
    prog = load_program(package)
    tensors = read_weights(pack)
    qtensors = read_quantized(pack, read_manifest(pack), tensors)
    fmts = [qt.fmt for qt in qtensors.values()]
    structure = check_structure(prog, report["program"], fmts.count("liftquant"), fmts.count("int"))
    structure["spec"] = check_spec(package, report)
    weights = check_weights(prog, tensors, qtensors, report["sites"])
    weights.update(check_storage(package, qtensors))
    loaded = load_packed(pack)
    prompt = prompt_ids(loaded.tokenizer)
    limit = report["runtime"]["max_context"]
    if len(prompt) + new_tokens > limit:
        raise VerificationError(f"verification needs {len(prompt) + new_tokens} cache positions; "
                                f"max_context is {limit}")
    start = time.perf_counter()
    got = greedy(interpreter_step(Interpreter(prog), report["runtime"]["max_prefill"]), prompt, new_tokens)
    seconds = time.perf_counter() - start
    ref = reference_along(loaded.model, prompt, got.tokens)
    record = compare(got, ref, TOLERANCE, what=f"{package.name} (read back, numpy interpreter)")
    record.update({"engine": "numpy interpreter of the read-back MIL program (Core ML does not run on Linux)",
                   "interpreter_seconds": round(seconds, 3), "structure": structure,
                   "weights_bit_exact": weights, "runners": [RUNNER]})
    log.info("coreml: %s verified (%d tokens, rel err %.2e)", package, new_tokens, record["prompt_logits_rel_error"])
    return record
