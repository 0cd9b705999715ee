"""Arguments shared by `liftedge plan` and `liftedge build`: the budget and the calibration.

Not a command itself (absent from `liftedge.cli.COMMANDS`). `add_budget_arguments` adds the
budget sources (a device profile with --ram, or --lambda, --bits, --weights-budget) and
`budget_request` turns them into a `liftedge.planner.BudgetRequest`; `sensitivity` loads the
model's error table with the calibration the arguments name.
"""

from __future__ import annotations

import argparse
import sys

from liftedge.commands.quantize import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from liftedge.errors import LiftedgeError
from liftedge.measure import DEFAULT_MENU
from liftedge.memory import COREML_COMPUTE_UNITS


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget: the device's RAM (--target, --ram), or --lambda, --bits or --weights-budget "
                             "(with --target: that device's runtime and context, and its RAM is checked)")
    g.add_argument("--target", dest="target", default=None, metavar="DEVICE",
                   help="device profile: android, ios, linux or a phone from `liftedge devices` (or a .toml path)")
    g.add_argument("--ram", default=None, help="the device's RAM, e.g. 4GB (required for generic profiles)")
    g.add_argument("--context", type=int, default=None, help="KV cache length in tokens (default: the profile's)")
    g.add_argument("--runtime", choices=("executorch", "coreml", "onnxruntime"), default=None,
                   help="runtime (default: the profile's: android -> executorch, ios -> coreml)")
    g.add_argument("--kv-bits", dest="kv_bits", type=int, default=16, help="KV cache precision (default 16)")
    g.add_argument("--increased-memory-limit", dest="increased_memory_limit", action="store_true",
                   help="iOS: the app has the increased-memory-limit entitlement")
    g.add_argument("--compute-units", dest="compute_units", default=None,
                   choices=COREML_COMPUTE_UNITS,
                   help="Core ML: the MLComputeUnits the app loads the model with (default cpuAndNeuralEngine, "
                        "where weights stay compressed; the others decompress them to fp16 at load, per Apple's "
                        "documentation)")
    g.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="position on the menu: 0 = smallest plan, 1 = most precise")
    g.add_argument("--bits", type=float, default=None, help="average stored bits per weight of the linear layers")
    g.add_argument("--weights-budget", dest="weights_budget", default=None, metavar="SIZE",
                   help="bytes of all stored weights, e.g. 80MB")
    c = p.add_argument_group("calibration and sensitivity")
    c.add_argument("--calib", nargs="+", default=None, metavar="FILE",
                   help="calibration text files (default: sampled from the model, data-free)")
    c.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"calibration samples (default {DEFAULT_SAMPLES})")
    c.add_argument("--seq-len", dest="seq_len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"tokens per calibration sample (default {DEFAULT_SEQ_LEN})")
    c.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    c.add_argument("--menu", nargs="+", default=list(DEFAULT_MENU), metavar="D/d",
                   help="LiftQuant rates the plan chooses from (fp16 is always an option)")
    c.add_argument("--device", default="cpu",
                   help="torch device that measures sensitivity (and, in build, quantizes): cpu (default) or cuda")
    c.add_argument("--sensitivity", default="measure", metavar="measure|prior|FILE",
                   help="how layers are ranked: measure them on calibration text (default), a prior from "
                        "shapes alone (no weights needed: plan a model you only have the config.json of, or a "
                        "shape name such as llama-3.1-8b), or a table JSON written earlier")


def budget_request(args: argparse.Namespace):
    from liftedge.device import load_device
    from liftedge.planner import BudgetRequest
    from liftedge.sizes import parse_size

    device = None
    explicit = any(v is not None for v in (args.lam, args.bits, args.weights_budget))
    if args.target is not None:
        device = load_device(args.target, args.ram, require_ram=not explicit)
    elif args.ram is not None or args.context is not None:
        raise LiftedgeError("--ram and --context need a device: add --target android (or ios, or a phone name)")
    weights_budget = None if args.weights_budget is None else parse_size(args.weights_budget)
    return BudgetRequest(device=device, context=args.context, runtime=args.runtime, kv_bits=args.kv_bits,
                         increased_memory_limit=args.increased_memory_limit,
                         compute_units=getattr(args, "compute_units", None), lam=args.lam, bits=args.bits,
                         weights_budget=weights_budget)


def calibration_and_sensitivity(loaded, args: argparse.Namespace):
    """(calibration tokens, the manifest's calibration record, the sensitivity table)."""
    from pathlib import Path

    from liftedge.commands.quantize import calibration
    from liftedge.measure import measure_sensitivity
    from liftedge.quantize.save import torch_device

    if args.calib:
        args.calib = [Path(p) for p in args.calib]
    if args.sensitivity == "measure" and torch_device(args.device).type != "cpu":
        # Measured there, so moved there first: data-free calibration then samples on it too
        # (64 x 512 tokens from an 8B model are hours on CPU, a minute on a GPU).
        loaded.model.to(torch_device(args.device))
    tokens, calib = calibration(loaded, args)
    if args.sensitivity != "measure":
        return tokens, calib, unmeasured_sensitivity(loaded.model, args)
    print(f"measuring sensitivity of every site ({len(args.menu)} rates + fp16; cached after the first run)", file=sys.stderr)
    return tokens, calib, measure_sensitivity(loaded, tokens, menu=args.menu, seed=args.seed)


def unmeasured_sensitivity(model, args: argparse.Namespace):
    """The table of `--sensitivity prior` (from shapes; `model` may be on the meta device) or FILE."""
    from pathlib import Path

    from liftedge.measure import Sensitivity, planned_sites, prior_sensitivity

    if args.sensitivity == "prior":
        return prior_sensitivity(model, menu=args.menu)
    path = Path(args.sensitivity)
    if not path.is_file():
        raise LiftedgeError(f"--sensitivity takes measure, prior or a table JSON file; {path} is none of these")
    try:
        sens = Sensitivity.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError) as exc:
        raise LiftedgeError(f"{path} is not a sensitivity table ({type(exc).__name__}: {exc})") from None
    missing = sorted({s.name for s in planned_sites(model)} - set(sens.table))
    if missing:
        raise LiftedgeError(f"{path} is the table of another model: it lacks {', '.join(missing[:3])}")
    return sens
