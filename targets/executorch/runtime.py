"""Running a liftedge `.pte` in the real ExecuTorch runtime, and verifying it.

`pte_step(path, needs_kernel)` loads the program with `executorch.runtime.Runtime` (after
loading the kernel library when the program calls `liftedge::lq_linear`) and returns a
`liftedge.verify` step function: `step(ids, start_pos) -> logits [len(ids), vocab]`, where a
prompt longer than the exported prefill bound is fed in chunks. `verify_pte` runs the
verification prompt through it, then checks its tokens with the pack's reference model.

This module owns loading and running; lowering is `export.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from liftedge.errors import ArtifactError
from liftedge.verify import compare, greedy, in_chunks, prompt_ids, reference_along

# Relative Frobenius error allowed between .pte and reference logits. Both compute in fp32
# from the same fp16-stored values and differ in summation order (XNNPACK GEMMs, the
# kernel's ±1 sums); the custom-op build's head (liftedge::fp16_linear) keeps fp32
# activations. The fallback's head is XNNPACK's fp16 linear, which rounds the activation to
# fp16: SmolLM2 with that head measured 4.8e-3 (prompt) and 8.0e-3 (decode), the tiny
# models ~1.5e-3. 1.5e-2 leaves room for that; a wrong layout or sign gives O(1), and greedy
# tokens must match exactly in any case.
TOLERANCE = 1.5e-2


def custom_ops(path: Path) -> list[str]:
    """The liftedge:: operators the program names (operator names are stored as text)."""
    import re

    return sorted({m.decode() for m in re.findall(rb"liftedge::[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?",
                                                  Path(path).read_bytes())})


def calls_custom_op(path: Path) -> bool:
    """Whether the program names a liftedge:: operator."""
    return bool(custom_ops(path))


def load_operator_libraries(needs_kernel: bool) -> None:
    """Register the operators a liftedge `.pte` may call beyond the stock ones, as an app's
    runtime links them: ExecuTorch's LLM ops (attention) always, liftedge's kernel library when
    `needs_kernel`. Every path that runs a `.pte` (verification, TextLLMRunner, profile) calls this."""
    from liftedge.targets.executorch.attention import load_ops

    load_ops()
    if needs_kernel:
        from liftedge.targets.executorch.kernel import load_library

        load_library()


def load_method(path: Path, needs_kernel: bool):
    """The program's `forward` method, loaded in the ExecuTorch runtime.

    `needs_kernel` loads the kernel library first; without it, a program that calls the
    custom op fails here with a message that says so (the runtime's own says "Missing operator").
    """
    load_operator_libraries(needs_kernel)
    from executorch.runtime import Runtime

    try:
        return Runtime.get().load_program(str(path)).load_method("forward")
    except Exception as exc:  # the runtime raises RuntimeError and logs details on stderr
        hint = ""
        ops = custom_ops(path)
        if ops:
            hint = (f"; the program calls {', '.join(ops)}, whose kernel library is not loaded: call "
                    "liftedge.targets.executorch.kernel.load_library() first (in an app, link "
                    "targets/executorch/CMakeLists.txt's liftedge_kernels)")
        raise ArtifactError(f"ExecuTorch cannot load {path}: {exc}{hint}") from None


def pte_step(path: Path, needs_kernel: bool, max_prefill: int, max_context: int):
    """The `liftedge.verify` step over the program. The program returns the last position's
    logits only, so a step of n > 1 tokens runs the first n - 1 one token at a time (their
    rows) and then all n as prefill chunks (the static cache is rewritten at the same
    positions); its last row is the chunked prefill's, so both call shapes are checked."""
    method = load_method(path, needs_kernel)
    position = [0]

    def run_chunk(part: list[int], start: int) -> np.ndarray:
        x = torch.tensor([part], dtype=torch.long)
        pos = torch.arange(start, start + len(part), dtype=torch.long)
        (logits,) = method.execute([x, pos])
        return logits[0, -1:].float().numpy()

    def all_rows(ids: list[int], start_pos: int) -> np.ndarray:
        rows = [run_chunk([t], start_pos + i) for i, t in enumerate(ids[:-1])]
        last = in_chunks(run_chunk, ids, start_pos, max_prefill)[-1:]
        return np.concatenate([*rows, last])

    def step(ids: list[int], start_pos: int) -> np.ndarray:
        if start_pos + len(ids) > max_context:
            raise ArtifactError(f"{start_pos + len(ids)} tokens exceed the program's KV cache of {max_context}; "
                                "rebuild with a larger max_context")
        if start_pos != position[0]:
            raise ArtifactError(f"the .pte's cache holds {position[0]} tokens, step starts at {start_pos}")
        logits = all_rows(ids, start_pos)
        position[0] = start_pos + len(ids)
        return logits

    return step


def verify_pte(path: Path, pack: Path, needs_kernel: bool, max_prefill: int, max_context: int,
               new_tokens: int, tolerance: float = TOLERANCE) -> dict[str, Any]:
    from liftedge.packed import load_packed

    loaded = load_packed(pack)
    prompt = prompt_ids(loaded.tokenizer)
    if len(prompt) + new_tokens > max_context:
        raise ArtifactError(f"verification needs {len(prompt)} prompt + {new_tokens} new tokens, more than "
                            f"max_context={max_context}; raise max_context or lower verify_tokens")
    got = greedy(pte_step(path, needs_kernel, max_prefill, max_context), prompt, new_tokens)
    ref = reference_along(loaded.model, prompt, got.tokens)
    return compare(got, ref, tolerance, what=str(path.name))
