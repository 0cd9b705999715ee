"""`liftedge plan MODEL --target android --ram 4GB`: show the budget arithmetic and the per-site plan.

Printing only: the budget is `liftedge.memory`, the table `liftedge.measure`, the choice
`liftedge.planner`. `--json` prints the plan, the memory split and the request as JSON;
`-o FILE` also writes that JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from liftedge.commands.budget_args import (add_budget_arguments, budget_request, calibration_and_sensitivity,
                                          unmeasured_sensitivity)
from liftedge.shapes import is_shape


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="choose a LiftQuant rate per layer so the model fits a device (or a budget)",
        description="Measure each layer's sensitivity (cached) and choose the rate of every linear layer of "
                    "the decoder blocks that minimises the predicted loss increase within the byte budget: "
                    "a device's RAM minus runtime, KV cache and activations, or --lambda, --bits, --weights-budget.")
    p.add_argument("model", metavar="MODEL", help="a Hugging Face folder, a .gguf file, 'default', or a shape name "
                                                  "(llama-3.2-1b, llama-3.2-3b, qwen3-4b, llama-3.1-8b: config only)")
    add_budget_arguments(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("-o", "--output", type=Path, default=None, help="also write the plan JSON to this file")
    p.add_argument("--force", action="store_true", help="replace an existing plan file written by liftedge")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from liftedge.io import atomic_write_json
    from liftedge.memory import ModelDims
    from liftedge.model import load_model
    from liftedge.planner import make_plan

    request = budget_request(args)  # bad device / RAM / budget fails before the model loads
    if args.output is not None:
        check_plan_output(args)
    from liftedge.commands import check_calibration_arguments

    check_calibration_arguments(args)
    if is_shape(args.model) and args.sensitivity == "measure":
        print(f"{args.model} is a shape without weights: layers ranked by the prior (--sensitivity prior)",
              file=sys.stderr)
        args.sensitivity = "prior"
    if args.sensitivity != "measure":
        config, model = config_only_model(args.model)  # nothing but shapes: no weights are read
        result = make_plan(unmeasured_sensitivity(model, args), ModelDims.from_config(config), request)
    else:
        loaded = load_model(args.model, mapped=True)
        _, _, sens = calibration_and_sensitivity(loaded, args)
        result = make_plan(sens, ModelDims.from_config(loaded.config), request)
    data = result.to_dict()
    if args.output is not None:
        atomic_write_json(args.output, data)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print_plan(result)
    return 0


def config_only_model(spec: str):
    """(config, model on the meta device) of a shape name or a folder's config.json; no weights read."""
    from liftedge.errors import LiftedgeError
    from liftedge.model import FAMILIES
    from liftedge.shapes import is_shape, meta_model, shape_config

    if is_shape(spec):
        config = shape_config(spec)
    else:
        from transformers import AutoConfig

        folder = Path(spec)
        if not (folder / "config.json").is_file():
            raise LiftedgeError(f"--sensitivity prior plans from a config.json: {spec} is neither a folder holding "
                                "one nor a known shape name (llama-3.2-1b, llama-3.2-3b, qwen3-4b, llama-3.1-8b)")
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    if config.model_type not in FAMILIES:
        raise LiftedgeError(f"model_type {config.model_type!r} is not supported")
    return config, meta_model(config)


def check_plan_output(args: argparse.Namespace) -> None:
    """`-o FILE` may be new, or (with --force) a plan file liftedge wrote; nothing else."""
    from liftedge.commands import command_inputs
    from liftedge.errors import ArtifactError
    from liftedge.io import check_not_an_input, read_json_object

    out = args.output
    check_not_an_input(out, command_inputs(args))
    if out.is_dir():
        raise ArtifactError(f"-o {out} is a folder; give the plan file's name (e.g. {out / 'plan.json'})")
    if not out.exists():
        return
    if not args.force:
        raise ArtifactError(f"{out} already exists; pass --force to replace it")
    try:
        data = read_json_object(out, ArtifactError, f"{out} is not a file")
    except ArtifactError:
        data = {}
    if not {"plan", "memory", "request"} <= set(data):
        raise ArtifactError(f"{out} is not a plan liftedge wrote; --force replaces only those")


def print_plan(result) -> None:
    from liftedge.measure import option_code_bits
    from liftedge.sizes import format_size

    plan, mem = result.plan, result.memory
    if mem is not None:
        print(f"budget for {result.request.device.display_name}, runtime {mem.runtime}:")
        for label, nbytes, estimate in mem.terms():
            print(f"  {label:<44} {'-' if nbytes < 0 else ' '}{format_size(abs(nbytes)):>11}"
                  f"{'  (estimate)' if estimate and 'RAM' not in label and 'weight' not in label else ''}")
        print("  (the weight budget covers the planned sites: the linear layers, the token embedding and an "
              "untied head; the unquantized tables are norms, biases and position tables at fp16)")
    print(f"plan: λ = {plan.lam:.3f}, {plan.bits_per_weight:.3f} bits/weight over {len(plan.choices)} sites, "
          f"{format_size(plan.total_nbytes)} of weights in all ({format_size(plan.sites_nbytes)} in the planned sites), "
          f"budget {format_size(plan.budget_nbytes)} ({plan.total_nbytes / plan.budget_nbytes:.1%} used)")
    print(f"predicted loss increase {plan.predicted_error:.4f} nats/token "
          f"(bound {plan.lower_bound_error:.4f}; solver {plan.method}{', optimal' if plan.exact else ''})")
    counts: dict[str, int] = {}
    for c in plan.choices:
        counts[c.option] = counts.get(c.option, 0) + 1
    print("rates: " + ", ".join(f"{o} x{n}" for o, n in sorted(counts.items())))
    print(f"{'SITE':<44} {'OPTION':<9} {'BITS':>6} {'BYTES':>10} {'PRED. ERROR':>12}")
    for c in plan.choices:
        print(f"{c.site:<44} {c.option:<9} {option_code_bits(c.option):>6.3f} {c.nbytes:>10} {c.error:>12.3e}")
