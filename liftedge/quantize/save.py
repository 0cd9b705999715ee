"""Quantize a loaded model with LiftQuant and write the pack: the library entry point.

Owns the run: resumable streaming (`pipeline.quantize_streaming`, with a checkpoint folder in
the cache keyed by model, calibration tokens and configs), the optional end-to-end fine-tune,
and the pack's manifest record of the quantizer. Both `liftedge quantize` and `liftedge build`
call `quantize_and_save`; option parsing stays in the CLI layer (`liftedge.commands.lq`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from typing import Any

import torch

from liftedge.correct import CorrectionConfig
from liftedge.errors import LiftedgeError
from liftedge.finetune import FinetuneConfig
from liftedge.quantize.liftquant import LiftQuantConfig


def _run_key(loaded, tokens: torch.Tensor, configs: dict[str, LiftQuantConfig], correction) -> str:
    # The fine-tune is not part of the key: it runs after the blocks, which it does not change.
    h = hashlib.sha256()
    h.update(loaded.source_hash.encode())
    h.update(tokens.to("cpu", torch.int64).contiguous().numpy().tobytes())
    h.update(json.dumps([{k: _as_dict(v) for k, v in sorted(configs.items())}, _as_dict(correction)],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _as_dict(cfg) -> Any:
    return None if cfg is None else dataclasses.asdict(cfg)


def torch_device(name: str) -> torch.device:
    """The torch device `name`, refused with a clear error where liftedge cannot run on it here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LiftedgeError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LiftedgeError(f"--device {name} was asked for but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise LiftedgeError(f"--device {name}: liftedge measures and quantizes on cpu or cuda")
    return device


def quantize_and_save(loaded, tokens, calibration: dict, configs: dict[str, LiftQuantConfig],
                      correction: CorrectionConfig | None, output, *, force: bool = False, device: str = "cpu",
                      plan: dict | None = None, finetune: FinetuneConfig | None = None) -> dict:
    """LiftQuant the sites in `configs` (others stay fp16), resumably; optionally fine-tune end
    to end; write the pack; return its manifest."""
    from liftedge import lattice
    from liftedge.cache import cache_path
    from liftedge.io import check_destination
    from liftedge.packed import save_packed
    from liftedge.quantize.pipeline import quantize_streaming

    check_destination(output, force)  # fail before the long work, not after
    lq_configs = {k: c for k, c in configs.items() if isinstance(c, LiftQuantConfig)}
    for config in set(lq_configs.values()):
        lattice.load_codebook(config.rate)  # an unknown rate fails here, listing the shipped ones
    device = torch_device(device)
    ckpt = cache_path("runs", _run_key(loaded, tokens, configs, correction))
    if ckpt.is_dir() and any(ckpt.iterdir()):
        print(f"resuming from {len(list(ckpt.iterdir()))} finished block(s) in {ckpt}")
    loaded.model.to(device)
    tokens = tokens.to(device)
    teacher = _teacher(loaded, tokens) if finetune else None  # the float model's view, before it changes
    # Without fine-tuning, keep_decoded=False: the pack needs only the packed tensors, and the
    # float model stays a memory map that is resident a block at a time (peak RSS well below
    # the float model's size). Fine-tuning starts from the model holding its decoded weights.
    qtensors, report = quantize_streaming(loaded, tokens, configs, correction, checkpoint_dir=ckpt,
                                          keep_decoded=finetune is not None)
    finetuned = None
    if finetune is not None:
        from liftedge.finetune import finetune as finetune_model

        qtensors, finetuned = finetune_model(loaded.model, qtensors, tokens, teacher, finetune)
        print(f"fine-tune: calibration KL {finetuned['kl_before']:.4f} -> {finetuned['kl_after']:.4f} "
              f"({'kept' if finetuned['kept'] else 'discarded: it did not lower the KL'})")
    loaded.model.to("cpu")
    rates = sorted({str(c.rate) for c in lq_configs.values()})
    tables = {k: _as_dict(c) for k, c in configs.items() if k not in lq_configs}  # embedding / head: RTN "int"
    quantizer = {"method": "liftquant", "correction": _as_dict(correction), "blocks": report.blocks,
                 "config": _as_dict(next(iter(lq_configs.values()))) if len(set(lq_configs.values())) == 1 else None,
                 "rates": rates, **({"tables": tables} if tables else {}),
                 **({"finetune": {"config": _as_dict(finetune), **finetuned}} if finetune else {})}
    methods = {k: "liftquant" if k in lq_configs else "rtn" for k in qtensors}
    manifest = save_packed(output, loaded, qtensors, method=methods, quantizer=quantizer,
                           calibration=calibration, plan=plan, force=force)
    shutil.rmtree(ckpt, ignore_errors=True)
    return manifest


def _teacher(loaded, tokens):
    from liftedge.finetune import teacher_topk

    print(f"fine-tune: the float model's top-k next-token targets for {tokens.shape[0]} calibration samples ...")
    return teacher_topk(loaded.model, tokens)
