# mofo: the two commands a newcomer needs are `make demo` and `make test`; both install first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
DEMO    := runs/demo
# The CPU demo: tiny preset at 32x32, text-to-image pre-training then depth post-training, on a
# pool of pre-rendered scenes (rendering every batch afresh costs about a third of the CPU; the
# pool gives ~1.6x the steps in the same time, results/demo.md). Both stages run at batch 8: at
# this size a quarter of the batch buys three to four times the steps in the same minutes, and the
# model learns depth faster that way (results/demo.md, "Batch 8" for the MoFo stage, "Seeds, batch
# 4 and width" for the t2i stage). The MoFo stage cools the learning rate down over its last half,
# and its AdamW forgets squared gradients faster than train.py's default (beta2 0.9 against 0.99):
# better on each of three seeds (results/demo.md, "AdamW's beta2, and variants that did not help").
# Training runs in bf16 autocast on a GPU or a CPU with bf16 in hardware (AVX512-BF16 or AMX), in
# fp32 elsewhere: emulated bf16 is 8x slower than fp32 (results/demo.md, "A CPU without native bf16").
# Dense depth by default: in ~10 CPU-minutes sparse LiDAR-like depth teaches the tiny model much
# less (README, Results). Override on the command line, e.g. `make demo DEMO_SPARSE=lidar`.
DEMO_CONFIG ?= tiny
DEMO_SCENES ?= 8000
DEMO_RES ?= 32
DEMO_T2I_STEPS ?= 2400
DEMO_T2I_BATCH ?= 8
DEMO_STEPS ?= 6000
DEMO_BATCH ?= 8
DEMO_SPARSE ?= none
DEMO_BETA2 ?= 0.9
DEMO_DTYPE ?= $(shell $(PY) -c "import common; print('bf16' if common.bf16_is_fast(common.pick_device()) else 'fp32')")
# Sampling settings measured on held-out scenes (results/sampling.md): i2d in one step (the
# posterior-mean estimate), joint at guidance 3 (a wider margin over a random caption than 2 with
# the depth still matching the image; at 4 it breaks), d2i at 7.
DEMO_I2D_STEPS ?= 1
DEMO_GEN_STEPS ?= 30
DEMO_JOINT_CFG ?= 3
DEMO_D2I_CFG ?= 7

.PHONY: install demo test test-slow train sample bench gpu-check gpu-train clean

install: $(STAMP)

# torch: the CUDA build from PyPI where a driver is present (it brings its own triton), otherwise
# the CPU wheel (the local +cpu wheel when the machine carries one, else PyTorch's CPU index) and
# triton 3.6.0 for the interpreter tests.
$(STAMP): requirements.txt
	@echo "== make install: creating .venv (one time; PyTorch is a large download)"
	python3 -m venv .venv
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "== installing torch 2.13.0 (CUDA build)"; \
	  .venv/bin/pip install --progress-bar on torch==2.13.0; \
	else \
	  echo "== installing torch 2.13.0 (CPU build) and triton 3.6.0"; \
	  { .venv/bin/pip install --progress-bar on "torch==2.13.0+cpu" 2>/dev/null || \
	    .venv/bin/pip install --progress-bar on torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; } && \
	  .venv/bin/pip install --progress-bar on triton==3.6.0; \
	fi
	@echo "== installing requirements.txt"
	.venv/bin/pip install --progress-bar on -r requirements.txt
	touch $(STAMP)
	@echo "== .venv ready: run scripts with .venv/bin/python (or: source .venv/bin/activate)"

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) tools/render_shards.py --n $(DEMO_SCENES) --res $(DEMO_RES) --out $(DEMO)/scenes
	$(PY) train.py --config $(DEMO_CONFIG) --stage t2i --data shards --data-path "$(DEMO)/scenes/*.tar" \
	  --num-workers 0 --steps $(DEMO_T2I_STEPS) --batch-size $(DEMO_T2I_BATCH) --lr 1e-3 --dtype $(DEMO_DTYPE) \
	  --save-every $(DEMO_T2I_STEPS) --log-every 400 --out $(DEMO)/t2i
	$(PY) train.py --config $(DEMO_CONFIG) --stage mofo --data shards --data-path "$(DEMO)/scenes/*.tar" \
	  --num-workers 0 --sparse $(DEMO_SPARSE) --steps $(DEMO_STEPS) --decay 0.5 --batch-size $(DEMO_BATCH) \
	  --lr 1e-3 --beta2 $(DEMO_BETA2) --dtype $(DEMO_DTYPE) --save-every $(DEMO_STEPS) --log-every 500 --init $(DEMO)/t2i --out $(DEMO)/mofo
	$(PY) sample.py --ckpt $(DEMO)/mofo --mode joint --steps $(DEMO_GEN_STEPS) --cfg $(DEMO_JOINT_CFG) \
	  --out $(DEMO)/joint --prompt "a red sphere left of a blue box on a checkered floor"
	$(PY) data.py --scene 0 --split test --res 32 --out $(DEMO)/heldout
	$(PY) sample.py --ckpt $(DEMO)/mofo --mode i2d --image $(DEMO)/heldout/rgb.png --steps $(DEMO_I2D_STEPS) \
	  --out $(DEMO)/i2d
	$(PY) sample.py --ckpt $(DEMO)/mofo --mode d2i --depth $(DEMO)/heldout/depth.npy --steps $(DEMO_GEN_STEPS) \
	  --cfg $(DEMO_D2I_CFG) --out $(DEMO)/d2i --prompt "$$(cat $(DEMO)/heldout/caption.txt)"
	$(PY) evaluate.py --ckpt $(DEMO)/mofo --data scenes --n 64 --steps $(DEMO_I2D_STEPS) \
	  --gen-steps $(DEMO_GEN_STEPS) --batch-size 32 --out $(DEMO)/eval

train: $(STAMP)
	$(PY) train.py $(ARGS)

sample: $(STAMP)
	$(PY) sample.py $(ARGS)

bench: $(STAMP)
	$(PY) tools/bench.py --out bench.json

# The project's health on a GPU machine in one command: CUDA kernel tests, benchmarks, a short
# training run and a timed sample, under one deadline (GPU_CHECK_S seconds) into GPU_CHECK_OUT.
GPU_CHECK_S ?= 540
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	GPU_CHECK_S=$(GPU_CHECK_S) GPU_CHECK_OUT=$(GPU_CHECK_OUT) PY=$(if $(wildcard $(PY)),$(PY),python3) bash tools/gpu_check.sh

# The paper's claims in miniature on a GPU machine: t2i, then MoFo dense / LiDAR-like / from scratch,
# held-out evaluations and a verdict per claim, under one deadline (GPU_TRAIN_S) into GPU_TRAIN_OUT.
GPU_TRAIN_S ?= 540
GPU_TRAIN_OUT ?= gpu-train
gpu-train:
	GPU_TRAIN_S=$(GPU_TRAIN_S) GPU_TRAIN_OUT=$(GPU_TRAIN_OUT) PY=$(if $(wildcard $(PY)),$(PY),python3) bash tools/gpu_train.sh

clean:
	rm -rf runs outputs eval_out .pytest_cache
