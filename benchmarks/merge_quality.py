"""Merge quality.json files (one per benchmark call) into one table: JSON + Markdown.

    python benchmarks/merge_quality.py RUN1.json RUN2.json ... --out benchmarks/results/smollm2_quality

Rows are keyed by config; a later file's row replaces an earlier one's. An input may itself
be a merged table (its runs and rows are carried over). Rows whose run
failed are absent. The Markdown groups rows as the issue tables do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from liftedge.io import atomic_write_bytes, atomic_write_json


def _fmt(x, digits=2):
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(merged: dict) -> str:
    rows = merged["rows"]
    lines = ["| config | bits/weight (linears, all bytes) | weights MB | ppl | KL | quantize s |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"] != "fp", r["bits_per_weight"])):
        lines.append(f"| {r['config']} | {r['bits_per_weight']:.3f} | {r['nbytes'] / 1e6:.2f} | {_fmt(r['ppl'])} | "
                     f"{_fmt(r['kl'], 3)} | {_fmt(r.get('quant_seconds'), 1)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = p.parse_args()
    by_config, runs = {}, []
    for path in args.inputs:
        data = json.loads(path.read_text())
        if "runs" in data:  # an earlier merged table: keep its runs and rows
            runs.extend(data["runs"])
            by_config.update({r["config"]: r for r in data["rows"]})
            continue
        runs.append({"machine": data["machine"], "settings": data["settings"],
                     "configs": [r["config"] for r in data["rows"]]})
        by_config.update({r["config"]: r for r in data["rows"]})
    merged = {"runs": runs, "rows": list(by_config.values())}
    atomic_write_json(args.out.with_suffix(".json"), merged)
    atomic_write_bytes(args.out.with_suffix(".md"), markdown(merged).encode())


if __name__ == "__main__":
    main()
