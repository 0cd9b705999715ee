"""Render `liftedge profile` reports in headless Chromium and check that the charts are drawn.

For each profile.json given: write the self-contained HTML (`liftedge.profile.html`), open it
in headless Chromium (no network, no GPU, a throwaway profile folder), take a screenshot, and
check the PNG: the right size, and the chart colours of the per-operator bars and of the
bound-vs-measured bars present in the pixels (a page that failed to draw its SVG is white).
Copies the JSON, HTML and PNG to benchmarks/results/<prefix>_<name>.{json,html,png}.

    .venv/bin/python benchmarks/profile_render.py OUT/profile.json --name smollm2_onnx [--prefix profile]

Needs `chromium` (Debian: apt-get install -y chromium); CI has none, so no test depends on it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = (1200, 1600)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
# colours that must appear: the bound bars and the measured bar of the bound chart
BOUND_COLOUR, MEASURED_COLOUR = (0xAE, 0xC7, 0xE8), (0xD6, 0x27, 0x28)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("no chromium found: apt-get install -y chromium")


def screenshot(html: Path, png: Path) -> None:
    with tempfile.TemporaryDirectory() as profile_dir:
        cmd = [chromium(), *FLAGS, f"--user-data-dir={profile_dir}", f"--screenshot={png}",
               f"--window-size={WINDOW[0]},{WINDOW[1]}", html.resolve().as_uri()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if not png.is_file():
        sys.exit(f"chromium wrote no screenshot (exit {res.returncode}): {res.stderr[-1500:]}")


def colour_fraction(png: Path, rgb: tuple[int, int, int], tol: int = 6) -> float:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return float((np.abs(a - np.array(rgb)).max(axis=-1) <= tol).mean())


def check(png: Path, report: dict) -> dict:
    from PIL import Image

    size = Image.open(png).size
    kinds = {r["kind"] for r in report["ops"][:25]}
    from liftedge.profile.html import KIND_COLOURS

    op_colours = {k: KIND_COLOURS[k] for k in kinds if k in KIND_COLOURS}
    rgb = lambda h: tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))
    result = {"size": list(size), "kind_pixels": {k: colour_fraction(png, rgb(c)) for k, c in op_colours.items()},
              "bound_pixels": colour_fraction(png, BOUND_COLOUR), "measured_pixels": colour_fraction(png, MEASURED_COLOUR)}
    # each drawn bar colour covers at least ~1e-4 of the 1200x1600 page (a 200 x 10 px bar is 1e-3)
    result["ok"] = (tuple(size) == WINDOW and all(v > 1e-4 for v in result["kind_pixels"].values())
                    and (not report["bounds"] or result["bound_pixels"] > 1e-4))
    return result


def main() -> int:
    from liftedge.io import atomic_write_bytes
    from liftedge.profile.html import render_html

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profiles", nargs="+", type=Path, help="profile.json files written by `liftedge profile`")
    ap.add_argument("--name", action="append", default=None, help="result name per profile (default: its folder)")
    ap.add_argument("--prefix", default="profile")
    args = ap.parse_args()
    names = args.name or [p.parent.name for p in args.profiles]
    ok = True
    for path, name in zip(args.profiles, names):
        report = json.loads(path.read_text())
        base = RESULTS / f"{args.prefix}_{name}"
        html = base.with_suffix(".html")
        atomic_write_bytes(html, render_html(report).encode("utf-8"))
        atomic_write_bytes(base.with_suffix(".json"), (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
        screenshot(html, base.with_suffix(".png"))
        result = check(base.with_suffix(".png"), report)
        ok &= result["ok"]
        print(name, json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
