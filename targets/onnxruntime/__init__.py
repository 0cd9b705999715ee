"""ONNX Runtime target (`.onnx` / `.ort`): lift-project layers in stock ONNX operators.

The contract of `liftedge.lowering`: `lower` builds `model.onnx` (the decoder graph of
`graph`/`families`, each site lowered by `layers`), `genai_config.json` and the tokenizer
files, and by default `model.ort` + `required_operators.config` for ORT Mobile
(`ort_format`); `verify` runs both in ONNX Runtime (`session`) against the pack's reference
model. `pipeline` sequences these steps; this module holds the options and the tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from liftedge.errors import LiftedgeError

NAME = "onnxruntime"
# Embedding / head storage options this target lowers (`liftedge.planner` offers no others).
TABLE_OPTIONS = ("fp16", "int8-g64", "int4-g32")
OPTIONS = {
    "ort": "write model.ort for ORT Mobile too: 'yes' (default) or 'no'",
    "threads": "intra-op threads for verification sessions (default: ONNX Runtime's choice)",
    "new_tokens": "greedy tokens compared during verification (default 32)",
}
# Relative Frobenius error allowed between ORT logits and the reference's. The graph is
# float32 end to end like the reference (fp16-stored factors are cast, not computed in fp16);
# ORT's fusions (FusedMatMul, QuickGelu for SiLU, SimplifiedLayerNormalization, MatMulNBits at
# accuracy level 0) only reorder float32 sums. Measured: ~3e-7 on tiny models, 3e-6 on
# SmolLM2-135M (30 blocks). 1e-4 leaves 30x headroom and still catches any wrong layer,
# bit or factor (errors of order 1e-1 and more).
TOLERANCE = 1e-4


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise LiftedgeError(f"unknown onnxruntime option(s) {unknown}; known: {sorted(OPTIONS)}")
    ort = str(options.get("ort", "yes")).lower()
    if ort not in ("yes", "no"):
        raise LiftedgeError(f"option ort must be 'yes' or 'no', got {options['ort']!r}")
    try:
        threads, new_tokens = int(options.get("threads") or 0) or None, int(options.get("new_tokens") or 32)
    except (TypeError, ValueError):
        raise LiftedgeError(f"options threads and new_tokens must be integers, got {options}") from None
    return {"ort": ort == "yes", "threads": threads, "new_tokens": new_tokens}


def lower(pack: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    from liftedge.targets.onnxruntime.pipeline import lower_pack

    return lower_pack(Path(pack), Path(out), _check_options(options))


def verify(out: Path, pack: Path, report: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from liftedge.targets.onnxruntime.pipeline import verify_artifact

    return verify_artifact(Path(out), Path(pack), report, _check_options(options))
