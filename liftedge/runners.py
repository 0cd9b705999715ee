"""Standard LLM runners that `liftedge build` drives as part of verification (issue 18).

A mobile app does not write a token loop: it hands the artifact to the runner its platform
ships. `RUNNERS` maps a target name to the runner checks for its artifacts, each
"module:function" called as `check(out, pack, report, options, reference_tokens)` and
returning a record: `{"runner": name, "accepted": bool, ...}` or, where the runner is not
installed, `{"runner": name, "accepted": None, "skipped": why}`. A runner that loads the
artifact and generates other greedy tokens than the PyTorch reference raises
`VerificationError`. Each check lives with its target; this module only lists them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

RUNNERS: dict[str, tuple[str, ...]] = {
    "executorch": ("liftedge.targets.executorch.runner_check:check_text_llm_runner",),
}


def run_checks(target: str, out: Path, pack: Path, report: dict[str, Any], options: dict[str, Any],
               reference_tokens: list[int]) -> list[dict[str, Any]]:
    """Every registered runner check of `target`, in order; their records."""
    records = []
    for spec in RUNNERS.get(target, ()):
        module, func = spec.split(":")
        records.append(getattr(importlib.import_module(module), func)(
            Path(out), Path(pack), report, options, list(reference_tokens)))
    return records
