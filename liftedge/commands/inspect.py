"""`liftedge inspect`: show what a pack holds, site by site, from its manifest.

Printing only; the manifest is read (and checked) by `liftedge.packed.read_manifest`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

COLUMNS = ("site", "kind", "method", "fmt", "bits", "group", "shape", "bytes")


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="list a pack's quantized sites, formats and byte counts",
                              description="Print a per-site table (site, kind, method, format, bits, group, "
                                          "shape, bytes) and the totals of a liftedge pack.")
    p.add_argument("pack", metavar="PACK", type=Path, help="a pack folder written by `liftedge quantize`")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def natural_key(name: str) -> list:
    """Sort "layers.10" after "layers.9" (the manifest's JSON keys are sorted as text)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _bits_label(fmt: str, meta: dict[str, Any]) -> str:
    """"4" for integer codes, "24/10" for a LiftQuant rate D/d, "16" for fp16."""
    if "bits" in meta:
        return str(meta["bits"])
    if "D" in meta and "d" in meta:
        return f"{meta['D']}/{meta['d']}"
    return "16" if fmt == "fp16" else "?"


def site_rows(manifest: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for name in sorted(manifest["sites"], key=natural_key):
        e = manifest["sites"][name]
        meta = e.get("meta", {})
        bits = _bits_label(e["fmt"], meta)
        group = meta.get("group_size", "-")
        rows.append((name, e["kind"], e["method"], e["fmt"], str(bits), str(group),
                     "x".join(str(v) for v in e["shape"]), str(e["nbytes"])))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    right = {"bits", "group", "bytes"}
    def line(r):
        return "  ".join(str(v).rjust(w) if c in right else str(v).ljust(w) for v, w, c in zip(r, widths, COLUMNS))
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, rows)])


def run(args: argparse.Namespace) -> int:
    from liftedge.packed import read_manifest

    manifest = read_manifest(args.pack)
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return 0
    print(format_table(site_rows(manifest)))
    t, src, calib = manifest["totals"], manifest["source"], manifest.get("calibration") or {}
    print()
    print(f"source: {src['path']} ({src.get('family')}, sha256 {str(src.get('sha256'))[:12]}...)")
    print(f"calibration: {calib.get('source', 'none')}"
          + (f", {calib['n_samples']} x {calib['seq_len']} tokens, seed {calib['seed']}" if "n_samples" in calib else ""))
    print(f"quantized sites: {t['quantized_sites']}, {t['quantized_nbytes']} bytes")
    print(f"linear layers: {t['linear_numel']} weights, {t['linear_nbytes']} bytes, {t['bits_per_weight']:.4f} bits/weight")
    print(f"all tensors: {t['numel']} weights, {t['nbytes']} bytes ({t['nbytes'] / 2**20:.2f} MiB)")
    return 0
