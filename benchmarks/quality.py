"""Quality benchmark: perplexity / KL / bytes / time / memory for quantization configs.

Each config is quantized with the library API, written as a pack, loaded back from the
pack (so the numbers are those of what a user gets) and evaluated with the standard
WikiText-2 protocol on a fixed prefix of windows, KL measured against the float model.

    python benchmarks/quality.py --model default --windows 16 \
        --calib ../shared/data/wikitext-2/valid.tokens.txt \
        --eval-text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --config fp --config gptq:bits=4:group=128 --config liftquant:rate=24/10 \
        --out benchmarks/results/quality.json

Config syntax: METHOD[:key=value...]. Methods: fp, rtn, gptq (bits, group, act_order),
liftquant (rate, correct=0|1, epochs, lr_t, lr_s, sched=constant|cosine, mix, act_scale, block_scale, codebook=trained|uniform,
ft=N end-to-end fine-tuning epochs after the blocks (liftedge.finetune), ft_lr_t, ft_lr_s),
plan (bits = average bits/weight of a planned mixed-rate model, table=FILE a sensitivity table
from benchmarks/sensitivity.py, else measured; correct, epochs, ft, ft_lr_t, ft_lr_s). `--isolate` runs every
config in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from liftedge.correct import CorrectionConfig
from liftedge.evaluate import evaluate
from liftedge.finetune import FinetuneConfig, finetune, teacher_topk
from liftedge.model import load_model
from liftedge.packed import load_packed, save_packed
from liftedge.quantize import GPTQConfig, IntConfig, default_sites, quantize_model
from liftedge.quantize.liftquant import LiftQuantConfig
from liftedge.quantize.pipeline import quantize_streaming
from liftedge.text import bos_id, calibration_tokens, protocol_text, read_text, tokenize
from liftedge.types import Rate

PEER_METHODS = ("hqq", "ort", "palettize")  # benchmarks/peers.py
_BOOL = {"0": False, "1": True, "false": False, "true": True}


def parse_config(spec: str) -> tuple[str, dict[str, str]]:
    method, *pairs = spec.split(":")
    return method, dict(p.split("=", 1) for p in pairs)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _int_config(method: str, opts: dict[str, str]):
    common = dict(bits=int(opts.get("bits", 4)), group_size=int(opts.get("group", 128)))
    if method == "gptq":
        return GPTQConfig(**common, act_order=_BOOL[opts.get("act_order", "1")])
    return IntConfig(**common)


def _correction(opts: dict[str, str]) -> CorrectionConfig | None:
    if not _BOOL[opts.get("correct", "1")]:
        return None
    return CorrectionConfig(epochs=int(opts.get("epochs", CorrectionConfig.epochs)),
                            lr_transform=float(opts.get("lr_t", CorrectionConfig.lr_transform)),
                            lr_signs=float(opts.get("lr_s", CorrectionConfig.lr_signs)),
                            schedule=opts.get("sched", CorrectionConfig.schedule))


def _finetune_config(opts: dict[str, str]) -> FinetuneConfig | None:
    epochs = int(opts.get("ft", 0))
    if epochs == 0:
        return None
    return FinetuneConfig(epochs=epochs, lr_transform=float(opts.get("ft_lr_t", FinetuneConfig.lr_transform)),
                          lr_scale=float(opts.get("ft_lr_s", FinetuneConfig.lr_scale)))


def _plan_configs(loaded, tokens, opts: dict[str, str]) -> tuple[dict, dict]:
    """Per-site configs of a planned mixed-rate model at `bits` (table from `table=FILE` or measured)."""
    from liftedge.measure import Sensitivity, measure_sensitivity
    from liftedge.memory import ModelDims
    from liftedge.planner import BudgetRequest, make_plan, plan_configs

    if "table" in opts:
        sens = Sensitivity.from_json(Path(opts["table"]).read_text())
    else:
        sens = measure_sensitivity(loaded, tokens)
    result = make_plan(sens, ModelDims.from_config(loaded.config), BudgetRequest(bits=float(opts["bits"])))
    return plan_configs(result.plan), result.to_dict()


def _lq_configs(loaded, opts: dict[str, str]) -> tuple[dict, CorrectionConfig | None]:
    cfg = LiftQuantConfig(Rate.parse(opts.get("rate", "24/10")), mix=_BOOL[opts.get("mix", "1")],
                          act_scale=_BOOL[opts.get("act_scale", "1")],
                          block_scale=_BOOL[opts.get("block_scale", "1")], codebook=opts.get("codebook", "trained"))
    return {s.name: cfg for s in default_sites(loaded.model)}, _correction(opts)


@dataclass
class Shared:
    """What every config reuses: the float model (also the KL reference) and the token ids."""

    base: Any
    calib: torch.Tensor
    eval_ids: torch.Tensor


def load_shared(args) -> Shared:
    base = load_model(args.model)
    calib = calibration_tokens(base.tokenizer, [Path(args.calib)], args.samples, args.seq_len, args.seed)
    eval_ids = tokenize(base.tokenizer, protocol_text(read_text(args.eval_text)))
    return Shared(base, calib, eval_ids)


def quantize_to_pack(args, shared: Shared, method: str, opts: dict[str, str], out: Path) -> dict:
    loaded = shared.base
    calibration = {"source": "files", "files": [args.calib], "n_samples": args.samples,
                   "seq_len": args.seq_len, "seed": args.seed}
    loaded.model.to(args.device)
    tokens = shared.calib.to(args.device)
    plan = None
    if method in ("liftquant", "plan"):
        import copy

        loaded = copy.copy(loaded)
        loaded.model = copy.deepcopy(shared.base.model)  # streaming overwrites weights in place
        if method == "plan":
            (configs, plan), correction = _plan_configs(loaded, tokens, opts), _correction(opts)
        else:
            configs, correction = _lq_configs(loaded, opts)
        ft = _finetune_config(opts)
        teacher = teacher_topk(loaded.model, tokens) if ft else None
        qtensors, report = quantize_streaming(loaded, tokens, configs, correction, batch_size=args.batch_size)
        quantizer = {"method": "liftquant", "options": opts, "blocks": report.blocks}
        if ft:
            qtensors, quantizer["finetune"] = finetune(loaded.model, qtensors, tokens, teacher, ft)
    else:
        from liftedge.calibrate import collect_stats

        config = _int_config(method, opts)
        stats = None
        if method == "gptq":
            stats = collect_stats(loaded, tokens, default_sites(loaded.model), batch_size=args.batch_size)
        qtensors = quantize_model(loaded, method, config, stats)
        quantizer = {"method": method, "options": opts}
    loaded.model.to("cpu")
    return save_packed(out, loaded, qtensors, method="liftquant" if method == "plan" else method,
                       quantizer=quantizer, calibration=calibration, plan=plan, force=True)


def _peer_model(args, shared: Shared, method: str, opts: dict[str, str], row: dict):
    """A copy of the float model with a peer quantizer's dequantized decoder linears; fills `row`."""
    import copy

    import peers

    model = copy.deepcopy(shared.base.model).to(args.device)
    qtensors = peers.peer_qtensors(model, method, opts)
    peers.apply_peer(model, qtensors)
    row.update(peers.peer_totals(model, qtensors), series=peers.series_name(method, opts), note=peers.NOTE,
               fields=_sum_fields(qtensors))
    return model, qtensors


def _sum_fields(qtensors) -> dict[str, int]:
    out: dict[str, int] = {}
    for pt in qtensors.values():
        for k, v in pt.fields.items():
            out[k] = out.get(k, 0) + v
    return out


def run_one(args, shared: Shared, spec: str) -> dict:
    method, opts = parse_config(spec)
    row: dict = {"config": spec, "method": method, "options": opts}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = None
    if method in PEER_METHODS:
        model, _ = _peer_model(args, shared, method, opts, row)
        row["quant_seconds"] = round(time.perf_counter() - started, 1)
        row["quant_peak_rss_mib"] = round(_peak_rss_mib(), 1)
    elif method == "fp":
        n = sum(p.numel() for p in shared.base.model.parameters())
        row.update(bits_per_weight=16.0, nbytes=2 * n, note="fp16 storage of the float model")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = quantize_to_pack(args, shared, method, opts, Path(tmp) / "pack")
            row["quant_seconds"] = round(time.perf_counter() - started, 1)
            row["quant_peak_rss_mib"] = round(_peak_rss_mib(), 1)
            model = load_packed(Path(tmp) / "pack").model.to(args.device)
        totals = manifest["totals"]
        row.update(bits_per_weight=totals["bits_per_weight"], nbytes=totals["nbytes"],
                   linear_nbytes=totals.get("quantized_nbytes"))
        if method in ("liftquant", "plan"):
            row["blocks"] = manifest["quantizer"].get("blocks")
        if method == "plan":
            counts: dict[str, int] = {}
            for c in manifest["plan"]["plan"]["choices"]:
                counts[c["option"]] = counts.get(c["option"], 0) + 1
            row["plan_options"] = counts
    reference = shared.base.model.to(args.device)
    result = evaluate(model or reference, shared.eval_ids, ctx=args.ctx, windows=args.windows,
                      reference=None if model is None else reference, bos=bos_id(shared.base.tokenizer))
    row.update(ppl=result.ppl, kl=result.kl, tokens_scored=result.tokens_scored, windows=result.windows,
               ctx=result.ctx, total_seconds=round(time.perf_counter() - started, 1),
               peak_rss_mib=round(_peak_rss_mib(), 1))
    if torch.cuda.is_available():
        row["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    del model
    return row


def _machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--calib", required=True)
    p.add_argument("--eval-text", required=True)
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--isolate", action="store_true", help="one process per config (own peak RSS)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows = []
    shared = None if args.isolate else load_shared(args)
    for spec in args.config:
        if args.isolate:
            rows.append(_run_isolated(args, spec))
        else:
            rows.append(run_one(args, shared, spec))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "blocks"}), flush=True)
        _write(args, rows)
    return 0


def _run_isolated(args, spec: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        argv = [sys.executable, __file__, "--model", args.model, "--calib", args.calib, "--eval-text",
                args.eval_text, "--config", spec, "--windows", str(args.windows), "--ctx", str(args.ctx),
                "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed),
                "--batch-size", str(args.batch_size), "--device", args.device, "--out", str(out)]
        subprocess.run(argv, check=True)
        return json.loads(out.read_text())["rows"][0]


def _write(args, rows) -> None:
    from liftedge.io import atomic_write_json

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "config"}
    atomic_write_json(args.out, {"machine": _machine(), "settings": settings, "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
