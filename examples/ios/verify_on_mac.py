"""Run a liftedge Core ML package with Core ML on a Mac and compare it with the PyTorch reference.

    python examples/ios/verify_on_mac.py ARTIFACT_DIR PACK_DIR [--tokens 32] [--compute-units cpuOnly]

ARTIFACT_DIR is what `liftedge build --target coreml` wrote (model.mlpackage + report.json);
PACK_DIR is the pack it was built from. The script prefills the verification prompt, decodes
greedily with the package's stateful KV cache (`MLModel.make_state()`), does the same with
the pack's reference model, and prints the comparison of `liftedge.verify.compare` (logits
relative error, token-for-token agreement) plus prefill and decode times. It exits non-zero
if the package fails.

Needs macOS 15+ (iOS 18-era Core ML: states, constexpr_lut_to_dense with uint1) and this
repository installed (`pip install -e .`, coremltools 9). It CANNOT run on Linux: coremltools
has no Core ML runtime there, which is why the build itself verifies the read-back program
with a numpy interpreter instead. It was therefore not run while this target was written.

It feeds the package as swift-transformers' stateful `LanguageModel` does (inputIds [1, T],
causalMask [1, 1, T, E] with E - T the first position, states keyCache / valueCache), with
the triangular mask of the Core ML examples.

Tolerance: the program computes in fp32 with an fp16 KV cache. On the CPU compute unit Core
ML keeps fp32, so the error should match the build's report (~1e-3); the GPU and Neural
Engine compute in fp16 and need a looser tolerance (pass --tolerance 5e-2 for `all`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

COMPUTE_UNITS = {"cpuOnly": "CPU_ONLY", "cpuAndGPU": "CPU_AND_GPU", "cpuAndNeuralEngine": "CPU_AND_NE", "all": "ALL"}


def coreml_step(package: Path, compute_units: str, max_prefill: int, timings: list):
    """A `liftedge.verify` step function over Core ML (one MLState per prompt)."""
    import coremltools as ct
    from liftedge.targets.coreml.runtime import step_function

    model = ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]))
    holder = {"state": model.make_state()}

    def reset() -> None:
        holder["state"] = model.make_state()

    def predict(feed: dict[str, np.ndarray]) -> np.ndarray:
        start = time.perf_counter()
        out = model.predict(feed, state=holder["state"])["logits"]
        timings.append((feed["inputIds"].shape[1], time.perf_counter() - start))
        return out

    return step_function(predict, reset, max_prefill)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("pack", type=Path)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--compute-units", choices=sorted(COMPUTE_UNITS), default="cpuOnly")
    parser.add_argument("--tolerance", type=float, default=None, help="default: the build's tolerance")
    args = parser.parse_args(argv)

    from liftedge.targets.coreml.program import PACKAGE_NAME
    from liftedge.targets.coreml.runtime import TOLERANCE

    from liftedge.packed import load_packed
    from liftedge.verify import (
        VerificationError,
        compare,
        greedy,
        prompt_ids,
        reference_along,
    )

    report = json.loads((args.artifact / "report.json").read_text())
    loaded = load_packed(args.pack)
    prompt = prompt_ids(loaded.tokenizer)
    timings: list[tuple[int, float]] = []
    step = coreml_step(args.artifact / PACKAGE_NAME, args.compute_units, report["runtime"]["max_prefill"], timings)
    got = greedy(step, prompt, args.tokens)
    ref = reference_along(loaded.model, prompt, got.tokens)
    try:
        record = compare(got, ref, args.tolerance or TOLERANCE, what=f"Core ML ({args.compute_units})")
    except VerificationError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    prefill = sum(t for n, t in timings if n > 1)
    decode = [t for n, t in timings if n == 1]
    record["prefill_seconds"] = round(prefill, 4)
    record["decode_tokens_per_second"] = round(len(decode) / sum(decode), 2) if decode else None
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
