"""Pareto plot: perplexity vs stored bits per weight for every method in a merged quality table.

    python benchmarks/pareto.py benchmarks/results/smollm2_quality.json --out benchmarks/results/smollm2_pareto

Series: LiftQuant at one rate everywhere (full method, 4 correction epochs), LiftQuant with
planned per-layer rates (`plan:` rows), RTN and GPTQ at groups of 128 and 32, and the peer
rows (hqq:, ort:, palettize: configs of benchmarks/peers.py, one series per row's "series").
Ablation rows (switches off, other epoch counts) are left out of the plot but stay in the table. Writes <out>.png and <out>.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ABLATION_KEYS = ("mix=", "act_scale=", "block_scale=", "correct=", "codebook=", "epochs=")
# Rows measured with other than the default settings (learning-rate schedule and rates,
# calibration size) are in the table but not on the plot's default-settings curves.
NON_DEFAULT_KEYS = ("sched=constant", "lr_t=", "lr_s=", "samples=")


def series_of(row: dict) -> str | None:
    cfg, method = row["config"], row["method"]
    if method == "fp" or any(k in cfg for k in NON_DEFAULT_KEYS):
        return None
    if method == "plan":
        return "LiftQuant, planned mixed rates" if row["options"].get("epochs", "4") == "4" else None
    if method == "liftquant":
        return None if any(k in cfg for k in ABLATION_KEYS) else "LiftQuant, one rate"
    if method in ("rtn", "gptq"):
        group = row["options"].get("group", "128")
        return f"{method.upper()} g{group}"
    return row.get("series") or method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    rows = json.loads(args.table.read_text())["rows"]
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        name = series_of(r)
        if name is not None and r.get("ppl") is not None:
            series.setdefault(name, []).append((r["bits_per_weight"], r["ppl"]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>pX*h"
    for k, (name, pts) in enumerate(sorted(series.items())):
        pts.sort()
        ours = name.startswith("LiftQuant")
        ax.plot([b for b, _ in pts], [q for _, q in pts], marker=markers[k % len(markers)],
                color=colors[(2 * k) % 20 if k < 10 else (2 * k + 1) % 20], linewidth=2.5 if ours else 1,
                markersize=6 if ours else 4, label=name, zorder=3 if ours else 2)
    if fp is not None:
        ax.axhline(fp, color="gray", linestyle="--", label=f"float ({fp:.2f})")
    ax.set_yscale("log")
    ax.set_ylim(top=max(200, (fp or 20) * 5), bottom=(fp or 10) * 0.9)
    ax.set_xlabel("stored bits per weight of the linear layers (every byte counted)")
    ax.set_ylabel("WikiText-2 perplexity (16 x 2048)")
    ax.set_title("SmolLM2-135M: quality vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"))
    lines = ["| series | bits/weight | ppl |", "|---|---|---|"]
    for name, pts in sorted(series.items()):
        lines += [f"| {name} | {b:.3f} | {q:,.2f} |" for b, q in pts]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.png')} and .md")


if __name__ == "__main__":
    main()
