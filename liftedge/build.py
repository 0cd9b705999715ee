"""`liftedge build`'s pipeline: plan -> quantize -> pack -> lower -> verify, each step reusable.

    MODEL --(sensitivity, budget)--> plan --(LiftQuant, correction)--> pack --(target)--> artifact

The pack of a plan is kept in the cache (`packs/<key>`, key = model, calibration tokens, plan
choices, correction), so building the same plan for a second runtime or after a failed
lowering does not quantize again. An existing pack folder can be given instead of a model
(the plan and quantization steps are then skipped; the device budget is still checked).
The artifact step is `liftedge.lowering.build_artifact` (atomic, verified, report.json).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from liftedge.cache import cache_path
from liftedge.packed import is_pack

log = logging.getLogger(__name__)


def pack_key(loaded, tokens: torch.Tensor, plan_options: dict[str, str], correction, finetune=None) -> str:
    import dataclasses

    h = hashlib.sha256()
    h.update((loaded.source_hash or "").encode())
    h.update(tokens.to("cpu", torch.int64).contiguous().numpy().tobytes())
    h.update(json.dumps([sorted(plan_options.items()), None if correction is None else dataclasses.asdict(correction)],
                        default=str).encode())
    if finetune is not None:  # (without, the key of packs cached before fine-tuning existed)
        h.update(json.dumps(dataclasses.asdict(finetune), sort_keys=True).encode())
    return h.hexdigest()[:32]


def planned_pack(loaded, tokens: torch.Tensor, calibration: dict[str, Any], plan_result, correction, *,
                 device: str = "cpu", seed: int = 0, finetune=None) -> Path:
    """The pack of `plan_result` (quantized now, or reused from the cache)."""
    from liftedge.quantize.save import quantize_and_save
    from liftedge.planner import plan_configs

    plan = plan_result.plan
    path = cache_path("packs", pack_key(loaded, tokens, plan.options_by_site(), correction, finetune))
    if is_pack(path):
        print(f"reusing the quantized pack {path}")
        return path
    configs = plan_configs(plan, seed=seed)
    if not configs:
        from liftedge.packed import save_packed

        print("the budget holds the whole model at fp16: no layer needs quantizing")
        save_packed(path, loaded, {}, method="fp16", calibration=calibration, plan=plan_result.to_dict(), force=True)
        return path
    quantize_and_save(loaded, tokens, calibration, configs, correction, path, force=True, device=device,
                      plan=plan_result.to_dict(), finetune=finetune)
    return path


def integer_head(manifest: dict, config: dict) -> bool:
    """Whether the pack's head is stored as integers: an untied head site, or the embedding a
    tied head shares (Hugging Face ties them unless the config says otherwise)."""
    stored = {s["kind"] for s in manifest["sites"].values() if s.get("fmt") not in (None, "fp16")}
    return "head" in stored or ("embedding" in stored and config.get("tie_word_embeddings", True))


def check_pack_fits(pack: Path, request) -> dict[str, Any] | None:
    """For a device request: the memory split with the pack's bytes, or `BudgetError` if they do not fit."""
    if request.device is None:
        return None
    from liftedge.memory import ModelDims, budget_breakdown, require_fit, sign_unpack_nbytes, with_sign_unpack
    from liftedge.packed import read_manifest

    manifest = read_manifest(pack)
    config = json.loads((pack / "config.json").read_text())
    dims = ModelDims.from_config(config)
    mem = budget_breakdown(request.device, dims, request.context, request.kv_bits, runtime=request.runtime,
                           increased_memory_limit=request.increased_memory_limit,
                           compute_units=request.compute_units, head_cast=not integer_head(manifest, config))
    if mem.runtime == "onnxruntime":
        lifted = [(m["shape"][0] * m["shape"][1], m["meta"]["D"] / m["meta"]["d"]) for m in manifest["sites"].values()
                  if m.get("fmt") == "liftquant"]
        mem = with_sign_unpack(mem, sign_unpack_nbytes(lifted))
    require_fit(mem, int(manifest["totals"]["nbytes"]), request.device, dims)
    return mem.to_dict()
