"""How fast can lift-project layers run in stock ONNX Runtime operators? One layer shape, one token.

The ONNX Runtime target has no custom operator (no ORT C API header in a registry these
machines reach; see kernel_bench.md), so its LQ layers are stock operators. ONNX has no
operator that multiplies by a packed-bit matrix: the ±1 sign matrix [W, out] (W = lifted
width = D/d x in) must exist as a tensor of >= 8-bit elements before a MatMul can use it, and
when the file keeps the signs packed (what gives LiftQuant its size) the graph re-creates that
tensor on every call. This bench times the forms on one layer shape, 1 thread, against the
4-bit baseline (MatMulNBits) and the fp32 matmul of the same dense layer:

| form            | graph                                                                    |
|-----------------|--------------------------------------------------------------------------|
| fp32_gather     | Cast + Gather(256x8 ±1 float table, packed bytes) -> [W, out] fp32 -> MatMul    |
|                 | (the target's lowering today)                                            |
| int8_gather     | Gather(256x8 ±1 int8 table) -> [W, out] int8; u -> DynamicQuantizeLinear |
|                 | -> MatMulInteger -> Cast -> Mul (int8 MACs, 4x fewer bytes materialised) |
| dense_fp32      | MatMul with a dense fp32 [in, out] weight (no lift)                      |
| matmulnbits4    | com.microsoft MatMulNBits, 4 bit, block 32 (the model it must beat)      |

The lift itself (u = M-lift of the transformed input) is small and left out of every form, so
the LQ figures are lower bounds on a real layer's time.

Usage: python benchmarks/ort_stock_forms.py [--in 576] [--out 1536] [--rate 24/10] [--repeats 200]
Writes benchmarks/results/ort_stock_forms.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _model(nodes, inputs, outputs, inits, opset_ms: bool = False) -> bytes:
    from onnx import helper

    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("com.microsoft", 1)] if opset_ms else [])
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def forms(n_in: int, n_out: int, D: int, d: int, layers: int, seed: int = 0) -> dict:
    """name -> (serialized model, feed): `layers` independent layers `n_in` -> `n_out` (each with
    its own weights, so that together they do not stay in the CPU caches, as in a real model)
    applied to one token, at LQ-D/d for the LQ forms."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    width8 = -(-(-(-n_in // d) * D) // 8) * 8
    bits = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(np.int8) * 2 - 1  # [256, 8]
    u = rng.standard_normal((1, width8), dtype=np.float32)
    x = rng.standard_normal((1, n_in), dtype=np.float32)
    f = helper.make_tensor_value_info
    arr = numpy_helper.from_array
    lq_in = [f("u", TensorProto.FLOAT, ["n", width8])]
    dense_in = [f("x", TensorProto.FLOAT, ["n", n_in])]
    # The packed bytes pass through a Reshape whose shape depends on the input (as the target's
    # graph does), so ONNX Runtime cannot constant-fold the unpack into a dense matrix at load.
    common = [helper.make_node("Shape", ["u"], ["ushape"], end=1), helper.make_node("Sub", ["ushape", "ushape"], ["zero"])]
    tables = {"fp32_gather": arr(bits.astype(np.float32), "table"), "int8_gather": arr(bits, "table")}
    nodes = {"fp32_gather": list(common), "int8_gather": list(common) + [
        helper.make_node("DynamicQuantizeLinear", ["u"], ["uq", "us", "uz"])], "dense_fp32": [], "matmulnbits4": []}
    inits = {k: [] for k in nodes}
    inits["fp32_gather"].append(tables["fp32_gather"])
    inits["int8_gather"].append(tables["int8_gather"])
    outs = {k: [] for k in nodes}
    for i in range(layers):
        packed = rng.integers(0, 256, size=(width8 // 8, n_out), dtype=np.uint8)  # byte g, column r: signs 8g..8g+7
        scale = rng.random(n_out, dtype=np.float32) + 0.5
        w = (rng.standard_normal((n_in, n_out), dtype=np.float32) / np.sqrt(n_in)).astype(np.float32)
        for name in ("fp32_gather", "int8_gather"):
            inits[name] += [arr(packed, f"packed{i}"), arr(scale, f"scale{i}"),
                            arr(np.array(packed.shape, np.int64), f"pshape{i}"),
                            arr(np.array([width8, n_out], np.int64), f"shape{i}")]
            nodes[name] += [helper.make_node("Add", [f"pshape{i}", "zero"], [f"rt{i}"]),
                            helper.make_node("Reshape", [f"packed{i}", f"rt{i}"], [f"prt{i}"]),
                            helper.make_node("Cast", [f"prt{i}"], [f"idx{i}"], to=TensorProto.INT32),
                            helper.make_node("Gather", ["table", f"idx{i}"], [f"g{i}"], axis=0),
                            helper.make_node("Transpose", [f"g{i}"], [f"gt{i}"], perm=[0, 2, 1]),
                            helper.make_node("Reshape", [f"gt{i}", f"shape{i}"], [f"S{i}"])]
        nodes["fp32_gather"] += [helper.make_node("MatMul", ["u", f"S{i}"], [f"p{i}"]),
                                 helper.make_node("Mul", [f"p{i}", f"scale{i}"], [f"y{i}"])]
        nodes["int8_gather"] += [helper.make_node("MatMulInteger", ["uq", f"S{i}", "uz"], [f"pi{i}"]),
                                 helper.make_node("Cast", [f"pi{i}"], [f"pf{i}"], to=TensorProto.FLOAT),
                                 helper.make_node("Mul", [f"pf{i}", "us"], [f"p{i}"]),
                                 helper.make_node("Mul", [f"p{i}", f"scale{i}"], [f"y{i}"])]
        inits["dense_fp32"].append(arr(w, f"w{i}"))
        nodes["dense_fp32"].append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        node, extra = _matmulnbits(w, i, helper, arr)
        nodes["matmulnbits4"].append(node)
        inits["matmulnbits4"] += extra
        for k in outs:
            outs[k].append(f("y%d" % i, TensorProto.FLOAT, None))
    built = {}
    for name in nodes:
        lq = name.endswith("gather")
        built[name] = (_model(nodes[name], lq_in if lq else dense_in, outs[name], inits[name],
                              opset_ms=name == "matmulnbits4"), {"u": u} if lq else {"x": x})
    return built


def _matmulnbits(w: np.ndarray, i: int, helper, arr, block: int = 32):
    """MatMulNBits node (4 bit, block 32, symmetric RTN codes, zero point 8) of the dense weight."""
    n_in, n_out = w.shape
    blocks = -(-n_in // block)
    wt = np.zeros((n_out, blocks * block), np.float32)
    wt[:, :n_in] = w.T
    wb = wt.reshape(n_out, blocks, block)
    scales = np.abs(wb).max(axis=2) / 7.0 + 1e-12
    codes = np.clip(np.round(wb / scales[..., None]) + 8, 0, 15).astype(np.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["x", f"B{i}", f"scales{i}"], [f"y{i}"], domain="com.microsoft",
                            K=n_in, N=n_out, bits=4, block_size=block)
    return node, [arr(packed, f"B{i}"), arr(scales.astype(np.float32), f"scales{i}")]


def session(model: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def check_int8_form(built: dict) -> float:
    """Relative error of the int8 form against the fp32 form (same signs, same u): the graphs
    compute the same product, up to u's 8-bit dynamic quantization (~1% of the largest output)."""
    (m32, feed), (m8, _) = built["fp32_gather"], built["int8_gather"]
    y32, y8 = session(m32).run(None, feed)[0], session(m8).run(None, feed)[0]
    return float(np.abs(y8 - y32).max() / np.abs(y32).max())


def time_form(model: bytes, feed: dict, repeats: int) -> float:
    """Median ms of one session.run (1 intra-op thread), after warm-up."""
    sess = session(model)
    for _ in range(10):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in", dest="n_in", type=int, default=576)
    ap.add_argument("--out", dest="n_out", type=int, default=1536)
    ap.add_argument("--rate", default="24/10", help="D/d of the lifted code")
    ap.add_argument("--layers", type=int, default=28, help="independent layers per run (together past the caches)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--results", default=str(RESULTS / "ort_stock_forms"))
    args = ap.parse_args(argv)
    D, d = (int(v) for v in args.rate.split("/"))
    load = os.getloadavg()[0]
    built = forms(args.n_in, args.n_out, D, d, args.layers)
    int8_error = check_int8_form(built)
    if int8_error > 0.05:  # 8-bit u gives ~1e-2; O(1) means the graph is wrong, and its time means nothing
        raise SystemExit(f"int8 form disagrees with the fp32 form (rel. error {int8_error:.3f})")
    ms = {name: time_form(model, feed, args.repeats) for name, (model, feed) in built.items()}
    result = {"shape": [args.n_in, args.n_out], "layers": args.layers, "rate": args.rate, "threads": 1, "ms": ms,
              "int8_form_rel_error": int8_error,
              "vs_matmulnbits4": {k: ms["matmulnbits4"] / v for k, v in ms.items()},
              "loadavg_1min_before": load, "loadavg_1min_after": os.getloadavg()[0],
              "contended": max(load, os.getloadavg()[0]) > 1.5}
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    lines = [f"# Lift-project layers in stock ONNX Runtime operators ({args.n_in} -> {args.n_out}, "
             f"LQ-{args.rate}, {args.layers} layers, 1 token, 1 thread{', CONTENDED' if result['contended'] else ''})", "",
             "| form | ms (all layers) | speed vs MatMulNBits 4-bit |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {result['vs_matmulnbits4'][k]:.2f}x |" for k, v in ms.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
