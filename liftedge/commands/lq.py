"""The LiftQuant half of `liftedge quantize`: options -> configs, stream, write the pack.

The training options (block correction, end-to-end fine-tuning) are declared here once for
`liftedge quantize` and `liftedge build`; this module turns the parsed options into a
`LiftQuantConfig`, a `CorrectionConfig` and a `FinetuneConfig`, runs `quantize_streaming`
with a resumable checkpoint folder in the cache, optionally fine-tunes, and writes the pack.
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
from liftedge.finetune import FinetuneConfig
from liftedge.quantize.liftquant import LiftQuantConfig, rate_for_bits
from liftedge.types import Rate


def add_training_arguments(group) -> None:
    """The block-correction and fine-tuning options, on an argparse group."""
    group.add_argument("--no-correct", dest="correct", action="store_false",
                       help="skip intra-block correction (faster, less accurate)")
    group.add_argument("--epochs", type=int, default=None,
                       help=f"correction passes over the calibration set (default {CorrectionConfig.epochs})")
    group.add_argument("--finetune-epochs", dest="finetune_epochs", type=int, default=0, metavar="N",
                       help="after the blocks, fine-tune the whole quantized model's scales and transforms for N "
                            "passes over the calibration set, matching the float model's next-token "
                            "distribution (paper appendix B; default 0: off). Costs a float copy of the "
                            "model in memory and about one forward+backward of the model per sample")
    group.add_argument("--finetune-lr-transform", dest="finetune_lr_transform", type=float,
                       default=FinetuneConfig.lr_transform, metavar="LR",
                       help=f"fine-tuning learning rate of the transforms (default {FinetuneConfig.lr_transform:g})")
    group.add_argument("--finetune-lr-scale", dest="finetune_lr_scale", type=float,
                       default=FinetuneConfig.lr_scale, metavar="LR",
                       help=f"fine-tuning learning rate of the scales (default {FinetuneConfig.lr_scale:g})")


def correction_from_args(args: argparse.Namespace) -> CorrectionConfig | None:
    """The block correction asked for (None with --no-correct), validated."""
    if not args.correct:
        return None
    epochs = args.epochs if args.epochs is not None else CorrectionConfig.epochs
    if epochs < 1:
        raise LiftedgeError(f"--epochs must be >= 1, got {epochs}")
    return CorrectionConfig(epochs=epochs, seed=args.seed)


def finetune_from_args(args: argparse.Namespace) -> FinetuneConfig | None:
    """The end-to-end fine-tune asked for (None for --finetune-epochs 0), validated."""
    if args.finetune_epochs < 0:
        raise LiftedgeError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.finetune_epochs == 0:
        return None
    for flag, lr in (("--finetune-lr-transform", args.finetune_lr_transform),
                     ("--finetune-lr-scale", args.finetune_lr_scale)):
        if not lr >= 0:
            raise LiftedgeError(f"{flag} must be a learning rate >= 0, got {lr}")
    return FinetuneConfig(epochs=args.finetune_epochs, lr_transform=args.finetune_lr_transform,
                          lr_scale=args.finetune_lr_scale, seed=args.seed)


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
    return config, correction_from_args(args)


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
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise LiftedgeError("--device cuda was asked for but torch sees no CUDA device")
    ckpt = cache_path("runs", _run_key(loaded, tokens, configs, correction))
    if ckpt.is_dir() and any(ckpt.iterdir()):
        print(f"resuming from {len(list(ckpt.iterdir()))} finished block(s) in {ckpt}")
    loaded.model.to(torch_device)
    tokens = tokens.to(torch_device)
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


def print_written(output, manifest: dict, what: str, correction) -> None:
    t = manifest["totals"]
    print(f"wrote {output}: {t['quantized_sites']} sites with LiftQuant {what} "
          f"({'with' if correction else 'without'} correction); linear layers "
          f"{t['bits_per_weight']:.3f} bits/weight all bytes counted, {t['nbytes'] / 2**20:.2f} MiB of tensors")
