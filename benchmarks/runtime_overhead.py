"""Calibrate the memory model's runtime-overhead term: what a runtime holds beyond the model.

For each artifact, a fresh child process imports the runtime, records its resident set
(`baseline`: the interpreter and the runtime's code), loads the artifact, prefills
`--prompt` tokens and decodes `--decode` more, and records its peak resident set (VmHWM).
The memory model already counts the weights (the artifact's tensor bytes), the KV cache
and the activation arena, so

    runtime overhead = (peak - baseline) - weights - KV cache at the last position - activation arena

is what the runtime itself adds (allocator slack, planned buffers, kernel workspaces,
graph/session structures). The host app's own baseline on a phone (the part the Python
interpreter stands for here) is not measurable on this machine and stays an estimate in
`liftedge.memory`.

    .venv/bin/python benchmarks/runtime_overhead.py \
        --pte OUT/android/model.pte --onnx OUT/android-ort/model.onnx [--prompt 32 --decode 16]

Writes benchmarks/results/runtime_overhead.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from liftedge.io import atomic_write_bytes, atomic_write_json
from liftedge.memory import ModelDims, activation_arena_nbytes

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20

CHILD = r'''
import json, sys
from pathlib import Path
from liftedge.profile.host import current_rss_nbytes, peak_rss_nbytes
runtime, path, prompt, decode = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if runtime == "executorch":
    from liftedge.targets.executorch.runtime import calls_custom_op, pte_step
    import executorch.runtime  # noqa: F401  (its code is part of the baseline)
    from liftedge.targets.executorch.kernel import load_library
    load_library()
    baseline = current_rss_nbytes()
    step = pte_step(path, calls_custom_op(path), max_prefill=int(sys.argv[5]), max_context=int(sys.argv[6]))
else:
    import onnxruntime  # noqa: F401
    from liftedge.targets.onnxruntime.session import make_step, open_session
    baseline = current_rss_nbytes()
    step = make_step(open_session(path, threads=1))
loaded = current_rss_nbytes()
ids = [(7 * i + 11) % 1000 for i in range(prompt)]
tok = int(step(ids, 0)[-1].argmax())
for i in range(decode):
    tok = int(step([tok], prompt + i)[-1].argmax())
print(json.dumps({"baseline_rss": baseline, "after_load_rss": loaded, "peak_rss": peak_rss_nbytes()}))
'''


def _report(artifact: Path) -> dict:
    path = artifact.parent / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _dims(artifact: Path) -> ModelDims:
    report = _report(artifact)
    pack = Path(report.get("pack", {}).get("path", ""))
    config = artifact.parent / "config.json"
    config = config if config.is_file() else pack / "config.json"
    return ModelDims.from_config(json.loads(config.read_text()))


def weight_nbytes(runtime: str, artifact: Path) -> int:
    """Tensor bytes of the artifact: ONNX initializers, or the .pte's size (constants dominate it)."""
    if runtime == "onnxruntime":
        from liftedge.profile.bound import onnx_weight_nbytes

        return onnx_weight_nbytes(artifact)
    return artifact.stat().st_size


def measure(runtime: str, artifact: Path, prompt: int, decode: int, max_context: int) -> dict:
    argv = [sys.executable, "-c", CHILD, runtime, str(artifact), str(prompt), str(decode), str(prompt),
            str(max_context)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"{runtime} child failed:\n{res.stderr[-3000:]}")
    rss = json.loads(res.stdout.strip().splitlines()[-1])
    dims = _dims(artifact)
    # ExecuTorch programs hold a static fp32 cache of max_context positions; ORT's cache grows
    # to the last position (fp32, as the genai convention exports it).
    positions = max_context if runtime == "executorch" else prompt + decode
    kv = dims.kv_cache_nbytes(positions, 32)
    arena = activation_arena_nbytes(dims, positions, prompt, 32)
    weights = weight_nbytes(runtime, artifact)
    increment = rss["peak_rss"] - rss["baseline_rss"]
    return {"artifact": str(artifact), **rss, "increment": increment, "weights": weights, "kv_cache": kv,
            "kv_positions": positions, "activation_arena": arena,
            "runtime_overhead": increment - weights - kv - arena}


def markdown(result: dict) -> str:
    lines = ["# Runtime overhead measured on this machine (x86_64 Linux, Python runtimes)", "",
             f"Prompt {result['prompt']} tokens, {result['decode']} decoded; MiB.", "",
             "| runtime | baseline RSS | peak RSS | increment | weights | KV cache | activation arena | runtime overhead |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["runtimes"].items():
        cells = [r[k] / MIB for k in ("baseline_rss", "peak_rss", "increment", "weights", "kv_cache",
                                       "activation_arena", "runtime_overhead")]
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    lines += ["", result["note"], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pte", type=Path, default=None)
    ap.add_argument("--onnx", type=Path, default=None)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=None, help="the .pte's KV length (default: its report)")
    ap.add_argument("--out", type=Path, default=RESULTS / "runtime_overhead")
    args = ap.parse_args(argv)
    runtimes = {}
    if args.pte is not None:
        ctx = args.max_context or int(_report(args.pte).get("options", {}).get("max_context", 256))
        runtimes["executorch"] = measure("executorch", args.pte, args.prompt, args.decode, ctx)
    if args.onnx is not None:
        runtimes["onnxruntime"] = measure("onnxruntime", args.onnx, args.prompt, args.decode, 0)
    result = {"prompt": args.prompt, "decode": args.decode, "runtimes": runtimes,
              "note": "runtime overhead = peak - baseline - weights - KV - arena; the baseline (interpreter + "
                      "runtime code) stands for the host app, which liftedge.memory keeps as an estimate. "
                      "Memory is not a timing: measurements under CPU contention are valid."}
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_bytes(args.out.with_suffix(".md"), markdown(result).encode())
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
