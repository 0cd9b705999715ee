"""The LiftQuant options of `liftedge quantize` and `liftedge build`: parsed options -> configs.

The training options (block correction, end-to-end fine-tuning) are declared here once; this
module turns them into a `LiftQuantConfig`, a `CorrectionConfig` and a `FinetuneConfig`. The
work itself (stream, fine-tune, write the pack) is `liftedge.quantize.save.quantize_and_save`.
"""

from __future__ import annotations

import argparse
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
    if args.rate is not None:
        from liftedge.commands import check_shipped_rate

        check_shipped_rate(args.rate)
    try:
        rate = Rate.parse(args.rate) if args.rate is not None else rate_for_bits(args.bits)
    except ValueError as exc:
        raise LiftedgeError(str(exc)) from None
    config = LiftQuantConfig(rate, mix=args.mix, act_scale=args.act_scale, block_scale=args.block_scale,
                             seed=args.seed)
    return config, correction_from_args(args)


def print_written(output, manifest: dict, what: str, correction) -> None:
    t = manifest["totals"]
    print(f"wrote {output}: {t['quantized_sites']} sites with LiftQuant {what} "
          f"({'with' if correction else 'without'} correction); linear layers "
          f"{t['bits_per_weight']:.3f} bits/weight all bytes counted, {t['nbytes'] / 2**20:.2f} MiB of tensors")
