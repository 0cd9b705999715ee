#!/usr/bin/env bash
# How the SmolLM2 quality tables in benchmarks/results/ were produced on a lent GPU machine
# (torch + transformers preinstalled there, no package registry, no liftedge install).
#
# The GGUF (98 MB) travels in two parts under .devdata/ (ignored by git), because one call
# carries at most 64 MiB; part 0 is copied to /tmp by a first call ("stage"), part 1 comes
# with the second ("run"). liftedge is put on PYTHONPATH with targets/ and devices/ mapped as
# `pip install` maps them. Results are written to $OUT (fetched back by the device tool).
#
#   gpu_session.sh stage                       copy part 0, install wheels
#   gpu_session.sh run CONFIG...               one quality.py process -> $OUT/quality.json
#   gpu_session.sh sens                        the sensitivity table -> $OUT/sensitivity.json
#   gpu_session.sh plan SHAPE...               `liftedge plan --sensitivity measure --device cuda` on
#                                              shape-true checkpoints (benchmarks/plan_measure.py)
#                                              -> $OUT/plan_measure.json; no GGUF needed
#   gpu_session.sh qt SHAPE...                 LiftQuant throughput, 2 blocks, 4 correction epochs
#                                              (benchmarks/quantize_throughput.py) -> $OUT/qt.json
#   gpu_session.sh par "CONFIG CONFIG" "..."   one quality.py process per group, side by side on
#                                              the one GPU (a 135M model leaves it mostly idle)
#                                              -> $OUT/quality_<i>.json; SAMPLES=N overrides 128;
#                                              PP=DIR keeps two trees run at once apart
set -euo pipefail
step=${1:?usage: gpu_session.sh stage|run|sens|plan|qt|par ...}
shift
pythonpath() {  # liftedge importable as `pip install` lays it out
  local pp=${PP:-/tmp/pp}
  rm -rf "$pp" && mkdir -p "$pp" && cp -r liftedge "$pp/" && cp -r targets "$pp/liftedge/targets" \
    && cp -r devices "$pp/liftedge/devices"
  export PYTHONPATH=$pp:.${PYTHONPATH:+:$PYTHONPATH} LIFTEDGE_CACHE=/tmp/lecache LIFTEDGE_NO_PROGRESS=1
}
if [ "$step" = plan ]; then
  pythonpath
  unset LIFTEDGE_NO_PROGRESS  # the log shows each phase's progress
  for shape in "$@"; do
    # SAMPLES / SEQ_LEN override the plan's calibration defaults; STOP_AFTER=S records a partial row;
    # CACHE=DIR keeps the plan's cache there (carry it to the next call: the plan resumes from it)
    python benchmarks/plan_measure.py --shape "$shape" --device cuda --checkpoint "/tmp/ckpt-$shape" \
      --log "$OUT/plan_$shape.log" --out "$OUT/plan_measure.json" ${SAMPLES:+--samples $SAMPLES} \
      ${SEQ_LEN:+--seq-len $SEQ_LEN} ${STOP_AFTER:+--stop-after $STOP_AFTER} ${CACHE:+--cache $CACHE}
  done
  exit 0
fi
if [ "$step" = qt ]; then
  pythonpath
  python benchmarks/quantize_throughput.py --device cuda --shapes "$(IFS=,; echo "$*")" --layers 2 --epochs 4 \
    --samples 64 --seq-len 512 --out "$OUT/qt.json"
  exit 0
fi
if [ "$step" = stage ]; then
  cp .devdata/smol.part00 /tmp/smol.part00
  python -m pip install -q --no-deps .devdata/gguf-*.whl 2>&1 | grep -v "Running pip as" || true
  # peers (benchmarks/peers.py): hqq and coremltools wheels fetched here with `pip download`
  if [ -d .devdata/wheels ]; then
    python -m pip install -q --no-deps --no-index .devdata/wheels/*.whl 2>&1 | grep -v "Running pip as" || true
    python -m pip install -q --no-index --find-links .devdata/wheels/coremltools coremltools==9.0 2>&1 | grep -v "Running pip as" || true
  fi
  python -c "import torch, transformers, gguf; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
  exit 0
fi
cat /tmp/smol.part00 .devdata/smol.part01 > /tmp/smol.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/smol.gguf" | sha256sum -c -
pythonpath
samples=${SAMPLES:-128}
if [ "$step" = sens ]; then
  python benchmarks/sensitivity.py --model /tmp/smol.gguf --device cuda --samples "$samples" --seq-len 512 \
    --calib .devdata/valid.tokens.txt --out "$OUT/sensitivity.json"
  cp "$OUT/sensitivity.json" /tmp/sensitivity.json
  exit 0
fi
quality() {  # quality OUT CONFIG...
  local out=$1; shift
  local args=()
  for c in "$@"; do args+=(--config "$c"); done
  python benchmarks/quality.py --model /tmp/smol.gguf --device cuda --windows 16 --ctx 2048 \
    --samples "$samples" --seq-len 512 --calib .devdata/valid.tokens.txt --eval-text .devdata/wiki.test.raw \
    "${args[@]}" --out "$out"
}
if [ "$step" = par ]; then
  i=0
  for group in "$@"; do
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=${THREADS:-4} quality "$OUT/quality_$i.json" $group > "$OUT/log_$i.txt" 2>&1 &
    i=$((i + 1))
  done
  wait
  exit 0
fi
quality "$OUT/quality.json" "$@"
