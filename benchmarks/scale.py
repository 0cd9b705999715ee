"""What fits where: phone-sized model shapes x devices, planned by liftedge from shapes alone;
and what building and running them costs, from synthetic packs at the device's plan.

    .venv/bin/python benchmarks/scale.py fits      -> benchmarks/results/scale_fits.{json,md}
    .venv/bin/python benchmarks/scale.py artifacts --shape llama-3.2-1b --runtimes executorch onnxruntime
                                                   -> benchmarks/results/scale.{json,md}

`artifacts`: the prior plan of SHAPE for --target/--ram, its synthetic pack
(`liftedge.synthetic`), then per runtime `liftedge build PACK` and `liftedge profile`, each in a
subprocess whose wall time and peak RSS (wait4's ru_maxrss) are recorded; a watchdog stops a
step whose resident memory passes --rss-cap (the machine is shared). Rows are merged into
scale.json by (shape, device, runtime), so shapes can be run one at a time.

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


def run_measured(cmd: list[str], rss_cap: int, log: Path) -> dict:
    """Run `cmd`; wall seconds, peak RSS (bytes) and exit status; killed past `rss_cap` bytes of RSS."""
    import os
    import subprocess
    import threading

    import psutil

    t0 = time.perf_counter()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "LIFTEDGE_NO_PROGRESS": "1"})
        capped = []

        def watch() -> None:
            while proc.poll() is None:
                try:
                    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in tree)
                except psutil.Error:
                    rss = 0
                if rss > rss_cap:
                    capped.append(rss)
                    proc.kill()
                time.sleep(0.5)

        threading.Thread(target=watch, daemon=True).start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_nbytes": usage.ru_maxrss * 1024,
            "exit": proc.returncode, **({"stopped_at_rss_nbytes": capped[0]} if capped else {}),
            "log_tail": [line for line in log.read_text(errors="replace").splitlines()
                         if line.strip() and not any(w in line for w in _NOISE)][-2:]}


# Import-time warnings of torch / torchao that every subprocess prints: not the step's outcome.
_NOISE = ("pytree", "torchao", "Warning", "warn(")


def artifacts(shape: str, device: str, ram: str, runtimes: list[str], work: Path, rss_cap: int,
              reuse: bool = False) -> list[dict]:
    import sys

    from liftedge.synthetic import prior_plan

    work.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("liftedge")
    rows = []
    for runtime in runtimes:
        result = prior_plan(shape, device=device, ram=ram, runtime=runtime)
        plan_file = work / f"{shape}-{runtime}.plan.json"
        plan_file.write_text(json.dumps(result.to_dict(), sort_keys=True))
        pack = work / f"{shape}-{runtime}.pack"
        row = {"shape": shape, "device": f"{device} {ram}", "runtime": runtime,
               "bits_per_weight": round(result.plan.bits_per_weight, 3),
               "planned_weights_nbytes": result.plan.total_nbytes,
               "predicted": None if result.memory is None else result.memory.to_dict()}
        code = ("import sys; from liftedge.synthetic import write_synthetic_pack as w; "
                "w(sys.argv[1], sys.argv[2], sys.argv[3], force=True)")
        if reuse and (pack / "manifest.json").is_file():
            row["synthetic_pack"] = json.loads((work / f"{shape}-{runtime}.pack.json").read_text())
        else:
            row["synthetic_pack"] = run_measured([sys.executable, "-c", code, shape, str(plan_file), str(pack)],
                                             rss_cap, work / f"{shape}-{runtime}.pack.log")
            (work / f"{shape}-{runtime}.pack.json").write_text(json.dumps(row["synthetic_pack"]))
        if row["synthetic_pack"]["exit"] == 0:
            row["pack_nbytes"] = sum(f.stat().st_size for f in pack.iterdir())
            out = work / f"{shape}-{runtime}.out"
            row["build"] = run_measured([str(exe), "build", str(pack), "--target", device, "--ram", ram,
                                         "--runtime", runtime, "-o", str(out), "--force"],
                                        rss_cap, work / f"{shape}-{runtime}.build.log")
            if row["build"]["exit"] == 0:
                row["artifact_files"] = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
                prof = work / f"{shape}-{runtime}.profile"  # `liftedge profile -o` is a folder
                row["profile"] = run_measured([str(exe), "profile", str(out), "--repeats", "1", "--new-tokens", "8",
                                               "--prompt-tokens", "16", "--json", "-o", str(prof)],
                                              rss_cap, work / f"{shape}-{runtime}.profile.log")
                if (prof / "profile.json").is_file():
                    row["profile"]["report"] = json.loads((prof / "profile.json").read_text())
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "predicted"}, default=str)[:1500], flush=True)
    return rows


def machine() -> str:
    """This machine in a line: cores, memory and the load average when the rows were written."""
    import os

    import psutil

    return (f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; load average "
            f"{os.getloadavg()[0]:.1f} when the last rows were written (rows from earlier runs say in the notes "
            "whether other jobs shared the CPU)")


def predicted_nbytes(row: dict) -> int | None:
    """The memory model's runtime total: planned weights + KV cache + activations + runtime + tokenizer."""
    pred = row.get("predicted")
    if not pred:
        return None
    return row["planned_weights_nbytes"] + sum(pred.get(k, 0) for k in (
        "kv_cache_nbytes", "activation_nbytes", "runtime_overhead_nbytes", "tokenizer_nbytes", "head_cast_nbytes"))


def artifacts_markdown(data: dict) -> str:
    gib = lambda n: "-" if n is None else f"{n / 2**30:.2f} GiB"  # noqa: E731
    lines = ["# Phone-sized shapes built and run (`benchmarks/scale.py artifacts`)", "",
             f"Machine: {data['machine']}. Synthetic packs (random signs and scales at the device plan's formats, "
             "`liftedge.synthetic`): bytes, memory and speed are real, the text is not. Each step ran in its own "
             "process; peak RSS is the process's maximum resident set (wait4 ru_maxrss).", "",
             "| shape | device | runtime | plan b/w | pack | pack write (s / peak RSS) | build (s / peak RSS) | "
             "artifact | runtime load (s) | runtime peak RSS | predicted runtime memory | decode tok/s | "
             "vs 4-bit (torchao 8da4w) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tail = [""] + [f"- {note}" for note in data.get("notes", [])]
    for r in data["rows"]:
        pk, b, pf = r.get("synthetic_pack", {}), r.get("build", {}), (r.get("profile") or {})
        rep = pf.get("report") or {}
        art = sum(v for k, v in (r.get("artifact_files") or {}).items() if k.endswith((".pte", ".onnx", ".data", ".ort")))
        predicted = predicted_nbytes(r)
        load = f"{rep['load_ms'] / 1000:.1f}" if rep.get("load_ms") else "-"
        tps = f"{rep['decode_tokens_per_s']['median']:.2f}" if rep.get("decode_tokens_per_s") else "-"
        step = lambda m: "-" if not m else (f"{m['seconds']:.0f} / {gib(m['peak_rss_nbytes'])}"  # noqa: E731
                                            + ("" if m.get("exit") == 0 else f" (exit {m.get('exit')})"))
        lines.append(f"| {r['shape']} | {r['device']} | {r['runtime']} | {r['bits_per_weight']:.2f} | "
                     f"{gib(r.get('pack_nbytes'))} | {step(pk)} | {step(b)} | {gib(art) if art else '-'} | "
                     f"{load} | {gib(rep.get('peak_rss_nbytes'))} | {gib(predicted)} | "
                     f"{tps} | {_vs_int4(r.get('int4_baseline'))} |")
    return "\n".join(lines + quantize_markdown() + plan_markdown() + tail) + "\n"


def _vs_int4(base: dict | None) -> str:
    """The paired comparison with torchao 8da4w of the same weights, where one was run."""
    if not base:
        return "-"
    return (f"{base['lq_decode_tok_s']:.1f} vs {base['int4_decode_tok_s']:.1f} tok/s ({base['ratio']:.2f}x); "
            f"peak {base['lq_peak_above_baseline_gb']:.2f} vs {base['int4_peak_above_baseline_gb']:.2f} GB")


def quantize_markdown() -> list[str]:
    """LiftQuant's time and memory per decoder block, from benchmarks/quantize_throughput.py's results."""
    lines = ["", "## Quantization (LiftQuant, `benchmarks/quantize_throughput.py`)", "",
             "The first blocks of a shape-true random checkpoint (fp16) through the streaming quantizer; the "
             "model's time is the steady block time x its block count. Peak RSS is the quantizing process's (the "
             "checkpoint kept memory-mapped, as `liftedge quantize` loads it; not so for the H200 rows, see the "
             "notes).", "",
             "| shape | device | calibration tokens | correction epochs | s / block | weights / s | model (extrapolated) "
             "| peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("quantize_throughput_*.json")):  # cpu, cuda, cuda_h100
        device = path.stem.removeprefix("quantize_throughput_")
        data = json.loads(path.read_text())
        for r in data.get("shapes") or data.get("runs") or []:
            samples, seq = r.get("samples", data.get("samples")), r.get("seq_len", data.get("seq_len"))
            steady = r["block_seconds"][1:] or r["block_seconds"]
            epochs = r.get("correction_epochs", data.get("correction_epochs"))
            contended = " (contended)" if r.get("contended") else ""
            lines.append(f"| {r['shape']} | {data.get('device_name', device)} | {samples} x {seq} | {epochs} | "
                         f"{sum(steady) / len(steady):.0f} | {r['weights_per_s'] / 1e6:.2f} M | "
                         f"{_minutes(r['extrapolated_model_minutes'])} | {r['peak_rss_gb']:.2f} GiB{contended} |")
    return lines


def plan_markdown() -> list[str]:
    """`liftedge plan --sensitivity measure` at scale, from benchmarks/plan_measure.py's results."""
    path = RESULTS / "plan_measure.json"
    if not path.is_file():
        return []
    lines = ["", "## Measured plans (`liftedge plan --sensitivity measure`, `benchmarks/plan_measure.py`)", "",
             "The plan as a user runs it on a shape-true random checkpoint (fp16, memory-mapped), from a fresh "
             "cache; peak RSS sampled every 0.25 s (anon.: without the file-backed pages of the mapped checkpoint, "
             "which the kernel can reclaim; recorded since 2026-12-05).", "",
             "| shape | device | target | calibration tokens | wall | peak RSS | GPU peak | cache written | "
             "plan b/w (weights) | options |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in json.loads(path.read_text())["rows"]:
        gpu = f"{r['gpu_peak_gb']:.1f} GB" if r.get("gpu_peak_gb") else "-"
        anon = f" ({r['peak_anon_rss_gb']:.2f} anon.)" if "peak_anon_rss_gb" in r else ""
        if r.get("completed", True):
            p = r["plan"]
            options = ", ".join(f"{k} {v}" for k, v in p["options"].items())
            cache, bits = f"{r['cache_written_mb']:.1f} MB", f"{p['bits_per_weight']:.2f}"
            wall = _minutes(r["wall_s"] / 60)
            if r.get("calls"):  # measured over several calls of a lent machine, each resuming the last
                wall += f" ({len(r['calls'])} calls, resumed)"
        else:  # stopped on purpose (--stop-after): the memory of the phases it reached
            cache, bits, options = "-", "-", f"stopped at: {r['progress_at_stop']}"
            wall = f"{_minutes(r['wall_s'] / 60)} (stopped)"
        lines.append(f"| {r['shape']} | {r.get('device_name', r['device'])} | {r['target']} {r['ram']} | "
                     f"{r['samples']} x {r['seq_len']} | {wall} | {r['peak_rss_gb']:.2f} GB{anon} | "
                     f"{gpu} | {cache} | {bits} | {options} |")
    return lines


def _minutes(minutes: float) -> str:
    return f"{minutes / 60:.1f} h" if minutes >= 90 else f"{minutes:.0f} min"


def plot(data: dict, path: Path) -> None:
    """Build and runtime peak memory per shape and runtime, against the 4 GB goal and the memory model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if (r.get("build") or {}).get("exit") == 0]
    labels = [f"{r['shape'].removeprefix('llama-')}\n{r['runtime']}\n{r['device']}" for r in rows]
    gb = lambda n: (n or 0) / 1e9  # noqa: E731
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(rows))
    left.bar(x, [gb(r["build"]["peak_rss_nbytes"]) for r in rows], color="#4c72b0")
    left.axhline(4.0, color="#c44e52", linestyle="--", label="issue 20's goal: 4 GB")
    left.set_xticks(list(x), labels, fontsize=7)
    left.set_ylabel("GB")
    left.set_title("liftedge build: peak resident memory")
    left.legend()
    runtime = [(gb((r.get("profile") or {}).get("report", {}).get("peak_rss_nbytes")), r) for r in rows]
    predicted = [gb(predicted_nbytes(r)) for r in rows]
    width = 0.4
    right.bar([i - width / 2 for i in x], [m for m, _ in runtime], width, label="measured (process peak)")
    right.bar([i + width / 2 for i in x], predicted, width, label="memory model (KV cache full)")
    right.set_xticks(list(x), labels, fontsize=7)
    right.set_ylabel("GB")
    right.set_title("runtime peak resident memory vs the memory model")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("fits", "artifacts", "render"))
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--target", default="android")
    ap.add_argument("--ram", default="4GB")
    ap.add_argument("--runtimes", nargs="+", default=["executorch", "onnxruntime"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/liftedge-scale"))
    ap.add_argument("--reuse-pack", action="store_true", help="keep a synthetic pack already in --work")
    ap.add_argument("--rss-cap-gb", type=float, default=8.0, help="stop a step past this resident memory")
    args = ap.parse_args()
    if args.step == "render":  # scale.md and scale.png again from the results (no runs)
        data = json.loads((RESULTS / "scale.json").read_text())
        (RESULTS / "scale.md").write_text(artifacts_markdown(data))
        plot(data, RESULTS / "scale.png")
        return
    if args.step == "artifacts":
        rows = artifacts(args.shape, args.target, args.ram, args.runtimes, args.work, int(args.rss_cap_gb * 2**30),
                         args.reuse_pack)
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / "scale.json"
        old = json.loads(path.read_text())["rows"] if path.is_file() else []
        keys = {(r["shape"], r["device"], r["runtime"]) for r in rows}
        merged = [r for r in old if (r["shape"], r["device"], r["runtime"]) not in keys] + rows
        notes = json.loads(path.read_text()).get("notes", []) if path.is_file() else []
        path.write_text(json.dumps({"notes": notes, "machine": machine(), "rows": merged},
                                   indent=1, sort_keys=True, default=str) + "\n")
        (RESULTS / "scale.md").write_text(artifacts_markdown(json.loads(path.read_text())))
        plot(json.loads(path.read_text()), RESULTS / "scale.png")
        return
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
