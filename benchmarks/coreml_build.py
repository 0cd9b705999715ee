"""Core ML build of a pack: package size against the pack, build and verification cost.

Core ML cannot run on Linux, so this measures what can be measured here: the package's weight
file bytes against the pack's tensor bytes (per format, the packing overhead), the time and
peak RSS of lowering + read-back verification, the numpy interpreter's time for the greedy
run, and the verification numbers (logits error, tokens). On-device speed needs a Mac:
examples/ios/verify_on_mac.py prints prefill time and decode tokens/s there.

Load average before/after is recorded; `contended` is set when other processes were using
the CPU (times are then upper bounds, not claims).

    .venv/bin/python benchmarks/coreml_build.py --pack PACK   (e.g. a pack from `liftedge quantize default --rate 24/10 -o PACK`) [--tokens 8]
Writes benchmarks/results/coreml_<pack name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from liftedge.lowering import build_artifact

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, required=True, help="the LiftQuant pack folder to build")
    parser.add_argument("--tokens", type=int, default=8, help="greedy tokens verified (interpreter is slow)")
    parser.add_argument("--max-context", type=int, default=256)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    out = Path(tempfile.mkdtemp(prefix="liftedge-coreml-")) / "artifact"
    start = time.perf_counter()
    try:
        report = build_artifact(args.pack, "coreml", out,
                                options={"verify_tokens": args.tokens, "max_context": args.max_context})
    finally:
        seconds = time.perf_counter() - start
        shutil.rmtree(out.parent, ignore_errors=True)
    load_after = os.getloadavg()[0]
    v = report["verification"]
    result = {
        "pack": str(args.pack), "bits_per_weight": report["pack"]["totals"]["bits_per_weight"],
        "sizes": report["sizes"], "files": report["files"],
        # Resident weight bytes per compute units: from Apple's documentation, not measured here.
        "residency": {k: report["residency"][k] for k in ("compute_units", "resident_weight_nbytes",
                                                         "resident_over_stored", "source")},
        "site_lowerings": sorted({s["lowering"] for s in report["sites"].values()}),
        "verification": {k: v[k] for k in ("prompt_tokens", "new_tokens", "tolerance", "prompt_logits_rel_error",
                                           "decode_logits_max_rel_error", "greedy_tokens_equal", "passed",
                                           "interpreter_seconds", "weights_bit_exact")},
        "op_counts": v["structure"]["op_counts"],
        "build_and_verify_seconds": round(seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_count": os.cpu_count(), "load_average_before_after": [load_before, load_after],
        "contended": max(load_before, load_after) > 1.5,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"coreml_{args.pack.name}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
