"""ONNX Runtime on this CPU: the liftedge model vs an fp32 export and a 4-bit MatMulNBits model.

Three `.onnx` files of SmolLM2-135M with the same decoder graph (`targets/onnxruntime/graph`),
each run in its own subprocess (real onnxruntime, graph optimisations on), timing prefill and
decode and reading the child's peak RSS (`ru_maxrss`):

| variant   | linear layers                                           | embedding / head            |
|-----------|---------------------------------------------------------|-----------------------------|
| liftedge  | lift-project in stock ops over packed signs (the pack)  | fp16, tied, stored once     |
| fp32      | MatMul on the float weights (`load_model("default")`)   | fp32                        |
| mnb4      | fp32 model through ORT's MatMulNBitsQuantizer (4 bit, block 32, RTN) | 4-bit head, fp32 Gather |

It also measures this machine's read bandwidth (numpy sum over 256 MiB) and reports, per
variant, the bytes the decode must read per token (initializers, minus tables only gathered
from) and the bound bandwidth / bytes. Load average is recorded around every run and
`contended` is set when other processes were using the CPU (numbers then are not claims).

    .venv/bin/python benchmarks/onnxruntime_bench.py --pack PACK   (e.g. a pack from `liftedge quantize default --rate 24/10 -o PACK`)
        [--prefill 64] [--decode 32] [--threads 1] [--workdir /tmp/liftedge-ort-bench]
Writes benchmarks/results/onnxruntime_bench.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CHILD = r'''
import json, sys, time
import numpy as np

def peak_rss_mb():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the (large) parent.
    from liftedge.profile.host import peak_rss_nbytes
    return peak_rss_nbytes() / 2**20

from liftedge.targets.onnxruntime.session import make_step, open_session
path, prefill, decode, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter(); session = open_session(path, threads); load_s = time.perf_counter() - t0
rng = np.random.default_rng(0)
prompt = [int(i) for i in rng.integers(100, 10000, prefill)]
step = make_step(session)
t0 = time.perf_counter(); logits = step(prompt, 0); prefill_s = time.perf_counter() - t0
token = int(np.argmax(logits[-1])); t0 = time.perf_counter()
for i in range(decode):
    token = int(np.argmax(step([token], prefill + i)[-1]))
decode_s = time.perf_counter() - t0
print(json.dumps({"load_s": load_s, "prefill_tokens_per_s": prefill / prefill_s,
                  "decode_tokens_per_s": decode / decode_s,
                  "peak_rss_mb": peak_rss_mb()}))
'''


def float_model(path: Path) -> Path:
    """The fp32 baseline: SmolLM2's float weights in the same decoder graph, MatMul per linear."""
    import onnx
    from liftedge.targets.onnxruntime.builder import FLOAT
    from liftedge.targets.onnxruntime.graph import DecoderBuilder

    from liftedge.model import load_model

    loaded = load_model("default")
    params = {k: v.detach().float().numpy() for k, v in loaded.model.state_dict().items()}

    class Fp32Builder(DecoderBuilder):
        def f32(self, name):
            return self.b.initializer(name, self.params[name].astype(np.float32))

        def linear(self, x, site):
            w = self.b.initializer(f"{site}.weight_t", np.ascontiguousarray(self.params[f"{site}.weight"].T))
            y = self.b.op("MatMul", [x, w], name=site)
            bias = self.params.get(f"{site}.bias")
            return y if bias is None else self.b.op("Add", [y, self.f32(f"{site}.bias")], name=f"{site}/bias")

        def head(self, x):
            return self.linear(x, "lm_head")

    params.setdefault("lm_head.weight", params["model.embed_tokens.weight"])
    builder = Fp32Builder(loaded.config, params, {})
    model = builder.build()
    for t in model.graph.initializer:  # the Gather table in fp32 too (the baseline is all fp32)
        if t.name == "model.embed_tokens.weight":
            t.CopyFrom(onnx.numpy_helper.from_array(params[t.name].astype(np.float32), t.name))
    for n in model.graph.node:
        if n.name == "embed/float":
            n.attribute[0].i = FLOAT
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


def mnb4_model(src: Path, path: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=False, bits=4)
    quant.process()
    onnx.save(quant.model.model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


def liftedge_model(pack: Path, workdir: Path) -> Path:
    from liftedge.lowering import build_artifact

    out = workdir / "liftedge"
    if not (out / "model.onnx").is_file():
        build_artifact(pack, "onnxruntime", out, options={"ort": "no", "new_tokens": 8}, force=True)
    return out / "model.onnx"


def read_bytes_per_token(path: Path) -> int:
    """Initializer bytes a decode step reads: all, except tables consumed only by Gather."""
    from liftedge.profile.bound import onnx_weight_nbytes

    return onnx_weight_nbytes(path)


def bandwidth_gbs() -> float:
    """Best of 5 numpy sums over 256 MiB (read bandwidth, GB/s; `liftedge.profile.host`)."""
    from liftedge.profile.host import measure_bandwidth_gbs

    return measure_bandwidth_gbs("read")


def run_child(path: Path, prefill: int, decode: int, threads: int) -> dict:
    load_before = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(prefill), str(decode), str(threads)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec.update(loadavg_before=load_before, loadavg_after=os.getloadavg()[0])
    # Our child uses `threads` cores; a 1-minute load above that means other work shared the CPU.
    rec["contended"] = bool(max(load_before, rec["loadavg_after"]) > threads + 0.5)
    return rec


SITE_CHILD = r'''
import json, sys, time
import numpy as np, torch
from liftedge.packed import read_quantized
from liftedge.targets.onnxruntime import layers
from liftedge.targets.onnxruntime.builder import FLOAT, GraphBuilder
from liftedge.targets.onnxruntime.session import open_session
from liftedge.targets.reference import dequantize
pack, site, threads, tmp = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
qt = read_quantized(pack)[site]
n, out = qt.meta["in_features"], qt.meta["out_features"]
res = {}
for name in ("liftquant_stock", "fp32_matmul"):
    b = GraphBuilder(name)
    x = b.add_input("x", FLOAT, ["batch", "seq", n])
    ctx = layers.make_context(b)
    if name == "liftquant_stock":
        y = layers.emit_linear(ctx, x, site, qt)
    else:
        y = b.op("MatMul", [x, b.initializer("w_t", dequantize(qt).T.contiguous().numpy())])
    b.add_output(y, "y", FLOAT, ["batch", "seq", out])
    path = f"{tmp}/{name}.onnx"
    open(path, "wb").write(b.model().SerializeToString())
    sess = open_session(path, threads)
    xv = np.random.default_rng(0).standard_normal((1, 1, n), dtype=np.float32)
    sess.run(None, {"x": xv})
    t0 = time.perf_counter()
    for _ in range(30):
        sess.run(None, {"x": xv})
    res[name + "_ms"] = (time.perf_counter() - t0) / 30 * 1e3
print(json.dumps(res))
'''


def site_bench(pack: Path, site: str, threads: int, workdir: Path) -> dict:
    """One decode-shaped call (1 token) of a real site: the stock liftquant subgraph vs fp32 MatMul."""
    proc = subprocess.run([sys.executable, "-c", SITE_CHILD, str(pack), site, str(threads), str(workdir)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return {"site": site, **json.loads(proc.stdout.strip().splitlines()[-1]), "loadavg": os.getloadavg()[0]}


def write_md(result: dict, path: Path) -> None:
    lines = [f"# ONNX Runtime on this CPU ({result['cpu_count']} cores, {result['threads']} thread(s))", "",
             (f"Read bandwidth {result['bandwidth_gbs']:.1f} GB/s. Contended: {result['contended']} "
              "(load averages in the JSON)."), "",
             "| variant | file MB | bytes/token MB | bound tok/s | prefill tok/s | decode tok/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        if "error" in v:
            lines.append(f"| {name} | error: {v['error']} |||||")
            continue
        lines.append(f"| {name} | {v['file_mb']:.1f} | {v['bytes_per_token'] / 1e6:.1f} | {v['bound_tokens_per_s']:.1f} | "
                     f"{v['prefill_tokens_per_s']:.1f} | {v['decode_tokens_per_s']:.2f} | {v['peak_rss_mb']:.0f} |")
    lines += ["", f"One site, one token: {json.dumps(result['site_decode'])}", "", result["note"], ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", required=True, help="the LiftQuant pack folder to build")
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/liftedge-ort-bench")
    ap.add_argument("--variants", default="liftedge,fp32,mnb4")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = {"liftedge": liftedge_model(Path(args.pack), work)}
    fp32 = work / "fp32.onnx"
    if not fp32.is_file():
        float_model(fp32)
    paths["fp32"] = fp32
    paths["mnb4"] = work / "mnb4.onnx" if (work / "mnb4.onnx").is_file() else mnb4_model(fp32, work / "mnb4.onnx")
    bw = bandwidth_gbs()
    variants = {}
    for name in args.variants.split(","):
        rec = run_child(paths[name], args.prefill, args.decode, args.threads)
        files = [paths[name], *paths[name].parent.glob(paths[name].name + ".data")]
        rec["file_mb"] = sum(f.stat().st_size for f in files) / 1e6
        rec["bytes_per_token"] = read_bytes_per_token(paths[name])
        rec["bound_tokens_per_s"] = bw * 1e9 / rec["bytes_per_token"]
        variants[name] = rec
        print(name, json.dumps(rec), flush=True)
    site = site_bench(Path(args.pack), "model.layers.0.mlp.down_proj", args.threads, work)
    print("site", json.dumps(site), flush=True)
    result = {"site_decode": site, "cpu_count": os.cpu_count(), "threads": args.threads, "prefill_tokens": args.prefill,
              "decode_tokens": args.decode, "bandwidth_gbs": bw, "variants": variants,
              "contended": any(v.get("contended", True) for v in variants.values()),
              "note": ("The liftedge graph unpacks every sign matrix to float32 on each call (the packed "
                       "bytes stay packed in the file and in memory, but each decode step writes and reads "
                       "~1 GB of unpacked signs for SmolLM2), so it runs far below its bandwidth bound; a "
                       "custom-op kernel reading bits directly would close that gap, but the ORT wheel ships "
                       "no C headers to build one here. Tried as stock-op alternatives on a 576x3712 sign "
                       "matrix, 1 token, 1 thread, contended: 256x8 Gather unpack + MatMul 5.9 ms, byte-LUT "
                       "(8x256 partial sums + Gather + ReduceSum) 6.6 ms, 1-bit->2-bit codes + MatMulNBits "
                       "20-24 ms, fp32 MatMul of the dense weight 1.0 ms: the Gather unpack stays.")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "onnxruntime_bench.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    write_md(result, RESULTS / "onnxruntime_bench.md")


if __name__ == "__main__":
    main()
