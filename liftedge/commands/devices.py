"""`liftedge devices [--json]`: list the packaged device profiles (printing only; data in liftedge.device)."""

from __future__ import annotations

import argparse
import json

from liftedge.device import GIB, list_devices
from liftedge.sizes import format_size


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "devices",
        help="list the device profiles (--device NAME)",
        description="List the device profiles liftedge knows: RAM, the share one app may hold, memory "
                    "bandwidth and the default runtime. Generic profiles (android, ios) take --ram; "
                    "sizes like 6GB are powers of 1000, 6G or 6GiB powers of 1024.",
    )
    parser.add_argument("--json", action="store_true", help="print the profiles as JSON")
    parser.set_defaults(func=run)


def _row(p) -> tuple[str, ...]:
    if p.ram_nbytes is None:
        ram, usable = "--ram", f"{p.app_share:.0%} of --ram"
    else:
        ram = "/".join(f"{v / GIB:g}" for v in p.ram_variants_nbytes) + " GiB"
        usable = format_size(p.app_usable_nbytes())
    if p.app_share_entitled is not None:
        usable += f" ({p.app_share_entitled:.0%} entitled)"
    bandwidth = f"{p.bandwidth_gbps:g} GB/s" + ("" if p.bandwidth_source == "spec" else f" ({p.bandwidth_source})")
    return (p.name, p.platform, ram, usable, bandwidth, p.default_runtime)


def run(args: argparse.Namespace) -> int:
    profiles = list_devices()
    if args.json:
        print(json.dumps([p.to_dict() for p in profiles], indent=2, sort_keys=True))
        return 0
    rows = [("NAME", "PLATFORM", "RAM", "APP-USABLE", "BANDWIDTH", "RUNTIME")] + [_row(p) for p in profiles]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0
