#!/usr/bin/env bash
# The main job on the built-in default, from a fresh clone: set up, quantize SmolLM2-135M
# with LiftQuant, inspect the pack, build it for a 4 GB Android phone (an ExecuTorch .pte
# with liftedge's lift-project kernel, verified against the PyTorch reference in the real
# ExecuTorch runtime), and compare the pack with the float model.
#
#   bash examples/quickstart.sh            # LiftQuant at 2.4 bits/weight (LQ-24/10)
#   BITS=3 bash examples/quickstart.sh     # any rate on the shipped menu (1.5 to 4 bits)
#
# (`liftedge build default --target android --ram 4GB -o OUT` plans the rates itself; on a
# 4 GB phone a 135M model fits in fp16, so the quickstart fixes the rate to show LiftQuant.)
#
# No user files are needed: the model is fetched and checksummed by liftedge, and the
# calibration text is sampled from the model itself (data-free). The evaluation text is a
# second, independently seeded sample from the model (a quick sanity check, not a benchmark:
# use `liftedge eval PACK --text wiki.test.raw` for published-protocol perplexity).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
. .venv/bin/activate
out=out/quickstart
bits=${BITS:-2.4}
mkdir -p "$out"
liftedge quantize default --method liftquant --bits "$bits" --samples "${SAMPLES:-32}" --seq-len 256 \
  --epochs 2 -o "$out/smollm2-lq" --force
liftedge inspect "$out/smollm2-lq"
liftedge build "$out/smollm2-lq" --target android --ram 4GB --max-context 512 -o "$out/android" --force
python examples/sample_text.py default --samples 4 --seq-len 512 --seed 1 -o "$out/eval.txt"
liftedge eval "$out/smollm2-lq" --text "$out/eval.txt" --ctx 512 --json | tee "$out/eval.json"
