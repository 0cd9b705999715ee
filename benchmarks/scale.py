"""What fits where: phone-sized model shapes x devices, planned by liftedge from shapes alone.

    .venv/bin/python benchmarks/scale.py fits      -> benchmarks/results/scale_fits.{json,md}

For each public shape (liftedge.shapes: Llama-3.2-1B/3B, Qwen3-4B, Llama-3.1-8B; no weights
needed, every byte depends only on shapes) and device profile, `liftedge plan`'s planner with
the prior sensitivity gives the planned bits per weight and weight bytes, or the RAM the model
needs. Beside it, the same device budget against 4-bit integer weights (round-to-nearest, groups of
128 with an fp16 scale and a zero point, as MatMulNBits stores them) for every linear layer and table:
where 4-bit does not fit but LiftQuant does, sub-4-bit is the only way onto the phone.
Quality at these sizes cannot be measured without the real weights (see the README).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from liftedge.device import load_device
from liftedge.errors import BudgetError
from liftedge.measure import int_nbytes, planned_sites, prior_sensitivity
from liftedge.memory import ModelDims
from liftedge.planner import BudgetRequest, make_plan
from liftedge.quantize.rtn import IntConfig
from liftedge.shapes import meta_model, shape_config
from liftedge.sizes import format_size

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ("llama-3.2-1b", "llama-3.2-3b", "qwen3-4b", "llama-3.1-8b")
# (profile, RAM): generic Android phones of each common RAM size and the iPhones of each size.
DEVICES = (("android", "4GB"), ("android", "6GB"), ("android", "8GB"),
           ("iphone-13", None), ("iphone-15", None), ("iphone-15-pro", None))
INT4 = IntConfig(bits=4, group_size=128)


def fits() -> list[dict]:
    rows = []
    for shape in SHAPES:
        config = shape_config(shape)
        model = meta_model(config)
        dims = ModelDims.from_config(config)
        sens = prior_sensitivity(model)
        sites = planned_sites(model)
        int4_nbytes = sum(int_nbytes(s, INT4) for s in sites) + sens.fixed_nbytes
        params = sum(p.numel() for p in model.parameters())
        for name, ram in DEVICES:
            device = load_device(name, ram)
            row = {"shape": shape, "parameters": params, "device": name, "ram_nbytes": device.ram_nbytes,
                   "int4_g128_nbytes": int4_nbytes}
            try:
                result = make_plan(sens, dims, BudgetRequest(device=device))
                mem = result.memory
                budget = mem.weight_budget_nbytes + sens.fixed_nbytes
                row.update(fits=True, bits_per_weight=round(result.plan.bits_per_weight, 3),
                           weights_nbytes=result.plan.total_nbytes + sens.fixed_nbytes, runtime=mem.runtime,
                           context=mem.context, weight_budget_nbytes=budget, int4_fits=int4_nbytes <= budget)
            except BudgetError as exc:
                row.update(fits=False, min_ram_nbytes=exc.min_ram_nbytes, int4_fits=False)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    devices = [f"{n} {r or ''}".strip() for n, r in DEVICES]
    lines = ["# What fits where (planned from shapes; `benchmarks/scale.py fits`)", "",
             "Each cell: LiftQuant plan for the device's budget (bits/weight over the linear layers, all stored "
             "weights), or the RAM the model needs; then whether 4-bit integer weights (g128, every linear layer and "
             "table) fit the same budget. Context 2048 (the profiles' default), KV cache fp16.", "",
             "| model | " + " | ".join(devices) + " |", "|---|" + "---|" * len(devices)]
    for shape in SHAPES:
        cells = []
        for r in (r for r in rows if r["shape"] == shape):
            if r["fits"]:
                lq = f"**{r['bits_per_weight']:.2f} b/w, {format_size(r['weights_nbytes'])}**"
            else:
                lq = f"needs {format_size(r['min_ram_nbytes'])} RAM"
            cells.append(f"{lq}; 4-bit: {'fits' if r['int4_fits'] else 'no'}")
        params = next(r["parameters"] for r in rows if r["shape"] == shape)
        lines.append(f"| {shape} ({params / 1e9:.2f}B) | " + " | ".join(cells) + " |")
    lines += ["", "4-bit weights of each shape: " + ", ".join(
        f"{s} {format_size(next(r['int4_g128_nbytes'] for r in rows if r['shape'] == s))}" for s in SHAPES) + ".",
        "", "Quality at these sizes cannot be measured here (no real weights on these machines); the paper's "
        "Llama-2-7B table is the expectation for LiftQuant at 2-3 bits."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("fits",))
    ap.parse_args()
    t0 = time.perf_counter()
    rows = fits()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale_fits.json").write_text(json.dumps({"rows": rows, "seconds": round(time.perf_counter() - t0, 1),
                                                         "sensitivity": "prior (liftedge.measure.prior_sensitivity)"},
                                                        indent=1) + "\n")
    md = markdown(rows)
    (RESULTS / "scale_fits.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
