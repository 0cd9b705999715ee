"""`liftedge build MODEL --target android --ram 4GB -o OUT`: plan, quantize, lower, verify.

Argument handling and printing only; the pipeline is `liftedge.build` (plan and pack) and
`liftedge.lowering` (artifact, verification, report). The runtime is the device profile's
default (android -> ExecuTorch, ios -> Core ML) unless --runtime names another.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from liftedge.commands.budget_args import add_budget_arguments, budget_request, calibration_and_sensitivity
from liftedge.commands.lq import add_training_arguments, correction_from_args, finetune_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="plan + quantize + lower a model for a device: .pte, .onnx/.ort or .mlpackage, verified",
        description="Choose per-layer LiftQuant rates for the budget (see `liftedge plan`), quantize with "
                    "intra-block correction (the pack is cached), lower it for the runtime, run the artifact "
                    "against the PyTorch reference and write it with report.json. MODEL may also be an "
                    "existing pack folder (written by `liftedge quantize`).")
    p.add_argument("model", metavar="MODEL", help="a Hugging Face folder, a .gguf file, 'default', or a pack folder")
    add_budget_arguments(p)
    q = p.add_argument_group("quantization")
    add_training_arguments(q)
    t = p.add_argument_group("artifact")
    t.add_argument("--max-context", dest="max_context", type=int, default=None,
                   help="KV cache length baked into the artifact where the runtime needs one (ExecuTorch, Core ML; "
                        "default: --context, else the profile's, else 512)")
    t.add_argument("--no-custom-ops", dest="custom_ops", action="store_false",
                   help="executorch: express lift-project layers in stock operators (no kernel library needed)")
    t.add_argument("--no-fuse-blocks", dest="fuse_blocks", action="store_false",
                   help="executorch: keep each decoder block's RMSNorms and gated-MLP activation as graph operators "
                        "instead of inside the lift-project ops (liftedge::lq_rms_linear, liftedge::lq_glu)")
    t.add_argument("--no-llm-attention", dest="llm_attention", action="store_false",
                   help="executorch: attention in stock operators instead of ExecuTorch's LLM ops "
                        "(llama::update_cache, llama::custom_sdpa), for a runtime built without them; slower")
    p.add_argument("-o", "--output", required=True, type=Path, help="artifact folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from liftedge.commands import claimed_output

    with claimed_output(args):  # checked and locked before the long work, held to the end
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from liftedge.build import check_pack_fits, planned_pack
    from liftedge.packed import is_pack
    from liftedge.lowering import build_artifact
    from liftedge.memory import COREML_COMPUTE_UNITS, ModelDims
    from liftedge.model import load_model
    from liftedge.planner import make_plan
    from liftedge.sizes import format_size

    request = budget_request(args)
    from liftedge.commands import check_calibration_arguments

    check_calibration_arguments(args)  # every option checked before a model or pack is read
    runtime = args.runtime or (request.device.default_runtime if request.device else "executorch")
    if request.compute_units is not None and runtime != "coreml":
        from liftedge.errors import LiftedgeError

        raise LiftedgeError(f"--compute-units applies to Core ML builds only (this build is for {runtime})")
    request = dataclasses.replace(request, runtime=runtime)  # the plan takes only options this runtime lowers
    extra = {}
    if is_pack(args.model):
        pack = Path(args.model)
        extra["memory"] = check_pack_fits(pack, request) if request.device else None
    else:
        correction, finetune = correction_from_args(args), finetune_from_args(args)
        loaded = load_model(args.model, mapped=True)
        tokens, calib, sens = calibration_and_sensitivity(loaded, args)
        result = make_plan(sens, ModelDims.from_config(loaded.config), request)
        plan = result.plan
        print(f"plan: λ = {plan.lam:.3f}, {plan.bits_per_weight:.3f} bits/weight, {format_size(plan.total_nbytes)} "
              f"of weights ({plan.total_nbytes / plan.budget_nbytes:.1%} of the budget)")
        pack = planned_pack(loaded, tokens, calib, result, correction, device=args.device, seed=args.seed,
                            finetune=finetune)
        extra["memory"] = None if result.memory is None else result.memory.to_dict()
        del loaded
    context = args.max_context or args.context or (request.device.default_context if request.device else 512)
    from liftedge.lowering import get_target

    if runtime == "coreml" and extra["memory"] is not None:
        from liftedge.targets.coreml.residency import require_resident_fit

        require_resident_fit(pack, request.compute_units, extra["memory"])
    wanted = {"max_context": int(context), "custom_ops": bool(args.custom_ops),
              "llm_attention": bool(args.llm_attention), "fuse_blocks": bool(args.fuse_blocks),
              "compute_units": request.compute_units or COREML_COMPUTE_UNITS[0]}
    options = {k: v for k, v in wanted.items() if k in get_target(runtime).OPTIONS}
    print(f"lowering for {runtime} (context {context}) and verifying against the reference ...")
    report = build_artifact(pack, runtime, args.output, options=options, force=args.force, extra_report=extra)
    records = verification_records(report["verification"])
    total = sum(report["files"].values())
    worst = max(max(r["prompt_logits_rel_error"], r["decode_logits_max_rel_error"]) for r in records)
    print(f"wrote {args.output} ({format_size(total)}): {len(records)} artifact file(s) verified, logits rel. error "
          f"<= {worst:.2e}, {min(r['new_tokens'] for r in records)} greedy tokens equal to the reference; "
          f"report {args.output / 'report.json'}")
    return 0


def verification_records(verification: dict) -> list[dict]:
    """The `liftedge.verify.compare` records of a report (one, or one per artifact file)."""
    if "passed" in verification:
        return [verification]
    return [v for v in verification.values() if isinstance(v, dict) and "passed" in v]
