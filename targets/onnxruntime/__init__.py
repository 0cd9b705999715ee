"""ONNX Runtime target (`.onnx` / `.ort`): lift-project layers in stock ONNX operators.

The contract of `liftedge.lowering`: `lower` builds `model.onnx` (the decoder graph of
`graph`/`families`, each site lowered by `layers`), `genai_config.json` (`genai`) and the
tokenizer files, and by default `model.ort` + `required_operators.config` for ORT Mobile
(`ort_format`); `verify` runs both in ONNX Runtime (`session`) against the pack's reference
model, then through onnxruntime-genai's generator where it is installed (`genai_runner`). `pipeline` sequences these steps; this module holds the options and the tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from liftedge.errors import LiftedgeError
from liftedge.lowering import parse_target_options

NAME = "onnxruntime"
# Embedding / head storage options this target lowers (`liftedge.planner` offers no others).
TABLE_OPTIONS = ("fp16", "int8-g64", "int4-g32")
OPTIONS = {
    "ort": "write model.ort for ORT Mobile too: 'yes' (default) or 'no'",
    "threads": "intra-op threads for verification sessions (default: ONNX Runtime's choice)",
    "new_tokens": "greedy tokens compared during verification (default 32)",
    "max_context": "context length onnxruntime-genai may grow the KV cache to (default 256; the build "
                   "passes the context the memory plan budgeted)",
    "genai": "also verify with onnxruntime-genai's generator where it is installed: 'yes' (default) or 'no'",
    "external_data": "initializer bytes past which the weights go to model.onnx.data beside model.onnx (ONNX "
                     "external data; default 1 GiB: protobuf refuses a model.onnx past 2 GiB)",
}
# Relative Frobenius error allowed between ORT logits and the reference's. The graph is
# float32 end to end like the reference (fp16-stored factors are cast, not computed in fp16);
# ORT's fusions (FusedMatMul, QuickGelu for SiLU, SimplifiedLayerNormalization, MatMulNBits at
# accuracy level 0) only reorder float32 sums. Measured: ~3e-7 on tiny models, 3e-6 on
# SmolLM2-135M (30 blocks). 1e-4 leaves 30x headroom and still catches any wrong layer,
# bit or factor (errors of order 1e-1 and more).
TOLERANCE = 1e-4


# Half protobuf's 2 GiB message limit: the graph's own bytes and the serializer's overhead fit beside it.
EXTERNAL_DATA_NBYTES = 1 << 30
_DEFAULTS = {"ort": True, "threads": None, "new_tokens": 32, "max_context": 256, "genai": True,
             "external_data": EXTERNAL_DATA_NBYTES}


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    out = parse_target_options(NAME, options, _DEFAULTS)
    out["threads"] = out["threads"] or None  # 0: ONNX Runtime's choice, as unset
    if out["new_tokens"] < 1:
        raise LiftedgeError(f"option new_tokens must be >= 1, got {out['new_tokens']}")
    if out["external_data"] < 0:
        raise LiftedgeError(f"option external_data must be >= 0 bytes, got {out['external_data']}")
    if not (8 <= out["max_context"] <= 1 << 20):
        raise LiftedgeError(f"option max_context must be in [8, 1048576] tokens, got {out['max_context']}")
    return out


def lower(pack: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    from liftedge.targets.onnxruntime.pipeline import lower_pack

    return lower_pack(Path(pack), Path(out), _check_options(options))


def verify(out: Path, pack: Path, report: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from liftedge.targets.onnxruntime.pipeline import verify_artifact

    return verify_artifact(Path(out), Path(pack), report, _check_options(options))
