"""LiftQuant throughput on phone-sized shapes (issue 20): seconds per decoder block, weights/s,
peak memory, and the whole model's time extrapolated from its block count.

Every per-block cost of LiftQuant (whitening statistics, the lifted search, intra-block
correction) depends only on the block's shapes and the calibration set, not on the weights'
values. So the benchmark writes a shape-true checkpoint with seeded random weights
(`liftedge.shapes.write_checkpoint`) holding only the first `--layers` blocks, quantizes them with
the same streaming pipeline `liftedge quantize` runs, and extrapolates: total = mean seconds of
the blocks after the first (the first also pays warm-up) x the shape's real block count.
Calibration tokens are seeded random ids: their cost is the token count, not the text.

    .venv/bin/python benchmarks/quantize_throughput.py --device cpu --shapes llama-3.2-1b --layers 1
    python benchmarks/quantize_throughput.py --device cuda --shapes llama-3.2-1b,llama-3.2-3b,qwen3-4b,llama-3.1-8b

Writes benchmarks/results/quantize_throughput_<device>.json (--out overrides).
"""

from __future__ import annotations

import argparse
import multiprocessing
import json
import os
import platform
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def measure_shape(name: str, *, layers: int, device: str, samples: int, seq_len: int, rate: str,
                  epochs: int, seed: int) -> dict:
    """Quantize the first `layers` blocks of shape `name`; timings and the extrapolated total."""
    from liftedge.correct import CorrectionConfig
    from liftedge.model import list_sites, load_model
    from liftedge.quantize.liftquant import LiftQuantConfig
    from liftedge.quantize.pipeline import quantize_streaming
    from liftedge.shapes import shape_config, write_checkpoint
    from liftedge.types import Rate

    full_layers = shape_config(name).num_hidden_layers
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"qt-{name}-") as tmp:
        t = time.perf_counter()
        # Written in a child process, so that this process's peak RSS is the quantizer's alone.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            folder = pool.submit(write_checkpoint, name, Path(tmp) / "model", seed=seed, layers=layers).result()
        write_s = time.perf_counter() - t
        # As `liftedge quantize` loads it: the fp16 weights stay a memory map, computed in
        # float32 one block at a time (liftedge.upcast).
        loaded = load_model(folder, mapped=True)
        sites = [s for s in list_sites(loaded.model) if s.kind == "linear" and s.block is not None]
        config = LiftQuantConfig(Rate.parse(rate), seed=seed)
        configs = {s.name: config for s in sites}
        block_params = sum(loaded.model.get_submodule(s.name).weight.numel() for s in sites) // layers
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, loaded.model.config.vocab_size, (samples, seq_len), generator=gen)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        loaded.model.to(device)
        t = time.perf_counter()
        _, report = quantize_streaming(loaded, tokens.to(device), configs,
                                       CorrectionConfig(epochs=epochs, seed=seed) if epochs else None,
                                       keep_decoded=False)
        total_s = time.perf_counter() - t
    seconds = [b["seconds"] for b in report.blocks]
    steady = seconds[1:] or seconds
    per_block = sum(steady) / len(steady)
    record = {
        "shape": name, "rate": rate, "samples": samples, "seq_len": seq_len, "correction_epochs": epochs,
        "load_average_at_start": round(load, 2),
        "contended": load > 1.0 and not device.startswith("cuda"),
        "blocks_quantized": layers, "blocks_in_model": full_layers,
        "linear_weights_per_block": block_params, "checkpoint_write_s": round(write_s, 2),
        "block_seconds": seconds, "run_seconds": round(total_s, 2),
        "weights_per_s": round(block_params / per_block),
        "extrapolated_model_minutes": round(per_block * full_layers / 60, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if device.startswith("cuda"):
        record["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return record


def cpu_name() -> str:
    """The CPU's model name and core count (Linux), else the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        return f"{model}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def tail_search_kind(device: str) -> str:
    """Which tail search `encode` runs on `device`: the fused Triton kernel, the CPU kernel, or torch."""
    from liftedge.lattice import kernel

    if device.startswith("cuda"):
        from liftedge.lattice import fused

        return f"fused triton {fused.triton.__version__}" if fused.available() else "torch reference"
    return "compiled CPU kernel" if kernel.available() else "torch reference"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-3.2-1b", help="comma-separated names from liftedge.shapes")
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks quantized per shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples (liftedge quantize's default)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sample (liftedge quantize's default)")
    ap.add_argument("--rate", default="24/10")
    ap.add_argument("--epochs", type=int, default=4, help="correction passes (0: none; default as quantize)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--merge", action="store_true",
                    help="add to the runs already in --out (a run of the same shape and settings is replaced)")
    args = ap.parse_args()
    out = args.out or RESULTS / f"quantize_throughput_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else cpu_name(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "tail_search": tail_search_kind(args.device),
        "method": "first blocks of a shape-true random checkpoint; total = mean block time after the first "
                  "x the model's block count (embedding/head not quantized by LiftQuant)",
        "shapes": [],
    }
    if args.merge and out.is_file():  # keep the runs of other shapes / settings already there
        earlier = json.loads(out.read_text())
        result["shapes"] = earlier.get("shapes") or earlier.get("runs") or []
    for name in args.shapes.split(","):
        print(f"{name}: {args.layers} block(s) on {args.device}", flush=True)
        result["shapes"] = [r for r in result["shapes"] if (r.get("shape"), r.get("samples"), r.get("seq_len"),
                            r.get("correction_epochs")) != (name, args.samples, args.seq_len, args.epochs)]
        result["shapes"].append(measure_shape(name, layers=args.layers, device=args.device, samples=args.samples,
                                              seq_len=args.seq_len, rate=args.rate, epochs=args.epochs,
                                              seed=args.seed))
        print(json.dumps(result["shapes"][-1]), flush=True)
        out.write_text(json.dumps(result, indent=2) + "\n")  # after each shape: a long run keeps what it did
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
