#!/usr/bin/env bash
# The paper's three claims in miniature, in one command on one GPU (`make gpu-train`): pre-render a
# pool of training scenes, pre-train text-to-image, post-train with depth three ways, evaluate
# held-out scenes, and judge
#   (a) sparse LiDAR-like depth reaches an i2d AbsRel within 1.25x of dense depth;
#   (b) joint sampling RGB-first (log2 alpha = +5) gives more self-consistent depth than
#       depth-first (-5);
#   (c) t2i pre-training beats training from scratch at equal MoFo steps.
# Runs in priority order under one deadline; a training cut short by it saves (SIGINT) and the
# claims then say which runs stopped early. Results in one folder, six files: claims.md,
# claims.json (with every evaluation's summary.json), joint_samples.png (joint RGB + depth beside
# the held-out scenes), i2d_worst.png, summary.txt (every step's time and tail) and full.log.
#
#   make gpu-train                                  # GPU_TRAIN_S=540 s, GPU_TRAIN_OUT=gpu-train
#   SEED=1 make gpu-train                           # the same with other initial weights and noise
#   CONFIG=tiny T2I_STEPS=4 MOFO_STEPS=4 BATCH=4 N_EVAL=4 GEN_STEPS=2 DEVICE=cpu bash tools/gpu_train.sh
set -u
PY=${PY:-python3}
DEADLINE=${GPU_TRAIN_S:-540}
OUT=${GPU_TRAIN_OUT:-gpu-train}
CONFIG=${CONFIG:-small} T2I_STEPS=${T2I_STEPS:-1500} MOFO_STEPS=${MOFO_STEPS:-1200} BATCH=${BATCH:-64}
LR=${LR:-1e-3} N_EVAL=${N_EVAL:-256} GEN_STEPS=${GEN_STEPS:-30} DEVICE=${DEVICE:-auto} SEED=${SEED:-0}
POOL=${POOL:-12000}  # training scenes pre-rendered once: rendering per batch would starve the GPU
COMPILE=${COMPILE:---no-compile}  # four short runs: each would pay torch.compile's warm-up
KERNELS=${KERNELS:-torch}  # nor Triton's autotuning of each new shape (BENCHMARKS.md: it costs more here)
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
RUNS=$OUT/.runs TABLE=$OUT/.table LOG=$OUT/full.log
mkdir -p "$RUNS"; : > "$TABLE"; : > "$LOG"; : > "$OUT/.tails"

source "$(dirname "$0")/steps.sh"  # step NAME MAX_SECONDS CMD...

TRAIN="$PY train.py --config $CONFIG --data shards --data-path $RUNS/scenes --batch-size $BATCH --lr $LR --seed $SEED \
  --decay 0.3 --device $DEVICE --kernels $KERNELS $COMPILE --log-every 100 --sample-steps 10"
EVAL="$PY evaluate.py --data scenes --n $N_EVAL --offset 64 --gen-steps $GEN_STEPS --device $DEVICE --kernels $KERNELS"
mofo() {  # mofo NAME [train.py flags...]: MoFo post-training, saved only at its end
  local name=$1; shift
  TAIL=6 step "$name" 105 $TRAIN --stage mofo --steps "$MOFO_STEPS" --save-every "$MOFO_STEPS" --out "$RUNS/$name" "$@"
}
evaluate() {  # evaluate NAME CKPT [evaluate.py flags...]
  local name=$1 ckpt=$2; shift 2
  [[ -e $RUNS/$ckpt/latest ]] && TAIL=6 step "eval-$name" 50 $EVAL --ckpt "$RUNS/$ckpt" --out "$OUT/$name" "$@"
}

RES=$($PY -c "import mofo; print(mofo.PRESETS['$CONFIG'].res)")
TAIL=3 step scenes 40 $PY tools/render_shards.py --n "$POOL" --res "$RES" --workers "$(nproc)" --out "$RUNS/scenes"
TAIL=6 step t2i 90 $TRAIN --stage t2i --steps "$T2I_STEPS" --save-every "$T2I_STEPS" --out "$RUNS/t2i"
mofo dense --init "$RUNS/t2i"
evaluate dense dense --tasks i2d,joint --log2-alpha 5
evaluate depth-first dense --tasks joint --log2-alpha -5
mofo lidar --init "$RUNS/t2i" --sparse lidar
evaluate lidar lidar --tasks i2d
mofo scratch
evaluate scratch scratch --tasks i2d

$PY - "$OUT" "$RUNS" <<'EOF' > "$OUT/claims.md"
"""Judge the three claims on the evaluations' per-image numbers (same held-out scenes in every
evaluation, so differences are paired): a claim holds when its margin is below 0 by more than two
standard errors (and 0.1 AbsRel points), fails when above by as much, else it is within the noise;
not measured where an evaluation is missing."""
import csv, json, math, os, statistics, sys
out, runs = sys.argv[1:3]

def per_image(name, key):
    path = os.path.join(out, name, "per_image.csv")
    if not os.path.exists(path):
        return None
    return [float(r[key]) for r in csv.DictReader(open(path)) if r.get(key) not in (None, "", "nan")]

def steps(run):
    latest = os.path.join(runs, run, "latest")
    if not os.path.exists(latest):
        return None
    ckpt = os.path.join(runs, run, open(latest).read().strip())
    return json.load(open(os.path.join(ckpt, "train_state.json")))["step"]

def claim(label, rule, a, b, margin):
    """a, b: per-image values (or None); margin(a_i, b_i) < 0 where the claim holds for image i."""
    if not a or not b or len(a) != len(b):
        return {"claim": label, "rule": rule, "means": None, "verdict": "not measured"}
    m = [margin(x, y) for x, y in zip(a, b)]
    mean, se = statistics.mean(m), (statistics.stdev(m) / math.sqrt(len(m)) if len(m) > 1 else math.inf)
    if abs(mean) < 1e-3:  # under 0.1 AbsRel points: no difference worth a verdict
        verdict = "within the noise"
    else:
        verdict = "holds" if mean + 2 * se < 0 else "does not hold" if mean - 2 * se > 0 else "within the noise"
    return {"claim": label, "rule": rule, "means": [statistics.mean(a), statistics.mean(b)],
            "margin": mean, "margin_se": se, "n": len(m), "verdict": verdict}

claims = [
    claim("(a) i2d AbsRel, sparse LiDAR-like vs dense depth", "sparse <= 1.25 x dense",
          per_image("lidar", "abs_rel"), per_image("dense", "abs_rel"), lambda s, d: s - 1.25 * d),
    claim("(b) joint self-consistency AbsRel, RGB-first (+5) vs depth-first (-5)", "RGB-first < depth-first",
          per_image("dense", "joint_self_abs_rel"), per_image("depth-first", "joint_self_abs_rel"), lambda r, d: r - d),
    claim("(c) i2d AbsRel, t2i pre-trained vs from scratch", "pre-trained < scratch",
          per_image("dense", "abs_rel"), per_image("scratch", "abs_rel"), lambda p, s: p - s),
]
summaries = {n: json.load(open(os.path.join(out, n, "summary.json")))
             for n in ("dense", "depth-first", "lidar", "scratch") if os.path.exists(os.path.join(out, n, "summary.json"))}
record = {"claims": claims, "steps": {r: steps(r) for r in ("t2i", "dense", "lidar", "scratch")},
          "evaluations": summaries}
json.dump(record, open(os.path.join(out, "claims.json"), "w"), indent=1)
print("| claim | rule | means (AbsRel x100) | margin x100 (2 SE) | verdict |\n|---|---|---|---|---|")
for c in claims:
    if c["means"] is None:
        print(f"| {c['claim']} | {c['rule']} | not measured | | not measured |")
    else:
        print(f"| {c['claim']} | {c['rule']} | {100 * c['means'][0]:.2f} / {100 * c['means'][1]:.2f} | "
              f"{100 * c['margin']:+.2f} ({200 * c['margin_se']:.2f}) | {c['verdict']} |")
plane = summaries.get("dense", {}).get("baselines", {}).get("plane", {}).get("abs_rel")
print(f"\nsteps reached: {record['steps']}; ground-truth-plane i2d baseline "
      f"{'not measured' if plane is None else f'{100 * plane:.2f}'}")
EOF

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse --short HEAD 2>/dev/null; date -u +%FT%TZ
  echo "CONFIG=$CONFIG T2I_STEPS=$T2I_STEPS MOFO_STEPS=$MOFO_STEPS BATCH=$BATCH LR=$LR N_EVAL=$N_EVAL GEN_STEPS=$GEN_STEPS SEED=$SEED $COMPILE --kernels $KERNELS"
  echo; echo "step             verdict        time   (a training TIMED OUT saved the step it reached)"; cat "$TABLE"; echo; cat "$OUT/claims.md"; echo; cat "$OUT/.tails"
} > "$OUT/summary.txt"
# Few files come back from a lent machine: the pictures, then the evaluation folders go.
[[ -f $OUT/dense/samples.png ]] && cp "$OUT/dense/samples.png" "$OUT/joint_samples.png"
[[ -f $OUT/dense/worst.png ]] && cp "$OUT/dense/worst.png" "$OUT/i2d_worst.png"
rm -rf "$RUNS" "$OUT/.step" "$OUT/.table" "$OUT/.tails" "$OUT/dense" "$OUT/depth-first" "$OUT/lidar" "$OUT/scratch"
cat "$OUT/summary.txt"
