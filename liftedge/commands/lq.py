"""The LiftQuant half of `liftedge quantize`: options -> configs, stream, write the pack.

Argument parsing lives in `commands/quantize.py`; this module turns the parsed options
into a `LiftQuantConfig` and a `CorrectionConfig`, runs `quantize_streaming` with a
resumable checkpoint folder in the cache, and writes the pack.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
from typing import Any

import torch

from liftedge.correct import CorrectionConfig
from liftedge.errors import LiftedgeError
from liftedge.quantize.liftquant import LiftQuantConfig, rate_for_bits
from liftedge.types import Rate


def configs_from_args(args: argparse.Namespace) -> tuple[LiftQuantConfig, CorrectionConfig | None]:
    """The layer config (rate and ablation switches) and the correction config, validated."""
    if (args.rate is None) == (args.bits is None):
        raise LiftedgeError("liftquant needs exactly one of --rate D/d or --bits B")
    try:
        rate = Rate.parse(args.rate) if args.rate is not None else rate_for_bits(args.bits)
    except ValueError as exc:
        raise LiftedgeError(str(exc)) from None
    config = LiftQuantConfig(rate, mix=args.mix, act_scale=args.act_scale, block_scale=args.block_scale,
                             seed=args.seed)
    if not args.correct:
        return config, None
    epochs = args.epochs if args.epochs is not None else CorrectionConfig.epochs
    if epochs < 1:
        raise LiftedgeError(f"--epochs must be >= 1, got {epochs}")
    return config, CorrectionConfig(epochs=epochs, seed=args.seed)


def _run_key(loaded, tokens: torch.Tensor, configs: dict[str, LiftQuantConfig], correction) -> str:
    h = hashlib.sha256()
    h.update(loaded.source_hash.encode())
    h.update(tokens.to("cpu", torch.int64).contiguous().numpy().tobytes())
    h.update(json.dumps([{k: _as_dict(v) for k, v in sorted(configs.items())}, _as_dict(correction)],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _as_dict(cfg) -> Any:
    return None if cfg is None else dataclasses.asdict(cfg)


def quantize_and_save(loaded, tokens, calibration: dict, configs: dict[str, LiftQuantConfig],
                      correction: CorrectionConfig | None, output, *, force: bool = False, device: str = "cpu",
                      plan: dict | None = None) -> dict:
    """LiftQuant the sites in `configs` (others stay fp16), resumably; write the pack; return its manifest."""
    from liftedge import lattice
    from liftedge.cache import cache_path
    from liftedge.io import check_destination
    from liftedge.packed import save_packed
    from liftedge.quantize.pipeline import quantize_streaming

    check_destination(output, force)  # fail before the long work, not after
    lq_configs = {k: c for k, c in configs.items() if isinstance(c, LiftQuantConfig)}
    for config in set(lq_configs.values()):
        lattice.load_codebook(config.rate)  # an unknown rate fails here, listing the shipped ones
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise LiftedgeError("--device cuda was asked for but torch sees no CUDA device")
    ckpt = cache_path("runs", _run_key(loaded, tokens, configs, correction))
    if ckpt.is_dir() and any(ckpt.iterdir()):
        print(f"resuming from {len(list(ckpt.iterdir()))} finished block(s) in {ckpt}")
    loaded.model.to(torch_device)
    # keep_decoded=False: the pack needs only the packed tensors, and the float model stays
    # a memory map that is resident a block at a time (peak RSS well below the float model's size).
    qtensors, report = quantize_streaming(loaded, tokens.to(torch_device), configs, correction, checkpoint_dir=ckpt,
                                          keep_decoded=False)
    loaded.model.to("cpu")
    rates = sorted({str(c.rate) for c in lq_configs.values()})
    tables = {k: _as_dict(c) for k, c in configs.items() if k not in lq_configs}  # embedding / head: RTN "int"
    quantizer = {"method": "liftquant", "correction": _as_dict(correction), "blocks": report.blocks,
                 "config": _as_dict(next(iter(lq_configs.values()))) if len(set(lq_configs.values())) == 1 else None,
                 "rates": rates, **({"tables": tables} if tables else {})}
    methods = {k: "liftquant" if k in lq_configs else "rtn" for k in qtensors}
    manifest = save_packed(output, loaded, qtensors, method=methods, quantizer=quantizer,
                           calibration=calibration, plan=plan, force=force)
    shutil.rmtree(ckpt, ignore_errors=True)
    return manifest


def print_written(output, manifest: dict, what: str, correction) -> None:
    t = manifest["totals"]
    print(f"wrote {output}: {t['quantized_sites']} sites with LiftQuant {what} "
          f"({'with' if correction else 'without'} correction); linear layers "
          f"{t['bits_per_weight']:.3f} bits/weight all bytes counted, {t['nbytes'] / 2**20:.2f} MiB of tensors")
