"""Core ML target (`.mlpackage`): lift-project layers as 1-bit palettized constants.

Implements the `liftedge.lowering` contract:

    NAME = "coreml"
    OPTIONS                      option -> help (`liftedge build --target coreml`)
    lower(pack, out, options)    writes out/model.mlpackage (ML program, iOS 18, stateful KV
                                 cache, swift-transformers' LanguageModel I/O contract and
                                 metadata), returns the report (every site's lowering, the
                                 resident weight bytes per compute units)
    verify(out, pack, report, options)   reads the package back, checks every weight bit for
                                 bit against the pack and the program's structure, executes it
                                 with a numpy interpreter and compares greedy decoding with the
                                 pack's reference model (Core ML itself cannot run on Linux;
                                 examples/ios/verify_on_mac.py runs the package on a Mac)

Families: Llama (SmolLM2), Mistral, Qwen2, Qwen3, Gemma 3 text, GPT-2, GPT-NeoX; others
are refused. Modules: `layers` (op patterns), `program` (MIL program of a Llama-like
decoder, the I/O contract, shared attention/cache), `gemma3`, `gpt2`, `gpt_neox` (their
graphs), `package` (package writing, metadata, report), `residency` (resident weight bytes
per compute units), `readback` (load a saved package, weight and structure checks),
`interpreter` (numpy execution of the ops liftedge emits), `runtime` (verification).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from liftedge.errors import ArtifactError
from liftedge.lowering import parse_target_options

NAME = "coreml"
# Embedding / head storage options this target lowers (`liftedge.planner` offers no others).
TABLE_OPTIONS = ("fp16", "int8-g64", "int4-g32")
OPTIONS = {
    "max_context": "KV-cache length in tokens (state shape; default 256)",
    "max_prefill": "longest prompt chunk one call accepts (default 64, at most max_context)",
    "verify_tokens": "greedy tokens compared with the reference during verification (default 32; "
                     "the numpy interpreter runs a 135M model at a few tokens/s)",
    "compute_units": "MLComputeUnits the app loads the model with and the memory plan assumes: "
                     "cpuAndNeuralEngine (default), cpuAndGPU, cpuOnly, all",
}
_DEFAULTS = {"max_context": 256, "max_prefill": 64, "verify_tokens": 32, "compute_units": "cpuAndNeuralEngine"}


def parse_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Options with defaults filled in and checked; unknown names are refused."""
    from liftedge.targets.coreml.residency import check_compute_units

    out = parse_target_options(NAME, options, _DEFAULTS)
    for key, value in out.items():
        if key != "compute_units" and value < 1:
            raise ArtifactError(f"option {key} must be >= 1, got {value}")
    check_compute_units(out["compute_units"])
    out["max_prefill"] = min(out["max_prefill"], out["max_context"])
    return out


def lower(pack: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    from liftedge.targets.coreml.package import lower_pack

    opts = parse_options(options)
    return lower_pack(Path(pack), Path(out), opts["max_context"], opts["max_prefill"], opts["compute_units"])


def verify(out: Path, pack: Path, report: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from liftedge.targets.coreml.runtime import verify_package

    opts = parse_options(options)
    return verify_package(Path(out), Path(pack), report, opts["verify_tokens"])
