#!/usr/bin/env bash
# The project's health on one GPU in one command (`make gpu-check`): the CUDA kernel tests, the
# benchmark sections, a short train.py run and a timed sample.py, in priority order under one
# deadline. Everything lands in one folder: summary.txt (a table of every step, then the tail of
# each), full.log, and the bench JSONs named <section>-<card>.json for benchmarks/.
#
#   make gpu-check                        # GPU_CHECK_S=540 (seconds), GPU_CHECK_OUT=gpu-check
#   GPU_CHECK_S=300 GPU_CHECK_OUT=$OUT bash tools/gpu_check.sh
set -u
PY=${PY:-python3}
DEADLINE=${GPU_CHECK_S:-540}
OUT=${GPU_CHECK_OUT:-gpu-check}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
CARD=$($PY -c "import torch; n = torch.cuda.get_device_name(0).lower(); print('h200' if 'h200' in n else 'h100' if 'h100' in n else n.split()[-1])" 2>/dev/null) \
  || { echo "gpu_check: no CUDA GPU visible to $PY" >&2; exit 2; }
SUMMARY=$OUT/summary.txt TABLE=$OUT/.table LOG=$OUT/full.log
: > "$TABLE"; : > "$LOG"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null; date -u +%FT%TZ; } > "$OUT/.header" 2>&1

source "$(dirname "$0")/steps.sh"

: > "$OUT/.tails"
B="$PY tools/bench.py"
step tests     120 $PY -m pytest -q -p no:cacheprovider -m gpu_check -k cuda tests/
step step      150 $B --only step --step-configs 0 --step-compile --step-iters 10 --out "$OUT/step-$CARD.json"
step sample     90 $B --only sample --out "$OUT/sample-$CARD.json"
step attention 150 $B --only attention --out "$OUT/attention-$CARD.json"
step rmsnorm    60 $B --only rmsnorm --out "$OUT/rmsnorm-$CARD.json"
step qknorm     60 $B --only qknorm --out "$OUT/qknorm-rope-$CARD.json"
TAIL=6 step train 90 $PY train.py --config base --stage mofo --steps 30 --batch-size 32 --log-every 10 \
  --save-every 30 --sample-steps 2 --out "$OUT/.run"
TAIL=8 step sample-cli 60 bash -c "for i in 1 2; do /usr/bin/time -f 'sample.py wall %e s' $PY sample.py \
  --ckpt $OUT/.run --mode joint --steps 50 --prompt 'a red sphere left of a blue box' --out $OUT/.s\$i; done; \
  cat $OUT/.s2/metadata.json | grep -A5 timings"

{ cat "$OUT/.header"; echo; echo "step             verdict        time"; cat "$TABLE"; echo; cat "$OUT/.tails"; } > "$SUMMARY"
rm -rf "$OUT/.run" "$OUT"/.s? "$OUT/.step" "$OUT/.table" "$OUT/.tails" "$OUT/.header"
cat "$SUMMARY"
