"""`liftedge quantize`: quantize a model's decoder linear layers with a baseline method, write a pack.

Argument handling and printing only: calibration is `text` + `calibrate`, the methods are
`liftedge.quantize`, the output is `liftedge.packed`. Embeddings and the output head stay
fp16; only linear layers inside decoder blocks are quantized.
"""

from __future__ import annotations

import argparse
import sys
import dataclasses
from pathlib import Path
from typing import Any

# Data-free calibration samples text from the model itself, one token at a time: 64 x 512
# tokens (32k) is well above the 1536 tokens the widest SmolLM2 Hessian needs to be full
# rank, and takes minutes rather than an hour on a laptop CPU.
DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 512


def register(subparsers) -> None:
    from liftedge.commands.lq import add_training_arguments
    from liftedge.quantize import QUANTIZERS

    p = subparsers.add_parser(
        "quantize", help="quantize a model with a baseline method (rtn, gptq) into a pack folder",
        description="Quantize every linear layer of the decoder blocks (embeddings and the head stay "
                    "fp16) and write a liftedge pack (manifest.json + weights.safetensors + config and "
                    "tokenizer). Without --calib, methods that need calibration sample their text "
                    "from the model itself (data-free); the manifest records which.")
    p.add_argument("model", metavar="MODEL", help="a Hugging Face folder, a .gguf file, or 'default'")
    p.add_argument("--method", required=True, choices=sorted(QUANTIZERS), help="quantization method")
    p.add_argument("--bits", type=float, default=None,
                   help="rtn/gptq: bits per weight code (2, 3, 4 or 8); liftquant: target bits per weight "
                        "(the shipped rate D/d nearest to it is used)")
    p.add_argument("--rate", default=None, metavar="D/d", help="liftquant: the code, e.g. 24/10 (2.4 bits)")
    p.add_argument("--group-size", dest="group_size", type=int, default=128,
                   help="input columns sharing one scale/zero (default 128; the last group may be shorter)")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid (zero point fixed, not stored)")
    p.add_argument("--no-act-order", dest="act_order", action="store_false", default=None,
                   help="gptq: quantize columns in their natural order (default: by decreasing Hessian diagonal)")
    p.add_argument("--calib", nargs="+", type=Path, default=None, metavar="FILE", help="calibration text files")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"calibration samples (default {DEFAULT_SAMPLES})")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"tokens per calibration sample (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    lq = p.add_argument_group("liftquant")
    add_training_arguments(lq)
    lq.add_argument("--no-mix", dest="mix", action="store_false", help="ablation: no Kronecker mixing")
    lq.add_argument("--no-act-scale", dest="act_scale", action="store_false", help="ablation: no s1 scale")
    lq.add_argument("--no-block-scale", dest="block_scale", action="store_false", help="ablation: no s2 scale")
    lq.add_argument("--device", default="cpu", help="torch device for liftquant (cpu, cuda)")
    p.add_argument("-o", "--output", required=True, type=Path, help="pack folder to write")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=run)


def method_config(config_cls: type, args: argparse.Namespace) -> Any:
    """The method's config dataclass from the arguments it has a field for (others keep defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
             if getattr(args, f.name, None) is not None}
    return config_cls(**given)


def calibration(loaded, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(calibration tokens [n, L], the manifest's calibration record)."""
    from liftedge.text import calibration_tokens, describe_files, describe_generation, generate_calibration_tokens

    if args.calib:
        tokens = calibration_tokens(loaded.tokenizer, args.calib, args.samples, args.seq_len, args.seed)
        return tokens, describe_files(args.calib, args.samples, args.seq_len, args.seed, loaded.tokenizer)
    print(f"no --calib given: sampling {args.samples} x {args.seq_len} tokens from the model (data-free)", file=sys.stderr)
    tokens = generate_calibration_tokens(loaded, args.samples, args.seq_len, args.seed)
    return tokens, {**describe_generation(loaded, args.samples, args.seq_len, args.seed), "source": "data-free"}


def run(args: argparse.Namespace) -> int:
    from liftedge.commands import claimed_output

    with claimed_output(args):  # checked and locked before the long work, held to the end
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from liftedge.errors import LiftedgeError
    from liftedge.model import load_model
    from liftedge.commands import check_calibration_arguments

    check_calibration_arguments(args)

    if args.method == "liftquant":
        from liftedge.commands import lq
        from liftedge.quantize.save import quantize_and_save

        config, correction = lq.configs_from_args(args)
        finetune = lq.finetune_from_args(args)
        loaded = load_model(args.model, mapped=True)
        tokens, calib = calibration(loaded, args)
        from liftedge.quantize import default_sites

        configs = {s.name: config for s in default_sites(loaded.model)}
        manifest = quantize_and_save(loaded, tokens, calib, configs, correction, args.output, force=args.force,
                                     device=args.device, finetune=finetune)
        lq.print_written(args.output, manifest, str(config.rate), correction)
        return 0
    if args.bits is None or args.rate is not None or args.bits != int(args.bits):
        raise LiftedgeError(f"{args.method} takes an integer --bits (2, 3, 4 or 8) and no --rate")
    args.bits = int(args.bits)
    entry = get_method_entry(args.method)
    try:
        config = method_config(entry.config_cls, args)
    except ValueError as exc:
        raise LiftedgeError(str(exc)) from None
    loaded = load_model(args.model, mapped=True)
    return _quantize_integer(loaded, entry, config, args)


def get_method_entry(name: str):
    from liftedge.quantize import get_method

    return get_method(name)


def _quantize_integer(loaded, entry, config, args: argparse.Namespace) -> int:
    from liftedge.calibrate import collect_stats
    from liftedge.packed import save_packed
    from liftedge.quantize import config_to_dict, default_sites, quantize_model

    sites = default_sites(loaded.model)
    stats, calib = None, {"source": "none", "reason": f"{args.method} uses no calibration data"}
    if entry.needs_stats:
        tokens, calib = calibration(loaded, args)
        stats = collect_stats(loaded, tokens, sites)
    elif args.calib:
        print(f"note: {args.method} uses no calibration data; --calib ignored")
    qtensors = quantize_model(loaded, args.method, config, stats, sites)
    manifest = save_packed(args.output, loaded, qtensors, method=args.method,
                           quantizer={"method": args.method, "config": config_to_dict(config)},
                           calibration=calib, force=args.force)
    t = manifest["totals"]
    print(f"wrote {args.output}: {t['quantized_sites']} sites quantized with {args.method} "
          f"({args.bits} bits, group {config.group_size}); linear layers {t['bits_per_weight']:.3f} bits/weight, "
          f"{t['nbytes'] / 2**20:.2f} MiB of tensors")
    return 0
