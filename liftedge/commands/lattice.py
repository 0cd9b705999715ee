"""`liftedge lattice train|eval`: train a rate's mapping matrix, or measure a shipped one."""

from __future__ import annotations

import argparse
import json

from liftedge.errors import LiftedgeError
from liftedge.types import Rate

# Paper table 1 (MSE per weight on N(0, 1)); shown next to ours where the rate matches.
PAPER_MSE = {"32/20": 0.146, "16/8": 0.089, "32/16": 0.082, "30/14": 0.070, "24/10": 0.053}


def _rate(text: str) -> Rate:
    try:
        return Rate.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def register(subparsers) -> None:
    p = subparsers.add_parser("lattice", help="train or measure LiftQuant mapping matrices (rates D/d)")
    sub = p.add_subparsers(dest="lattice_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train M for a rate on N(0,1) and add it to a codebook folder")
    t.add_argument("--rate", type=_rate, required=True, help="D/d, e.g. 24/10")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None, help="soft-min steps (default 200)")
    t.add_argument("--lloyd-steps", type=int, default=None, help="Lloyd refinement steps (default 10)")
    t.add_argument("--lloyd-samples", type=int, default=None, help="blocks per Lloyd step (default 16384)")
    t.add_argument("--config", default=None,
                   help='JSON overrides of TrainConfig, e.g. the menu\'s: {"softmin_steps":1500,"softmin_batch":1024,'
                   '"lloyd_steps":40,"lloyd_samples":262144} (see menu.json "config")')
    t.add_argument("--device", default=None, help="cpu (default) or cuda")
    t.add_argument("--out", default=None, help="codebook folder (default: the package's shipped menu)")
    t.add_argument("--eval-samples", type=int, default=20000, help="blocks for the recorded MSE (0: skip)")
    t.add_argument("--force", action="store_true", help="replace a rate already in the folder")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="MSE on N(0,1), bounds and encode speed of a trained rate")
    e.add_argument("--rate", type=_rate, required=True)
    e.add_argument("--samples", type=int, default=20000, help="blocks of N(0,1) weights (default 20000)")
    e.add_argument("--speed-samples", type=int, default=None, help="blocks timed for throughput (default: --samples)")
    e.add_argument("--method", choices=("exhaustive", "lifted"), default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--codebooks", default=None, help="folder to read instead of the shipped menu")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=run_eval)


def run_train(args) -> int:
    from pathlib import Path

    from liftedge.lattice import menu
    from liftedge.lattice.evaluate import mse_per_weight
    from liftedge.lattice.train import TrainConfig, train_codebook

    folder = Path(args.out) if args.out else menu.CODEBOOK_DIR
    if args.rate.name in menu.read_menu(folder) and not args.force:
        raise LiftedgeError(f"{args.rate} is already trained in {folder}; pass --force to replace it")
    overrides = json.loads(args.config) if args.config else {}
    overrides.update({k: v for k, v in {"lloyd_steps": args.lloyd_steps, "lloyd_samples": args.lloyd_samples}.items() if v is not None})
    try:
        cfg = TrainConfig(**overrides)
    except TypeError as exc:
        raise LiftedgeError(f"bad --config: {exc}; fields: {', '.join(TrainConfig.__dataclass_fields__)}") from exc
    M, meta = train_codebook(args.rate, seed=args.seed, steps=args.steps, device=args.device, config=cfg)
    if args.eval_samples:
        meta["eval_mse"] = mse_per_weight(M, args.eval_samples, device=args.device)
        meta["eval_samples"] = args.eval_samples
    path = menu.save_codebook(args.rate, M, meta, folder)
    print(f"{args.rate}: wrote {path} (train MSE {meta['train_mse_last_lloyd_step']:.5f}"
          + (f", eval MSE {meta['eval_mse']:.5f})" if "eval_mse" in meta else ")"))
    return 0


def evaluate_rate(rate: Rate, samples: int, speed_samples: int | None = None, method=None, device=None, folder=None) -> dict:
    """The figures `lattice eval` reports, as a JSON-able dict."""
    from liftedge.lattice import evaluate, load_codebook, search

    M = load_codebook(rate, folder)
    method = method or search.default_method(rate.D, rate.d)
    uq_mse, uq_levels, uq_step = evaluate.uniform_scalar_mse(rate.bits_per_weight)
    return {
        "rate": rate.name,
        "bits_per_weight": rate.bits_per_weight,
        "search": method,
        "samples": samples,
        "mse": evaluate.mse_per_weight(M, samples, method, device),
        "paper_mse": PAPER_MSE.get(rate.name),
        "bound": evaluate.rate_distortion_bound(rate.bits_per_weight),
        "uniform_scalar_mse": uq_mse,
        "uniform_scalar_levels": uq_levels,
        "uniform_scalar_step": uq_step,
        "encode_weights_per_s": evaluate.encode_throughput(M, speed_samples or samples, method, device),
        "device": str(device or "cpu"),
    }


def run_eval(args) -> int:
    if args.samples < 1:
        raise LiftedgeError(f"--samples must be >= 1, got {args.samples}")
    r = evaluate_rate(args.rate, args.samples, args.speed_samples, args.method, args.device, args.codebooks)
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=True))
        return 0
    paper = f" (paper {r['paper_mse']})" if r["paper_mse"] is not None else ""
    print(f"LQ-{r['rate']}: {r['bits_per_weight']:.3f} bits/weight, {r['search']} search")
    print(f"  mse per weight on N(0,1): {r['mse']:.5f}{paper} over {r['samples']} blocks")
    print(f"  bound 2^(-2R): {r['bound']:.5f}; best uniform scalar ({r['uniform_scalar_levels']} levels): "
          f"{r['uniform_scalar_mse']:.5f}")
    print(f"  encode: {r['encode_weights_per_s']:.0f} weights/s on {r['device']}")
    return 0
