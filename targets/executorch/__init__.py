"""ExecuTorch target (`.pte`): lift-project custom op with a C++ kernel, stock-operator fallback.

Implements the `liftedge.lowering` contract:

    NAME = "executorch"
    OPTIONS                      option -> help (`liftedge build --target executorch`)
    lower(pack, out, options)    writes out/model.pte, returns the report (every site's lowering)
    verify(out, pack, report, options)   runs model.pte in executorch.runtime and compares
                                         greedy decoding with the pack's reference model

Modules: `ops` (the torch ops `liftedge::lq_linear`, `lq_rms_linear`, `lq_glu`, `fp16_linear`,
`int_linear` + `.out`), `fusion` (a decoder block's norms and gated activation into those ops),
`kernel` (build/cache/load the C++ kernel library from `kernels/`), `modules` (export-time
replacements of the other site formats, int8/int4 embedding tables included), `attention`
(KV cache + attention through ExecuTorch's LLM ops), `export` (static KV cache, torch.export,
XNNPACK lowering), `runtime`
(running and verifying a `.pte`), `runner_check` (ExecuTorch's TextLLMRunner on the `.pte`). `CMakeLists.txt` links `kernels/` into an app's runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from liftedge.errors import ArtifactError
from liftedge.lowering import parse_target_options

NAME = "executorch"
# Embedding / head storage options this target lowers (`liftedge.planner` offers no others).
TABLE_OPTIONS = ("fp16", "int8-g64", "int4-g32")
OPTIONS = {
    "custom_ops": "true (default): lift-project layers call liftedge::lq_linear (C++ kernel library "
                  "needed at run time); false: stock-operator fallback (bit unpack in the graph)",
    "llm_attention": "true (default): attention and KV cache through ExecuTorch's LLM ops "
                     "(llama::update_cache, llama::custom_sdpa; in ExecuTorch's LLM runtime and its prebuilt "
                     "Android/iOS libraries); false: stock operators (transformers' static cache, slower)",
    "fuse_blocks": "true (default, with custom_ops): each decoder block's RMSNorms and gated-MLP activation "
                   "run inside the lift-project ops (liftedge::lq_rms_linear, liftedge::lq_glu), fewer operator "
                   "calls per token; false: one liftedge::lq_linear per layer, norms and activation as graph ops",
    "max_context": "KV-cache length in tokens (default 256; the build passes the device's context)",
    "max_prefill": "longest prompt chunk one call accepts (default 128, at most max_context)",
    "verify_tokens": "greedy tokens compared with the reference during verification (default 32)",
}
_DEFAULTS = {"custom_ops": True, "llm_attention": True, "fuse_blocks": True, "max_context": 256, "max_prefill": 128, "verify_tokens": 32}


def parse_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Options with defaults filled in and types checked; unknown names are refused."""
    out = parse_target_options(NAME, options, _DEFAULTS)
    out["max_prefill"] = min(out["max_prefill"], out["max_context"])
    if out["verify_tokens"] < 1:
        raise ArtifactError(f"verify_tokens must be >= 1, got {out['verify_tokens']}")
    return out


def lower(pack: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    from liftedge.targets.executorch.export import PTE_NAME, ExportOptions, lower_pack

    opts = parse_options(options)
    report = lower_pack(Path(pack), Path(out), ExportOptions(opts["custom_ops"], opts["max_context"],
                                                             opts["max_prefill"],
                                                             llm_attention=opts["llm_attention"],
                                                             fuse_blocks=opts["fuse_blocks"]))
    report["artifacts"] = {"program": PTE_NAME}
    report["runtime"] = {"max_context": opts["max_context"], "max_prefill": opts["max_prefill"],
                         "inputs": "(input_ids int64 [1, n], cache_position int64 [n]), 1 <= n <= max_prefill",
                         "outputs": "logits float32 [1, 1, vocab] (the last position)",
                         "kernel_library": ({"needed": True, "operators": report["custom_operators"],
                                             "cmake_target": "liftedge_kernels (targets/executorch/CMakeLists.txt)",
                                             "python": "liftedge.targets.executorch.kernel.load_library()"}
                                            if report["requires_kernel_library"]
                                            else {"needed": False, "why": "stock operators only"}),
                         "llm_ops": ({"needed": True, "operators": report["attention"]["operators"],
                                      "where": "ExecuTorch's LLM custom-op library (extension/llm/custom_ops, "
                                               "CMake EXECUTORCH_BUILD_KERNELS_LLM=ON; Python: import "
                                               "executorch.extension.llm.custom_ops.custom_ops)"}
                                     if report["requires_llm_ops"]
                                     else {"needed": False, "why": report["attention"]["why"]}),
                         "runner": "executorch.extension.llm.runner.TextLLMRunner reads the metadata "
                                   "methods " + ", ".join(sorted(report["runner_metadata"]))}
    return report


def verify(out: Path, pack: Path, report: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    from liftedge.targets.executorch.export import PTE_NAME
    from liftedge.targets.executorch.runtime import verify_pte

    from liftedge.targets.executorch.runner_check import check_text_llm_runner

    opts = parse_options(options)
    record = verify_pte(Path(out) / PTE_NAME, Path(pack), bool(report.get("requires_kernel_library")),
                        opts["max_prefill"], opts["max_context"], opts["verify_tokens"])
    record["runners"] = [check_text_llm_runner(Path(out), report, record["reference_tokens"])]
    return record
