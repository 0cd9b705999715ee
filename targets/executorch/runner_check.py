"""ExecuTorch's own LLM runner on a liftedge `.pte` (issue 18): the app-side acceptance check.

`check_text_llm_runner` loads `model.pte` with `executorch.extension.llm.runner.TextLLMRunner`
(the C++ runner behind ExecuTorch's Android/iOS demo apps, shipped in the executorch wheel),
generates greedily from the verification prompt and requires the PyTorch reference's tokens.
The runner reads the program's metadata methods (`export.runner_metadata`) and the artifact's
`tokenizer.json` (the file shipped beside the `.pte`; it must load unchanged, decoder
included, as an app loads it); the kernel library is loaded first (RTLD_GLOBAL) when the program names a
`liftedge::` operator, as an app links it.

Token ids: the runner hands back decoded text pieces, and a random model's byte tokens are not
valid UTF-8 on their own. After the shipped file has loaded, generation is therefore run with a copy of the tokenizer without its
decoder (each piece is then the vocabulary entry itself, mapped back to its id exactly) and
without its post-processor (the prompt is encoded without special tokens, as
`liftedge.verify.prompt_ids` does). Encoding is unchanged: same model, pre-tokenizer, normalizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from liftedge.verify import VERIFY_PROMPT, VerificationError

RUNNER = "executorch.extension.llm.runner.TextLLMRunner"


def _runner_classes():
    """(TextLLMRunner, GenerationConfig), or None where the wheel has no runner bindings."""
    try:
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    except (ImportError, RuntimeError):
        return None
    return TextLLMRunner, GenerationConfig


def _piece_ids(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    ids = {str(k): int(v) for k, v in tokenizer_json.get("model", {}).get("vocab", {}).items()} \
        if isinstance(tokenizer_json.get("model", {}).get("vocab"), dict) else {}
    if not ids and isinstance(tokenizer_json.get("model", {}).get("vocab"), list):  # Unigram: [piece, score]
        ids = {str(entry[0]): i for i, entry in enumerate(tokenizer_json["model"]["vocab"])}
    for tok in tokenizer_json.get("added_tokens", []):
        ids[str(tok["content"])] = int(tok["id"])
    return ids


@contextlib.contextmanager
def _native_output_to(path: Path):
    """The runner prints its log and the generated text on fds 1 and 2: keep them off the CLI's."""
    saved = [os.dup(1), os.dup(2)]
    with open(path, "wb") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def expected_tokens(reference: list[int], eos_ids: list[int]) -> list[int]:
    """The reference's tokens as the runner emits them: it stops after the first EOS."""
    for i, tok in enumerate(reference):
        if tok in eos_ids:
            return reference[: i + 1]
    return reference


def run_text_llm_runner(pte: Path, tokenizer_json: Path, new_tokens: int, *, needs_kernel: bool,
                        prompt: str = VERIFY_PROMPT) -> dict[str, Any]:
    """Greedy generation with TextLLMRunner; returns {"tokens", "prompt_tokens", "log"}."""
    classes = _runner_classes()
    if classes is None:
        raise RuntimeError("executorch has no LLM runner bindings")
    text_runner, generation_config = classes
    from liftedge.targets.executorch.runtime import load_operator_libraries

    load_operator_libraries(needs_kernel)
    tok = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    ids = _piece_ids(tok)
    tok["decoder"] = None
    tok["post_processor"] = None
    pieces: list[str] = []
    stats: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="liftedge-runner-") as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(json.dumps(tok), encoding="utf-8")
        log_path = Path(tmp) / "runner.log"
        error = None
        with _native_output_to(log_path):
            try:
                text_runner(str(pte), str(tokenizer_json))  # the shipped file loads, as an app loads it
                runner = text_runner(str(pte), str(path))
                config = generation_config(echo=False, max_new_tokens=new_tokens, temperature=0.0)
                runner.generate(prompt, config, token_callback=pieces.append, stats_callback=stats.append)
            except RuntimeError as exc:
                error = exc
        log = log_path.read_text(encoding="utf-8", errors="replace")
    if error is not None:
        tail = " | ".join(line for line in log.splitlines()[-6:] if line.strip())
        raise VerificationError(f"{RUNNER} refused {pte.name}: {error} ({tail})")
    unknown = [p for p in pieces if p not in ids]
    if unknown:
        raise VerificationError(f"{RUNNER} emitted pieces outside the vocabulary: {unknown[:3]}")
    return {"tokens": [ids[p] for p in pieces],
            "prompt_tokens": int(stats[-1].num_prompt_tokens) if stats else None, "log": log}


def check_text_llm_runner(out: Path, report: dict[str, Any], reference_tokens: list[int]) -> dict[str, Any]:
    """ExecuTorch's runner check (a `liftedge.verify` runner record): TextLLMRunner's greedy tokens == reference."""
    from liftedge.targets.executorch.export import PTE_NAME

    if _runner_classes() is None:
        return {"runner": RUNNER, "accepted": None, "skipped": "executorch has no LLM runner bindings"}
    metadata = report.get("runner_metadata", {})
    needs_kernel = bool(report.get("requires_kernel_library"))
    got = run_text_llm_runner(Path(out) / PTE_NAME, Path(out) / "tokenizer.json", len(reference_tokens),
                              needs_kernel=needs_kernel)
    want = expected_tokens(reference_tokens, list(metadata.get("get_eos_ids", [])))
    if got["tokens"] != want:
        at = next((i for i, (a, b) in enumerate(zip(got["tokens"], want)) if a != b),
                  min(len(got["tokens"]), len(want)))
        raise VerificationError(f"{RUNNER} generated other greedy tokens than the reference from position {at} "
                                f"(prompt of {got['prompt_tokens']} tokens)")
    record = {"runner": RUNNER, "accepted": True, "greedy_tokens_equal": True, "tokens": got["tokens"],
              "prompt_tokens": got["prompt_tokens"]}
    if needs_kernel:
        from liftedge.targets.executorch.kernel import library_path

        record["kernel_library"] = {"path": str(library_path()),
                                    "operators": report.get("custom_operators", [])}
    return record
