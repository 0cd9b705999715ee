"""ExecuTorch on this CPU: liftedge custom-op .pte vs fallback vs fp32 and 8da4w XNNPACK.

Builds four `.pte` files of the same model (the pack's weights) and runs each in its own
subprocess (the real ExecuTorch runtime), timing prefill and decode and reading the child's
peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss` in the child):

| variant    | linear layers                                   | embedding / head          |
|------------|-------------------------------------------------|---------------------------|
| custom_op  | liftedge::lq_linear (C++ kernel, packed signs), | fp16 embedding; head per --head |
|            | norms, gated MLPs, residual adds fused (`fusion.py`) |                           |
| custom_op_unfused | the same without `fusion.py` (what it saves) | same                  |
| fallback   | stock-op lift-project (bit unpack in the graph) | same                      |
| fp32       | XNNPACK fp32 on the pack's dequantized weights  | fp32                      |
| 8da4w      | torchao int4 g32 + int8 dynamic act, XNNPACK    | same as custom_op         |

`--head int8` (default): the head is XNNPACK's int8 linear (`modules.int8_head`) in every
program, so the comparison is of the decoder blocks (builds keep a pack's fp16 head: an int8
head changes SmolLM2's greedy tokens; see `export.ExportOptions.int8_head`); `--head fp16`:
liftedge::fp16_linear over the tied fp16 table. Every
program computes the head on the last position only (`export.export_program`).

It also measures this machine's copy bandwidth (numpy, 256 MiB) and reports, per variant,
the bytes read per decoded token (constant weights the decode touches: all linears and the
head, one embedding row) and the bound bandwidth / bytes. Load average before/after each
run is recorded and `contended` is set when another process was using the CPU. With
`--rounds N` the timed runs alternate between the variants N times (A B A B ...) and each
figure is the median of its rounds, so a slow minute of the shared host (this is a VM; its
neighbours do not show in the load average) does not land on one variant only; every round is
kept in the JSON.

    .venv/bin/python benchmarks/executorch_bench.py --pack PACK   (e.g. a pack from `liftedge quantize default --rate 24/10 -o PACK`)
        [--prefill 64] [--decode 32] [--variants custom_op,fallback,fp32,8da4w] [--head int8|fp16]
        [--rounds 1] [--reuse --workdir DIR]
Writes benchmarks/results/executorch_bench.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("custom_op", "custom_op_unfused", "fallback", "fp32", "8da4w")
CHILD = r'''
import json, sys, time, torch
from pathlib import Path
from liftedge.profile.host import peak_rss_nbytes
from liftedge.targets.executorch.runtime import load_method
path, needs, prefill, decode, vocab = Path(sys.argv[1]), sys.argv[2] == "1", *map(int, sys.argv[3:6])
method = load_method(path, needs)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, min(vocab, 1000), (1, prefill), generator=g)
t0 = time.perf_counter(); (logits,) = method.execute([ids, torch.arange(prefill)]); t1 = time.perf_counter()
tok = int(logits[0, -1].argmax()); times = []
for i in range(decode):
    s = time.perf_counter()
    (logits,) = method.execute([torch.tensor([[tok]]), torch.tensor([prefill + i])])
    times.append(time.perf_counter() - s); tok = int(logits[0, -1].argmax())
times.sort()
print(json.dumps({"prefill_s": t1 - t0, "prefill_tokens_per_s": prefill / (t1 - t0),
                  "decode_tokens_per_s": len(times) / sum(times), "decode_median_ms": 1e3 * times[len(times) // 2],
                  "peak_rss_mb": peak_rss_nbytes() / 2**20}))
'''


def copy_bandwidth_gbs(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best of `repeats` numpy copies: (read + write) bytes / time, in GB/s (`liftedge.profile.host`)."""
    from liftedge.profile.host import measure_bandwidth_gbs

    return measure_bandwidth_gbs("copy", nbytes, repeats)


def dense_model(pack: Path, fp16_embeddings: bool, int8_head: bool = False):
    """The pack's model with every quantized site as a plain fp32 nn.Linear (dequantized)."""
    import torch

    from liftedge.packed import load_packed, read_quantized, replace_module
    from liftedge.targets.executorch import export
    from liftedge.targets.reference import dequantize

    from liftedge.upcast import widen

    loaded = load_packed(pack)
    model = widen(loaded.model)  # the pack's fp16 layers as float32 Linears too (8da4w quantizes them)
    for name, qt in read_quantized(pack).items():
        old = model.get_submodule(name)
        lin = torch.nn.Linear(qt.meta["in_features"], qt.meta["out_features"], bias=getattr(old, "bias", None) is not None)
        with torch.no_grad():
            lin.weight.copy_(dequantize(qt))
            if lin.bias is not None:
                lin.bias.copy_(old.bias)
        replace_module(model, name, lin)
    if fp16_embeddings:
        export.swap_embeddings(model, {}, int8_head=int8_head)
    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    return model.eval()


def build_variant(variant: str, pack: Path, out: Path, opts) -> dict:
    import torch

    from liftedge.targets.executorch import export

    if variant in ("custom_op", "custom_op_unfused", "fallback"):
        opts = export.ExportOptions(variant != "fallback", opts.max_context, opts.max_prefill, opts.int8_head,
                                    fuse_blocks=variant == "custom_op")
        _, model, _ = export.prepare_model(pack, opts)
    else:
        model = dense_model(pack, fp16_embeddings=(variant == "8da4w"), int8_head=opts.int8_head)
    if variant == "8da4w":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        layers = model.get_decoder().layers
        quantize_(layers, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                 weight_granularity=PerGroup(32)))
    t = time.perf_counter()
    data, counts = export.to_pte(export.export_program(model, opts))
    out.write_bytes(data)
    return {"pte_bytes": len(data), "build_s": time.perf_counter() - t,
            "custom_op_calls": sum(v for k, v in counts.items() if k.startswith("liftedge.")),
            "delegates": counts.get("executorch_call_delegate", 0)}


def bytes_per_token(variant: str, pack: Path, pte_bytes: int, int8_head: bool) -> int:
    """Constant bytes one decode step reads: the program's weights less the embedding table
    (one row of it is read), plus that table again when the head reads it (tied fp16 head;
    the int8 head has its own copy, already in the program's bytes)."""
    from transformers import AutoConfig

    from liftedge.profile.bound import pte_weight_nbytes

    cfg = AutoConfig.from_pretrained(str(pack))
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and not (int8_head and variant != "fp32")
    return pte_weight_nbytes(pte_bytes, cfg.vocab_size, cfg.hidden_size, tied,
                             table_itemsize=4 if variant == "fp32" else 2)


def run_child(pte: Path, needs_kernel: bool, prefill: int, decode: int, vocab: int) -> dict:
    load0 = os.getloadavg()[0]
    res = subprocess.run([sys.executable, "-c", CHILD, str(pte), "1" if needs_kernel else "0", str(prefill),
                          str(decode), str(vocab)], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        return {"error": res.stderr[-2000:]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["loadavg_1min_before"], out["loadavg_1min_after"] = load0, os.getloadavg()[0]
    return out


def median_run(runs: list[dict]) -> dict:
    """One variant's rounds: each timing the median over rounds (peak RSS and load: the max), all rounds kept."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    med = lambda k: sorted(r[k] for r in ok)[len(ok) // 2]  # noqa: E731
    out = {k: med(k) for k in ("prefill_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_median_ms")}
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    out["loadavg_1min_before"] = max(r["loadavg_1min_before"] for r in ok)
    out["loadavg_1min_after"] = max(r["loadavg_1min_after"] for r in ok)
    out["rounds"] = runs
    return out


def paired_ratios(a: list[dict], b: list[dict]) -> dict[str, list[float]]:
    """a / b per round (runs i of both, taken one after the other)."""
    pairs = [(x, y) for x, y in zip(a, b) if "error" not in x and "error" not in y]
    return {k: [x[f"{k}_tokens_per_s"] / y[f"{k}_tokens_per_s"] for x, y in pairs] for k in ("decode", "prefill")}


def cpu_line() -> str:
    """The CPU model and the vector extensions the kernels can use (XNNPACK picks its int8 kernels
    by them at run time: AVX-512 VNNI roughly doubled 8da4w here against an AVX2-only host)."""
    from liftedge.profile.host import host_key

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        flags = set()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512vbmi", "avx_vnni", "asimddp", "i8mm")
    return f"{host_key()['cpu']} ({' '.join(f for f in wanted if f in flags) or 'flags unknown'})"


def main(argv=None) -> int:
    from liftedge.targets.executorch import export

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", required=True, help="the LiftQuant pack folder to build")
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--max-context", type=int, default=256)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--head", choices=("int8", "fp16"), default="int8",
                    help="head of the custom_op, fallback and 8da4w programs (default: int8, the same in all)")
    ap.add_argument("--workdir", default=None, help="keep the .pte files here (default: a temp folder)")
    ap.add_argument("--reuse", action="store_true", help="reuse <workdir>/<variant>.pte files that exist")
    ap.add_argument("--build-only", action="store_true",
                    help="write <workdir>/<variant>.pte and stop (time them later with --reuse on an idle machine)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="timed runs per variant, alternating between variants; medians are reported")
    ap.add_argument("--out", default=str(RESULTS / "executorch_bench"), help="results path without suffix")
    args = ap.parse_args(argv)
    pack = Path(args.pack)
    opts = export.ExportOptions(True, args.max_context, max(args.prefill, 2), args.head == "int8")
    variants = [v for v in args.variants.split(",") if v]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="et-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth_gbs()
    manifest = json.loads((pack / "manifest.json").read_text())
    rows, ptes = {}, {}
    for v in variants:
        pte = work / f"{v}.pte"
        if args.reuse and pte.exists():
            from liftedge.targets.executorch.runtime import calls_custom_op

            info = {"pte_bytes": pte.stat().st_size, "reused": True, "custom_op_calls": int(calls_custom_op(pte))}
        else:
            info = build_variant(v, pack, pte, opts)
        if args.build_only:
            print(v, "built", pte, flush=True)
            continue
        rows[v], ptes[v] = info, pte
    vocab = json.loads((pack / "config.json").read_text())["vocab_size"]
    runs = {v: [] for v in rows}
    for _ in range(max(1, args.rounds)):
        for v, info in rows.items():
            runs[v].append(run_child(ptes[v], info["custom_op_calls"] > 0, args.prefill, args.decode, vocab))
            print(v, json.dumps(runs[v][-1]), flush=True)
    for v, info in rows.items():
        info.update(median_run(runs[v]))
        info["bytes_per_decoded_token"] = bytes_per_token(v, pack, info["pte_bytes"], opts.int8_head)
        info["decode_bound_tokens_per_s"] = bandwidth * 1e9 / info["bytes_per_decoded_token"]
    if args.build_only:
        return 0
    loads = [r.get(k, 0) for r in rows.values() for k in ("loadavg_1min_before", "loadavg_1min_after")]
    result = {"pack": str(pack), "pack_totals": manifest["totals"], "prefill_tokens": args.prefill,
              "decode_tokens": args.decode, "rounds": max(1, args.rounds), "max_context": args.max_context,
              "cpu_count": os.cpu_count(), "cpu": cpu_line(),
              "head": args.head, "prefill_logits": "last position only", "threads": os.cpu_count(),  # ExecuTorch's threadpool: one thread per core
              "copy_bandwidth_gbs": bandwidth, "variants": rows,
              # The bench's own single-threaded export ends just before each timed run and keeps the
              # 1-minute load average near 1.0 by itself; half a core more means another process.
              "contended": max(loads, default=0) > 1.5,
              "contention_note": "load average sampled before/after each run (the bench's own export just "
                                 "before holds it near 1.0); contended = some sample above 1.5 (another "
                                 "process shared the CPU: timings are not clean)"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [f"# ExecuTorch on this CPU ({r['cpu_count']} cores{', CONTENDED' if r['contended'] else ''})", "",
             f"Pack `{r['pack']}`; prefill {r['prefill_tokens']} tokens, decode {r['decode_tokens']}; "
             f"median of {r.get('rounds', 1)} alternating round(s) per variant; CPU {r.get('cpu', 'not recorded')}; "
             f"copy bandwidth {r['copy_bandwidth_gbs']:.1f} GB/s; head {r.get('head', 'fp16')}; "
             f"prefill logits: {r.get('prefill_logits', 'every position')}; threads {r.get('threads', r['cpu_count'])}.", "",
             "| variant | .pte MB | prefill tok/s | decode tok/s | bound tok/s | MB/token | peak RSS MB | load before/after |",
             "|---|---|---|---|---|---|---|---|"]
    for v, x in r["variants"].items():
        if "error" in x:
            lines.append(f"| {v} | {x['pte_bytes'] / 1e6:.1f} | error | | | | | |")
            continue
        lines.append(f"| {v} | {x['pte_bytes'] / 1e6:.1f} | {x['prefill_tokens_per_s']:.1f} | "
                     f"{x['decode_tokens_per_s']:.2f} | {x['decode_bound_tokens_per_s']:.1f} | "
                     f"{x['bytes_per_decoded_token'] / 1e6:.1f} | {x['peak_rss_mb']:.0f} | "
                     f"{x['loadavg_1min_before']:.1f}/{x['loadavg_1min_after']:.1f} |")
    v = r["variants"]
    if all(k in v and "error" not in v[k] for k in ("custom_op", "8da4w")):
        lines += ["", "LQ (custom_op) / 8da4w: decode {:.2f}x, prefill {:.2f}x (ratio of the medians).".format(
            v["custom_op"]["decode_tokens_per_s"] / v["8da4w"]["decode_tokens_per_s"],
            v["custom_op"]["prefill_tokens_per_s"] / v["8da4w"]["prefill_tokens_per_s"])]
        paired = paired_ratios(v["custom_op"].get("rounds", []), v["8da4w"].get("rounds", []))
        if len(paired["decode"]) > 1:
            lines += ["Round by round (each custom_op run against the 8da4w run right after it, so a drift of "
                      "the shared host's speed cancels): decode {}, median {:.2f}x; prefill median {:.2f}x.".format(
                          ", ".join(f"{x:.2f}x" for x in paired["decode"]),
                          sorted(paired["decode"])[len(paired["decode"]) // 2],
                          sorted(paired["prefill"])[len(paired["prefill"]) // 2])]
    if all(k in v and "error" not in v[k] for k in ("custom_op", "custom_op_unfused")):
        paired = paired_ratios(v["custom_op"].get("rounds", []), v["custom_op_unfused"].get("rounds", []))
        if paired["decode"]:
            lines += ["", "What `fusion.py` saves (custom_op / custom_op_unfused, round by round): decode {}, "
                      "median {:.2f}x; prefill median {:.2f}x.".format(
                          ", ".join(f"{x:.2f}x" for x in paired["decode"]),
                          sorted(paired["decode"])[len(paired["decode"]) // 2],
                          sorted(paired["prefill"])[len(paired["prefill"]) // 2])]
    lines += ["", r["contention_note"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
