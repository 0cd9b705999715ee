"""Wall time and resident memory of `liftedge quantize` (LiftQuant) on this machine, by phase.

Runs the quantize command in a child process, samples its /proc/PID/status (RssAnon,
RssFile, VmRSS) and the load average once a second, and splits the run into phases by what
the command prints: "loaded ..." ends the load, the first LiftQuant progress bar ends the
calibration text and the capture of block 0's inputs, each bar update ends a block, and the
rest is writing the pack. The peak is the child's own high-water mark (getrusage of the
waited child, as `/usr/bin/time -v` reports it), not the 1 s samples.

    .venv/bin/python benchmarks/quantize_memory.py \
        [--model default --rate 24/10 --calib ../shared/data/wikitext-2/valid.tokens.txt]

Writes benchmarks/results/smollm2_cpu_quantize.json (and a PNG of RSS over time when
matplotlib is installed). With --compare PACK, also records whether the new pack's
weights.safetensors is byte-identical to PACK's. A load average above 1 (other jobs on the
2 cores) marks the timings as contended.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from liftedge.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIELDS = ("VmRSS", "RssAnon", "RssFile")
FLOAT_MODEL = Path("~/.cache/liftedge/models/SmolLM2-135M-Instruct.Q4_1.float32-b179c9523d0e/model.safetensors")
_RESUMED = "!resumed"
_BAR = re.compile(r"LiftQuant:.*?\|\s*(\d+)/(\d+)")


def main() -> int:
    args = _parse()
    cmd = [str(ROOT / ".venv" / "bin" / "liftedge"), "quantize", args.model, "--method", "liftquant",
           "--rate", args.rate, "--calib", *args.calib, "-o", str(args.output), "--force", *args.extra]
    previous = _previous(args.json)
    commit, dirty = _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "--untracked-files=no"))
    run = _run(cmd)
    phases = _phases(run["samples"], run["events"], run["wall"])
    blocks = [p["seconds"] for p in phases if p["phase"].startswith("block")]
    result = {
        "command": " ".join(["liftedge", *cmd[1:]]).replace(str(args.output), "OUT"),
        "settings": {"calibration": "64 x 512 tokens (default)", "correction_epochs": 4, "rate": f"LQ-{args.rate}",
                     **({"extra_args": args.extra} if args.extra else {})},
        "git_commit": commit,  # taken before the run: the code that ran
        "git_dirty": dirty,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; torch {_torch_version()}",
        "measured_with": "benchmarks/quantize_memory.py (getrusage peak; /proc/PID/status sampled each second)",
        "exit_code": run["exit_code"],
        "resumed_from_checkpoint": any(name == _RESUMED for _, name in run["events"]),
        "wall_seconds": round(run["wall"], 1),
        "user_seconds": round(run["usage"].ru_utime, 1),
        "cpu_percent": round(100 * (run["usage"].ru_utime + run["usage"].ru_stime) / run["wall"]),
        "peak_rss_kib": run["usage"].ru_maxrss,
        "seconds_per_block": round(sum(blocks) / len(blocks), 1) if blocks else None,
        **_pack_totals(args.output),
        "float_model_load_rss_mib": next((p["peak_VmRSS_mib"] for p in phases if p["phase"] == "load"), None),
        "load_average": _load_summary(run["samples"]),
        "float_model_fp32_weights_mib": round(_float_model_nbytes() / 2**20),
        "phases": phases,
        "previous": previous,
    }
    result["contended"] = result["load_average"]["mean"] > 1.0
    result["peak_rss_over_float_model"] = round(result["peak_rss_kib"] * 1024 / max(1, _float_model_nbytes()), 2)
    if args.compare:
        result["pack_weights_identical_to"] = {"pack": str(args.compare), "identical": _same_weights(args.output, args.compare)}
    atomic_write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}, indent=1))
    _plot(run["samples"], run["events"], args.json.with_suffix(".png"))
    return run["exit_code"]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--rate", default="24/10")
    p.add_argument("--calib", nargs="+", default=[str(ROOT.parent / "shared/data/wikitext-2/valid.tokens.txt")])
    p.add_argument("--output", type=Path, default=Path("/tmp/liftedge-quantize-memory-pack"))
    p.add_argument("--json", type=Path, default=RESULTS / "smollm2_cpu_quantize.json")
    p.add_argument("--compare", type=Path, default=None, help="a pack whose weights.safetensors should be identical")
    p.add_argument("extra", nargs="*", help="more arguments for `liftedge quantize` (after --)")
    return p.parse_args()


def _run(cmd: list[str]) -> dict:
    """Run `cmd`, sampling its memory each second and timestamping its phase markers."""
    started = time.monotonic()
    child = subprocess.Popen(cmd, stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    events: list[tuple[float, str]] = []
    reader = threading.Thread(target=_read_markers, args=(child.stderr, events, started), daemon=True)
    reader.start()
    samples = []
    while child.poll() is None:
        status = _status(child.pid)
        if status:
            samples.append({"t": round(time.monotonic() - started, 1), **status, "load": os.getloadavg()[0]})
        time.sleep(1)
    wall = time.monotonic() - started
    reader.join(timeout=5)
    return {"exit_code": child.returncode, "wall": wall, "samples": samples, "events": events,
            "usage": resource.getrusage(resource.RUSAGE_CHILDREN)}


def _status(pid: int) -> dict | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: int(values[k].split()[0]) // 1024 for k in FIELDS if k in values}  # MiB


def _read_markers(stream, events: list, started: float) -> None:
    """Record (seconds, phase that just ended) from the command's stderr; echo it."""
    seen = -1
    for raw in iter(lambda: stream.read1(4096), b""):
        sys.stderr.buffer.write(raw)
        t = round(time.monotonic() - started, 1)
        for chunk in re.split(r"[\r\n]", raw.decode("utf-8", "replace")):
            if chunk.startswith("loaded "):
                events.append((t, "load"))
            if chunk.startswith("resuming from"):  # finished blocks replayed from a checkpoint: not a full run
                events.append((t, _RESUMED))
            bar = _BAR.search(chunk)
            if bar and int(bar.group(1)) > seen:
                done = int(bar.group(1))
                events.append((t, "calibration+capture" if done == 0 else f"block {done - 1}"))
                seen = done


def _phases(samples: list[dict], events: list, wall: float) -> list[dict]:
    """Per phase: its seconds and the peak of each sampled field (MiB)."""
    bounds, start = [], 0.0
    for t, name in events:
        if name == _RESUMED:
            continue
        bounds.append((name, start, t))
        start = t
    bounds.append(("write pack + exit", start, wall))
    out = []
    for name, a, b in bounds:
        inside = [s for s in samples if a <= s["t"] <= b] or [min(samples, key=lambda s: abs(s["t"] - b))]
        out.append({"phase": name, "seconds": round(b - a, 1),
                    **{f"peak_{k}_mib": max(s[k] for s in inside) for k in FIELDS},
                    "end_RssAnon_mib": inside[-1]["RssAnon"]})
    return out


def _previous(path: Path) -> dict:
    """The headline numbers of the result this run replaces (so a change's effect stays on record)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    keys = ("git_commit", "wall_seconds", "peak_rss_kib", "seconds_per_block", "contended", "machine", "note")
    return {k: old[k] for k in keys if k in old}


def _pack_totals(pack: Path) -> dict:
    try:
        totals = json.loads((pack / "manifest.json").read_text())["totals"]
    except (OSError, ValueError, KeyError):
        return {}
    return {"bits_per_weight_linears_all_bytes": round(totals["bits_per_weight"], 3),
            "nbytes_all_weight_tensors": totals["nbytes"]}


def _load_summary(samples: list[dict]) -> dict:
    loads = [s["load"] for s in samples] or [os.getloadavg()[0]]
    return {"mean": round(sum(loads) / len(loads), 2), "max": round(max(loads), 2)}


def _float_model_nbytes() -> int:
    path = FLOAT_MODEL.expanduser()
    return path.stat().st_size if path.is_file() else 0


def _same_weights(a: Path, b: Path) -> bool:
    return _sha256(a / "weights.safetensors") == _sha256(b / "weights.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _torch_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("torch")


def _plot(samples: list[dict], events: list, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for k in FIELDS:
        ax.plot(t, [s[k] for s in samples], label=k, linewidth=1)
    for when, name in events:
        if name in ("load", "calibration+capture"):
            ax.axvline(when, color="grey", linestyle=":", linewidth=0.8)
            ax.text(when, ax.get_ylim()[1] * 0.97, f" {name} done", fontsize=7, va="top")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title("liftedge quantize (LiftQuant) resident memory")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
