"""`liftedge plan --sensitivity measure` on phone-sized shapes (issue 20): wall time, the
process's peak resident memory, the GPU's peak memory, and the plan chosen.

The plan runs as a user runs it (`python -m liftedge.cli plan CHECKPOINT --target ... --ram ...
--json -o FILE`), in a child process with a fresh cache folder (so nothing is read from an
earlier run); this process samples the child's RSS, and its anonymous part (RSS less the pages
of mapped files), every 0.25 s (psutil) and, with
`--device cuda`, the GPU memory in use (nvidia-smi) every second. The checkpoint is a
shape-true random one (`liftedge.shapes.write_checkpoint`, fp16, memory-mapped by the plan),
written first in its own process unless `--checkpoint` names one that exists.

    .venv/bin/python benchmarks/plan_measure.py --shape llama-3.2-1b --device cpu --samples 4 --seq-len 64
    python benchmarks/plan_measure.py --shape llama-3.1-8b --device cuda     # the plan's defaults

Rows are merged into benchmarks/results/plan_measure.json (--out overrides), keyed by shape,
device, samples and sequence length. `--stop-after S` stops the run S seconds after this script
starts and records a partial row; with `--cache DIR` the plan's cache is kept there, and a
stopped plan run again with it resumes from its measured chunks (the row says `resumed`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """Resident bytes of `proc` and its children, and the anonymous part of them (RSS less the
    file-backed and shared pages: what the process itself allocated; the pages of a memory-mapped
    checkpoint are file-backed, reclaimable by the kernel). 0 for processes that are gone."""
    total = anon = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_info()
        except psutil.Error:
            continue
        total += info.rss
        anon += info.rss - info.shared
    return total, anon


def gpu_used_bytes() -> int | None:
    """Memory in use on GPU 0 as nvidia-smi reports it (None without nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out.split()[0]) << 20


class Sampler(threading.Thread):
    """Samples a process tree's RSS (and the GPU's memory) until the process ends."""

    def __init__(self, proc: subprocess.Popen, gpu: bool, period: float = 0.25):
        super().__init__(daemon=True)
        self.proc, self.gpu, self.period = psutil.Process(proc.pid), gpu, period
        self.peak_rss = self.peak_anon = 0
        self.peak_gpu = 0
        self.series: list[tuple[float, int]] = []  # (seconds, rss) every 5 s, for the record
        self.start_time = time.perf_counter()

    def run(self) -> None:
        last_gpu = last_series = -1e9
        while True:
            try:
                if self.proc.status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.Error:
                return
            now = time.perf_counter() - self.start_time
            rss, anon = tree_rss(self.proc)
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            if now - last_series >= 5:
                self.series.append((round(now, 1), rss))
                last_series = now
            if self.gpu and now - last_gpu >= 1:
                self.peak_gpu = max(self.peak_gpu, gpu_used_bytes() or 0)
                last_gpu = now
            time.sleep(self.period)


def downsampled(series: list[tuple[float, int]], points: int = 40) -> list[list[float]]:
    """At most `points` (seconds, GB) pairs of the RSS series, each the maximum of its stretch."""
    step = max(1, -(-len(series) // points))
    out = []
    for i in range(0, len(series), step):
        part = series[i:i + step]
        out.append([part[0][0], round(max(r for _, r in part) / 1e9, 2)])
    return out


def last_progress(log: Path) -> str:
    """The last progress-bar or log line the plan wrote (where a stopped run had got to)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith("liftedge: terminated")]  # the plan's own word on the stop
    return lines[-1][-200:] if lines else ""


def summarize_plan(data: dict) -> dict:
    """The plan's headline: bits/weight, bytes, option counts, the budget."""
    plan = data["plan"]
    counts = collections.Counter(c["option"] for c in plan["choices"])
    return {"bits_per_weight": round(plan["derived"]["bits_per_weight"], 3),
            "planned_nbytes": sum(c["nbytes"] for c in plan["choices"]),
            "weight_budget_nbytes": data["memory"]["weight_budget_nbytes"],
            "predicted_error": plan["derived"]["predicted_error"],
            "options": dict(sorted(counts.items()))}


def run_plan(checkpoint: Path, args, workdir: Path, deadline: float | None) -> dict:
    plan_json = workdir / "plan.json"
    cmd = [sys.executable, "-m", "liftedge.cli", "plan", str(checkpoint), "--target", args.target, "--ram", args.ram,
           "--device", args.device, "--json", "-o", str(plan_json), "--force"]
    if args.samples is not None:
        cmd += ["--samples", str(args.samples)]
    if args.seq_len is not None:
        cmd += ["--seq-len", str(args.seq_len)]
    if args.calib is not None:
        cmd += ["--calib", str(args.calib.resolve())]  # the plan runs in its work folder
    cache = args.cache or workdir / "cache"
    resumed = any(cache.rglob("*.partial.json"))  # an earlier, stopped run's measured chunks
    env = dict(os.environ, LIFTEDGE_CACHE=str(cache.resolve()))
    log_path = args.log or workdir / "plan.log"
    t = time.perf_counter()
    with open(log_path, "w") as log:
        # cwd outside the source tree: `python -m` puts the cwd first on sys.path
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=workdir)
        sampler = Sampler(proc, gpu=args.device == "cuda")
        sampler.start()
        try:
            rc = proc.wait(timeout=None if deadline is None else max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:  # a partial row: the memory of the phases reached, and how far it got
            proc.terminate()
            rc = proc.wait()
        sampler.join()
    wall = time.perf_counter() - t
    completed = plan_json.is_file()
    if not completed and deadline is not None and time.perf_counter() >= deadline:
        return {"completed": False, "resumed": resumed, "wall_s": round(wall, 1), "peak_rss_gb": round(sampler.peak_rss / 1e9, 2),
                "peak_anon_rss_gb": round(sampler.peak_anon / 1e9, 2),
                "rss_series_s_gb": downsampled(sampler.series), "command": " ".join(cmd[1:]),
                "progress_at_stop": last_progress(Path(log_path)),
                **({"gpu_peak_gb": round(sampler.peak_gpu / 1e9, 2)} if args.device == "cuda" else {})}
    if rc != 0:
        raise SystemExit(f"plan failed (rc {rc}); log: {log_path}\n{Path(log_path).read_text()[-3000:]}")
    cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    row = {"completed": True, "resumed": resumed, "wall_s": round(wall, 1), "peak_rss_gb": round(sampler.peak_rss / 1e9, 2),
           "peak_anon_rss_gb": round(sampler.peak_anon / 1e9, 2),
           "rss_series_s_gb": downsampled(sampler.series),
           "cache_written_mb": round(cache_bytes / 1e6, 2), "command": " ".join(cmd[1:])}
    if args.device == "cuda":
        row["gpu_peak_gb"] = round(sampler.peak_gpu / 1e9, 2)
    row["plan"] = summarize_plan(json.loads(plan_json.read_text()))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--checkpoint", type=Path, default=None, help="the shape's checkpoint (written there if absent)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--target", default="android")
    ap.add_argument("--ram", default="4GB")
    ap.add_argument("--samples", type=int, default=None, help="default: the plan's")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the plan's")
    ap.add_argument("--calib", type=Path, default=None,
                    help="calibration text (default: the plan's data-free sampling, which at 8B on CPU is a "
                         "full forward pass per sampled token)")
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--stop-after", type=float, default=None,
                    help="stop the plan this many seconds after this script starts (a checkpoint write "
                         "included) and record how far it got (a partial row)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="the plan's cache folder, kept (default: a fresh one, removed): a plan stopped "
                         "with this folder goes on from its measured chunks when run again with it")
    ap.add_argument("--out", type=Path, default=RESULTS / "plan_measure.json")
    args = ap.parse_args()

    from liftedge.commands.quantize import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
    from liftedge.shapes import write_checkpoint

    deadline = None if args.stop_after is None else time.perf_counter() + args.stop_after
    with tempfile.TemporaryDirectory(prefix="plan-measure-") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or work / "model"
        write_s = None
        if not (checkpoint / "config.json").is_file():
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import sys; from liftedge.shapes import write_checkpoint; "
                            "write_checkpoint(sys.argv[1], sys.argv[2])", args.shape, str(checkpoint)], check=True)
            write_s = round(time.perf_counter() - t, 1)
        row = {"shape": args.shape, "device": args.device, "target": args.target, "ram": args.ram,
               "samples": args.samples or DEFAULT_SAMPLES, "seq_len": args.seq_len or DEFAULT_SEQ_LEN,
               "calibration": args.calib.name if args.calib else "data-free",
               "load_average_at_start": round(os.getloadavg()[0], 2), "checkpoint_write_s": write_s}
        row.update(run_plan(checkpoint, args, work, deadline))
    row.update(host=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
               date=time.strftime("%Y-%m-%d"))
    if args.device == "cuda":
        import torch

        row["device_name"] = torch.cuda.get_device_name(0)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    key = (row["shape"], row["device"], row["samples"], row["seq_len"])
    data["rows"] = [r for r in data["rows"] if (r["shape"], r["device"], r["samples"], r["seq_len"]) != key] + [row]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "rss_series_s_gb"}, indent=1))


if __name__ == "__main__":
    main()
