"""A phone-sized shape's pack with its first decoder blocks really quantized (issue 20).

Quantizing a whole 3B model takes hours on this CPU and its weights cannot be had here, so
`scale.py` builds from synthetic packs. This script makes the partly real variant: the first
`--blocks` decoder blocks of the shape's seeded random checkpoint (`liftedge.shapes`) are
quantized by the same streaming LiftQuant pipeline `liftedge quantize` runs (whitening, lifted
search, 4 correction epochs, 64 x 512 calibration tokens), at the rates the device plan gives
those layers; the rest of the pack is synthetic at the same plan (`liftedge.synthetic`). The
build, verification and runtime then run on real LiftQuant tensors for those blocks; the other
blocks' costs are the synthetic ones, so totals are extrapolated, as `scale.md` says.

    python benchmarks/scale_real_blocks.py quantize --shape llama-3.2-3b --device cuda --out DIR
        -> DIR/real-<i>.safetensors (each under 16 MiB, what a lent GPU machine hands back) + DIR/real.json
        (--from-block K --blocks N: the sites of blocks K..N-1 only, blocks before K run unquantized,
        so a block's ~45 MB of tensors comes back per call)
    .venv/bin/python benchmarks/scale_real_blocks.py pack --real DIR [DIR ...] --out PACK
        -> PACK, buildable with `liftedge build PACK --target android --ram 4GB`
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

FILE_LIMIT = 15 << 20   # bytes per returned file (the device tool hands back files of at most 16 MiB)


def device_plan(shape: str, target: str, ram: str):
    from liftedge.synthetic import prior_plan

    return prior_plan(shape, device=target, ram=ram, runtime="executorch")


def quantize(args) -> None:
    from liftedge.correct import CorrectionConfig
    from liftedge.model import list_sites, load_model
    from liftedge.planner import plan_configs
    from liftedge.quantize.pipeline import quantize_streaming
    from liftedge.shapes import write_checkpoint
    from safetensors.torch import save_file

    plan = device_plan(args.shape, args.target, args.ram)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(args.shape, Path(tmp) / "model", seed=args.seed, layers=args.blocks)
        loaded = load_model(folder)
        chosen = {s.name for s in list_sites(loaded.model)
                  if s.block is not None and args.from_block <= s.block < args.blocks}
        configs = {name: cfg for name, cfg in plan_configs(plan.plan, seed=args.seed).items() if name in chosen}
        loaded.model.to(args.device)
        gen = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(0, loaded.model.config.vocab_size, (args.samples, args.seq_len), generator=gen)
        t = time.perf_counter()
        qtensors, report = quantize_streaming(loaded, tokens.to(args.device), configs,
                                              CorrectionConfig(epochs=args.epochs, seed=args.seed), keep_decoded=False)
        seconds = time.perf_counter() - t
    files, chunk, size = [], {}, 0
    for name in sorted(qtensors):
        for field, tensor in qtensors[name].tensors.items():
            tensor = tensor.detach().cpu().contiguous()
            if chunk and size + tensor.nbytes > FILE_LIMIT:
                files.append(chunk)
                chunk, size = {}, 0
            chunk[f"{name}.{field}"], size = tensor, size + tensor.nbytes
    files.append(chunk)
    for i, tensors in enumerate(files):
        save_file(tensors, str(out / f"real-{i}.safetensors"))
    (out / "real.json").write_text(json.dumps({
        "shape": args.shape, "device_plan": f"{args.target} {args.ram}",
        "blocks": list(range(args.from_block, args.blocks)), "seed": args.seed,
        "samples": args.samples, "seq_len": args.seq_len, "correction_epochs": args.epochs,
        "compute": args.device if args.device == "cpu" else torch.cuda.get_device_name(0), "seconds": round(seconds, 1),
        "block_seconds": [b["seconds"] for b in report.blocks],
        "sites": {name: {"fmt": qt.fmt, "meta": qt.meta} for name, qt in qtensors.items()}}, indent=1, default=str))
    print(f"{len(qtensors)} sites of blocks {args.from_block}..{args.blocks - 1} in {seconds:.0f} s -> {len(files)} "
          f"file(s) in {out}")


def pack(args) -> None:
    from liftedge.synthetic import write_synthetic_pack
    from liftedge.types import QuantizedTensor
    from safetensors.torch import load_file

    real, blocks, record = {}, [], {}
    for real_dir in map(Path, args.real):
        record = json.loads((real_dir / "real.json").read_text())
        tensors = {}
        for f in sorted(real_dir.glob("real-*.safetensors")):
            tensors.update(load_file(str(f)))
        real.update({name: QuantizedTensor(s["fmt"], {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                                                      if k.rsplit(".", 1)[0] == name}, s["meta"])
                     for name, s in record["sites"].items()})
        blocks += record["blocks"]
    plan = device_plan(record["shape"], *record["device_plan"].split())
    write_synthetic_pack(record["shape"], plan, args.out, seed=record["seed"], real=real, force=True)
    print(f"wrote {args.out}: {len(real)} real sites (blocks {sorted(blocks)}), the rest synthetic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("quantize", "pack"))
    ap.add_argument("--shape", default="llama-3.2-3b")
    ap.add_argument("--target", default="android")
    ap.add_argument("--ram", default="4GB")
    ap.add_argument("--blocks", type=int, default=1, help="quantize: blocks before this index")
    ap.add_argument("--from-block", type=int, default=0, help="quantize: first block whose sites are quantized")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", nargs="+", help="pack: folders `quantize` wrote")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    quantize(args) if args.step == "quantize" else pack(args)


if __name__ == "__main__":
    main()
