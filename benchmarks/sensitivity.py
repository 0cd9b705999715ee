"""Sensitivity table of a model, and a check of its ranking against measured KL.

    python benchmarks/sensitivity.py --model default \
        --calib ../shared/data/wikitext-2/valid.tokens.txt --samples 128 --seq-len 512 \
        --out benchmarks/results/smollm2_sensitivity.json [--validate 12 --eval-text ...]

Writes the table (`liftedge.measure.Sensitivity` JSON) and, with --validate N, quantizes N
sites one at a time (spread over blocks and kinds) at the cheapest menu rate (or --validate-option), measures the
KL divergence to the float model on held-out evaluation text, and reports the Spearman rank
correlation between predicted loss increase and measured KL (`<out>.validation.json`).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from liftedge.calibrate import collect_stats
from liftedge.measure import (DEFAULT_MENU, DEFAULT_ROWS, Sensitivity, measure_sensitivity, option_rate, output_fisher,
                              planned_sites, site_errors, spearman)
from liftedge.plan import Option
from liftedge.model import list_sites, load_model, site_weight
from liftedge.packed import install_reference_modules
from liftedge.quantize.liftquant import LiftQuantConfig, LiftQuantQuantizer
from liftedge.text import bos_id, calibration_tokens, protocol_text, read_text, tokenize, with_bos


def _kl(ref_logits, logits) -> float:
    ref, got = torch.log_softmax(ref_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def chosen_sites(names: list[str], n_sites: int) -> list[str]:
    step = max(1, len(names) // n_sites)
    return names[::step][:n_sites]


def predict_sites(loaded, tokens, n_sites: int, option: str, seed: int) -> Sensitivity:
    """A table holding only the validated sites and option (same estimator as the full table)."""
    sites = planned_sites(loaded.model, tables=False)  # this benchmark validates the LiftQuant linear sites
    names = set(chosen_sites([s.name for s in sites], n_sites))
    picked = [s for s in sites if s.name in names]
    stats = collect_stats(loaded, tokens, sites)
    fisher = output_fisher(loaded.model, tokens[:8], picked)
    rate = option_rate(option)
    table = {}
    for s in picked:
        err = site_errors(site_weight(loaded.model, s), stats[s.name], fisher[s.name], (rate,), DEFAULT_ROWS, seed)
        table[s.name] = [Option(option, 0, err[option])]
    return Sensitivity(table=table, numel={}, fixed_nbytes=0)


def validate(loaded, tokens, sens, eval_ids: torch.Tensor, n_sites: int, option: str | None = None, ctx: int = 512,
             windows: int = 4) -> dict:
    linear = {s.name for s in planned_sites(loaded.model, tables=False)}
    chosen = chosen_sites([n for n in sens.table if n in linear], n_sites)  # linear sites: LiftQuant-coded below
    stats = collect_stats(loaded, tokens)
    sites = {s.name: s for s in list_sites(loaded.model)}
    bos = bos_id(loaded.tokenizer)  # windows as `liftedge.evaluate` cuts them: BOS + ctx-1 text tokens where expected
    width = ctx - (bos is not None)
    batch = torch.stack([torch.tensor(with_bos(eval_ids[w * width:(w + 1) * width].tolist(), loaded.tokenizer))
                         for w in range(windows)])
    with torch.no_grad():
        ref = loaded.model(batch).logits
    rows = []
    for name in chosen:
        cheapest = (min(sens.table[name], key=lambda o: o.nbytes) if option is None
                    else next(o for o in sens.table[name] if o.name == option))
        qt = LiftQuantQuantizer(LiftQuantConfig(option_rate(cheapest.name))).quantize(
            site_weight(loaded.model, sites[name]).float(), stats[name])
        model = copy.deepcopy(loaded.model)
        install_reference_modules(model, {name: qt})
        with torch.no_grad():
            kl = _kl(ref, model(batch).logits)
        rows.append({"site": name, "option": cheapest.name, "predicted": cheapest.error, "measured_kl": kl})
        print(f"{name:<44} {cheapest.name:<9} predicted {cheapest.error:.3e}  measured KL {kl:.3e}", flush=True)
    rho = spearman([r["predicted"] for r in rows], [r["measured_kl"] for r in rows])
    return {"sites": rows, "spearman": rho, "eval_tokens": int(batch.numel()), "option": option or "cheapest"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--calib", required=True)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--menu", nargs="+", default=list(DEFAULT_MENU))
    p.add_argument("--validate", type=int, default=0, help="sites to check against measured KL")
    p.add_argument("--validate-option", default=None, help="option to validate at, e.g. lq-16-8 (default: cheapest)")
    p.add_argument("--eval-text", default=None)
    p.add_argument("--validate-only", action="store_true",
                   help="predict only the validated sites (skip the full table: minutes instead of an hour on CPU)")
    p.add_argument("--device", default="cpu", help="where the table is measured (cuda on a GPU machine)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    loaded = load_model(args.model)
    loaded.model.to(args.device)
    tokens = calibration_tokens(loaded.tokenizer, [Path(args.calib)], args.samples, args.seq_len,
                                args.seed).to(args.device)
    started = time.perf_counter()
    if args.validate_only:
        sens = predict_sites(loaded, tokens, args.validate, args.validate_option, args.seed)
    else:
        sens = measure_sensitivity(loaded, tokens, menu=args.menu, seed=args.seed)
        sens.meta["seconds"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(sens.to_json())
        print(f"wrote {args.out} ({sens.meta['seconds']} s)")
    if args.validate:
        eval_ids = tokenize(loaded.tokenizer, protocol_text(read_text(args.eval_text)))
        result = validate(loaded, tokens, sens, eval_ids, args.validate, args.validate_option)
        out = args.out.with_suffix(f".validation-{result['option']}.json")
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"spearman {result['spearman']:.3f} over {len(result['sites'])} sites -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
