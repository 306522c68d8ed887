"""
Train a Modality Forcing model: text-to-image pre-training, then depth post-training.

Single process (CPU or one GPU):
    .venv/bin/python train.py --config tiny --stage t2i  --data scenes --steps 300 --out runs/t2i
    .venv/bin/python train.py --config tiny --stage mofo --data scenes --steps 600 --out runs/mofo \\
        --init runs/t2i --sparse lidar
Several processes (DDP; gloo on CPU, nccl on CUDA), e.g. 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --config small --stage mofo ...
With --fsdp (the default for large and xl under torchrun) weights, gradients, AdamW state and
EMA are sharded over the ranks (FSDP2); --activation-checkpointing recomputes each block's
activations in the backward pass. SCALING.md has the memory arithmetic and the multi-node line.

--out is a run folder: ckpt_XXXXXXX/ checkpoints (checkpoint.py), a `latest` pointer, metrics.jsonl,
samples/ grids and loss.png. A run killed at any moment continues with --resume and ends with the
same weights as if it had never stopped (on the CPU to the last bits, but for a rare rounding
difference between processes; README): every random number of a step comes from a generator seeded
by (seed, step, rank), the data order is a function of the step, and checkpoints are published by
renaming. Ctrl-C or SIGTERM saves the current step first and prints the command that resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import data
import mofo
from checkpoint import (LATEST, empty_model, export_checkpoint, full_state_dict, is_sharded, load_checkpoint,
                        load_optimizer, load_sharded, model_from_state, resolve_checkpoint, save_checkpoint,
                        save_sharded_checkpoint)
from common import (HelpFormatter, UserError, cli, note_slow_bf16, pick_device, save_png, to_uint8, use_kernels,
                    wants_bf16, write_text)
from scenes import scene_captions

# -----------------------------------------------------------------------------
# Arguments

FSDP_PRESETS = ("large", "xl")  # sharding pays off (SCALING.md): xl does not fit an 80 GB GPU under DDP
EXAMPLE = """example:
  .venv/bin/python train.py --config tiny --stage t2i --steps 600 --out runs/t2i
  .venv/bin/python train.py --config tiny --stage mofo --steps 1200 --init runs/t2i --out runs/mofo"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a Modality Forcing model (t2i pre-training or depth post-training).",
                                epilog=EXAMPLE, formatter_class=HelpFormatter)
    p.add_argument("--config", default="tiny", choices=list(mofo.PRESETS), help="model preset")
    p.add_argument("--stage", default="mofo", choices=["t2i", "mofo"],
                   help="t2i: RGB only (pre-training); mofo: RGB + depth with per-modality noise")
    p.add_argument("--data", default="scenes", choices=list(data.DATA_KINDS),
                   help="scenes: built-in procedural renderer; manifest: jsonl file; shards: tar files")
    p.add_argument("--data-path", default=None, help="manifest .jsonl or shard glob (for --data manifest/shards)")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps of the run")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, pictures)")
    p.add_argument("--init", default=None, help="start from this checkpoint (a t2i one gains a depth stream)")
    p.add_argument("--resume", action="store_true", help="continue the run found in --out up to --steps")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="write the inference checkpoint of the run in --out (EMA only, bf16) into DIR and exit")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every K steps (and at the end)")
    p.add_argument("--sample-every", type=int, default=0, help="sample grid every K steps (0: at checkpoints)")
    p.add_argument("--log-every", type=int, default=10, help="progress line every K steps")
    p.add_argument("--batch-size", type=int, default=16, help="global batch size (split across ranks)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--decay", type=float, default=0.0, help="fraction of --steps at the end over which the "
                   "learning rate falls linearly to 0 (0: constant after the warm-up)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--beta2", type=float, default=0.99,
                   help="AdamW decay of the squared-gradient average (the CPU demo's MoFo stage: 0.9, results/demo.md)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm (0: off)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay per step of the weights used for sampling")
    p.add_argument("--ema-every", type=int, default=1, help="update the EMA every K steps (decay^K)")
    p.add_argument("--res", type=int, default=None, help="training resolution (default: the preset's)")
    p.add_argument("--sparse", default="none", choices=list(data.SPARSE_KINDS),
                   help="simulate sparse depth supervision (LiDAR scan lines or random pixels)")
    p.add_argument("--density", type=float, default=0.05, help="kept fraction for --sparse random")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="P(caption -> \"\") for CFG")
    p.add_argument("--distill-from", default=None,
                   help="frozen t2i checkpoint for self-distillation of the RGB head (RECIPE.md 3.3)")
    p.add_argument("--distill-weights", type=float, nargs=2, default=(1.0, 0.1), metavar=("HI", "LO"),
                   help="distillation weight at t_depth=1 and t_depth=0")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and every step's noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU (where bf16 is only fast with "
                        "AVX512-BF16 or AMX)")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="attention / QK-norm implementation: auto = Triton on CUDA")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block (default: on for CUDA, off on CPU)")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="shard weights, gradients, AdamW state and EMA over the ranks (FSDP2; needs torchrun; "
                        "bf16 weights in the forward on CUDA unless --dtype fp32). Default: on for "
                        f"{' and '.join(FSDP_PRESETS)} with more than one process")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="keep only each block's inputs for the backward pass and recompute the rest there")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loader processes per rank (default: from the CPU count)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps for the progress grids")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """With --resume, the saved run's arguments overridden only by the options given explicitly (e.g. --steps)."""
    args = build_parser().parse_args(argv)
    if args.resume:
        quiet = build_parser()
        for action in quiet._actions:  # defaults suppressed: what remains was typed by the user
            action.default = argparse.SUPPRESS
        given = vars(quiet.parse_args(argv))
        with open(os.path.join(resolve_checkpoint(args.out), "train_state.json")) as fh:
            saved = json.load(fh)["args"]
        args = argparse.Namespace(**{**vars(args), **saved, **given})
    for flag in ("steps", "batch_size", "save_every", "log_every", "grad_accum", "ema_every", "sample_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if (not 0 <= args.ema < 1 or not 0 <= args.beta2 < 1 or args.warmup < 0 or args.grad_clip < 0 or not 0 <= args.caption_dropout <= 1
            or not 0 <= args.decay <= 1):
        raise UserError("--ema and --beta2 must be in [0, 1), --caption-dropout and --decay in [0, 1], --warmup and "
                        "--grad-clip >= 0")
    patch = mofo.PRESETS[args.config].patch
    if args.res is not None and (args.res < patch or args.res % patch):
        raise UserError(f"--res {args.res} must be a positive multiple of the {args.config} patch size {patch}")
    if args.data != "scenes" and not args.data_path:
        raise UserError(f"--data {args.data} needs --data-path")
    distributed = "RANK" in os.environ
    if args.fsdp is None:
        args.fsdp = distributed and int(os.environ["WORLD_SIZE"]) > 1 and args.config in FSDP_PRESETS
    if args.fsdp and not distributed:
        raise UserError("--fsdp needs torchrun (one GPU: torchrun --standalone --nproc_per_node=1 train.py --fsdp ...)")
    if args.num_workers is None:
        args.num_workers = min(8, max(0, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) - 1))
    return args


# -----------------------------------------------------------------------------
# Distributed setup, data order


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). DDP only when launched by torchrun (RANK is set)."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class StepBatches(torch.utils.data.Sampler):
    """Index batches for steps start..steps-1 of one rank (`accum` micro-batches per step): the data
    order is a pure function of the step, so a resumed run sees exactly the samples the uninterrupted
    one would have. Global sample k of the run is index k of an infinite dataset (the procedural
    scenes), or of a finite one reshuffled every epoch by a generator seeded with (seed, epoch)."""

    def __init__(self, n: int | None, start: int, steps: int, batch: int, rank: int, world: int, seed: int,
                 accum: int = 1):
        self.n, self.start, self.steps, self.batch, self.rank, self.world, self.seed, self.accum = \
            n, start, steps, batch, rank, world, seed, accum
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, k: int) -> int:
        if self.n is None:
            return k
        epoch = k // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][k % self.n])

    def __iter__(self):
        for micro in range(self.start * self.accum, self.steps * self.accum):
            first = (micro * self.world + self.rank) * self.batch
            yield [self._index(first + j) for j in range(self.batch)]

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum


def collate_batch(items: list[dict], tok, text_len: int) -> dict:
    """Stack a list of samples and tokenize their captions, in the loader's worker processes."""
    batch = torch.utils.data.default_collate([{k: v for k, v in it.items() if k != "caption"} for it in items])
    batch["text"] = data.encode_text(tok, [it["caption"] for it in items], text_len)
    return batch


def make_loader(args, res: int, start: int, rank: int, world: int, micro_batch: int, collate, pin: bool):
    """An iterator of micro-batches (dicts of stacked tensors) from step `start` on."""
    common = dict(num_workers=args.num_workers, collate_fn=collate, pin_memory=pin)
    if args.data == "shards":
        ds = data.ShardDataset(args.data_path, res, rank=rank, world_size=world, sparse=args.sparse,
                               density=args.density, start=start * micro_batch * args.grad_accum, loop=True)
        return torch.utils.data.DataLoader(ds, batch_size=micro_batch, **common)
    ds = data.make_dataset(args.data, res, args.sparse, args.density, args.data_path)
    n = None if args.data == "scenes" else len(ds)
    sampler = StepBatches(n, start, args.steps, micro_batch, rank, world, args.seed, args.grad_accum)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, **common)


def step_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """All randomness of one micro-batch (noise levels, noise, caption dropout) for one rank,
    drawn on the device itself: nothing is made on the host and copied over."""
    return torch.Generator(device).manual_seed(((seed * 1_000_003 + step) * 4099 + rank) * 64 + micro)


def corpus_captions(args, n: int = 4000) -> list[str]:
    """Captions the BPE tokenizer is trained on (the first n of the training data)."""
    if args.data == "scenes":
        return scene_captions(n)
    if args.data == "manifest":
        return [row["caption"] for row in data.ManifestDataset(args.data_path, 8).rows[:n]]
    samples = iter(data.ShardDataset(args.data_path, 8, loop=False))
    return [s["caption"] for _, s in zip(range(n), samples)]


# -----------------------------------------------------------------------------
# Pictures: sample grid and loss curve, drawn with Pillow


@torch.no_grad()
def sample_grid(model, tok, items: list[dict], path: str, steps: int, dtype: str) -> None:
    """Rows of data samples: joint RGB | joint depth | true RGB | i2d depth | true depth."""
    ids = data.encode_text(tok, [it["caption"] for it in items], model.cfg.text_len)
    res = items[0]["rgb"].shape[-1]
    with autocast(model.img_in.weight.device, dtype):
        rgb, dep = mofo.sample(model, ids, mode="joint", steps=steps, cfg_scale=mofo.DEFAULT_CFG["joint"],
                               log2_alpha=5 if model.cfg.has_depth else None, res=res)
        if model.cfg.has_depth:
            gt = torch.stack([it["rgb"] for it in items])
            _, pred = mofo.sample(model, torch.zeros_like(ids), mode="i2d", rgb=gt, steps=steps)
    rows = []
    for b, it in enumerate(items):
        row = [to_uint8(rgb[b]), to_uint8(it["rgb"])]
        if dep is not None:
            row.insert(1, data.colorize_depth(mofo.denormalize_depth(dep[b]).cpu().numpy()))
            row.append(data.colorize_depth(mofo.denormalize_depth(pred[b]).cpu().numpy()))
            row.append(data.colorize_depth(it["depth"].numpy(), it["dense_valid"].numpy()))
        rows.append(row)
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    scale = max(1, 128 // res)  # small training images are hard to see at 1:1
    save_png(path, np.kron(grid, np.ones((scale, scale, 1), dtype=np.uint8)))


def plot_losses(metrics: list[dict], path: str, size: tuple[int, int] = (640, 360)) -> None:
    keys = [k for k in ("loss", "loss_rgb", "loss_depth", "loss_distill") if any(k in m for m in metrics)]
    colours = {"loss": (0, 0, 0), "loss_rgb": (214, 39, 40), "loss_depth": (31, 119, 180),
               "loss_distill": (44, 160, 44)}
    W, H, pad = size[0], size[1], 48
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    vals = [m[k] for m in metrics for k in keys if k in m and m[k] > 0]
    if len(metrics) < 2 or not vals:
        draw.text((pad, H // 2), "not enough points yet", fill="black")
    else:
        s0, s1 = metrics[0]["step"], max(metrics[-1]["step"], metrics[0]["step"] + 1)
        lo, hi = math.log10(min(vals)), math.log10(max(vals))
        hi = hi if hi > lo else lo + 1

        def xy(step: float, v: float) -> tuple[float, float]:
            return (pad + (step - s0) / (s1 - s0) * (W - 2 * pad),
                    H - pad - (math.log10(v) - lo) / (hi - lo) * (H - 2 * pad))
        draw.rectangle([pad, pad, W - pad, H - pad], outline="grey")
        for frac in (0, 0.5, 1):  # y ticks
            v = 10 ** (lo + frac * (hi - lo))
            draw.text((4, xy(s0, v)[1] - 6), f"{v:.3g}", fill="black")
        draw.text((pad, H - pad + 6), f"step {s0}", fill="black")
        draw.text((W - pad - 60, H - pad + 6), f"step {s1}", fill="black")
        for i, k in enumerate(keys):
            pts = [xy(m["step"], m[k]) for m in metrics if k in m and m[k] > 0]
            if len(pts) > 1:
                draw.line(pts, fill=colours[k], width=2)
            draw.text((pad + 8 + 110 * i, 8), k, fill=colours[k])
    save_png(path, np.asarray(img))


# -----------------------------------------------------------------------------
# Model, optimizer, one step


def autocast(device: torch.device, dtype: str = "auto"):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=wants_bf16(dtype, device))


def build_model(args, device):
    """(model, ema, tokenizer, start_step, resume_dir) for a fresh, --init or --resume run. An --fsdp run
    resumes with empty (meta-device) models: no rank reads the whole weights, each reads its own shards
    once the models are sharded (main: shard_model, then load_sharded)."""
    if args.resume:
        ckpt = resolve_checkpoint(args.out)
        if is_sharded(ckpt) != args.fsdp:
            raise UserError(f"{ckpt} was written {'with' if is_sharded(ckpt) else 'without'} --fsdp; "
                            f"resume it with --{'' if is_sharded(ckpt) else 'no-'}fsdp")
        if args.fsdp:
            model, tok = empty_model(ckpt)
            ema = copy.deepcopy(model)
        else:
            model, tok = load_checkpoint(ckpt, device, ema=False)
            ema, _ = load_checkpoint(ckpt, device, ema=True)
        with open(os.path.join(ckpt, "train_state.json")) as fh:
            return model, ema, tok, json.load(fh)["step"], ckpt
    if os.path.exists(os.path.join(args.out, LATEST)):
        raise UserError(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    # Seeded before any weight is created, --init included: add_depth_stream draws fresh weights
    # for the depth-only modules, and every run (and rank) must draw the same ones.
    torch.manual_seed(args.seed)
    if args.init:
        model, tok = load_checkpoint(args.init, "cpu", ema=True)
        if model.cfg.name != args.config:
            raise UserError(f"--init {args.init} is a {model.cfg.name} model but --config is {args.config}; "
                            f"pass --config {model.cfg.name}")
        if args.stage == "t2i" and model.cfg.has_depth:
            raise UserError(f"--init {args.init} has a depth stream; --stage t2i needs a t2i checkpoint")
        if args.stage == "mofo" and not model.cfg.has_depth:
            model = mofo.add_depth_stream(model)
        if args.res:
            model.cfg = dataclasses.replace(model.cfg, res=args.res).validate()
    else:
        tok = data.train_tokenizer(corpus_captions(args), args.vocab_size or mofo.PRESETS[args.config].vocab_size)
        overrides = {"has_depth": args.stage == "mofo", "vocab_size": tok.get_vocab_size()}
        model = mofo.MoFo(mofo.get_config(args.config, **overrides, **({"res": args.res} if args.res else {})))
    model = model.to(device)
    return model, copy.deepcopy(model), tok, 0, None


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """PyTorch's fused AdamW: one kernel for every tensor (under FSDP each rank steps its own shards)."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, args.beta2), weight_decay=args.weight_decay,
                             fused=True)


def blocks(model: mofo.MoFo) -> list[torch.nn.Module]:
    """The transformer blocks: the unit of compilation, activation checkpointing and sharding."""
    return [*model.triple_blocks, *model.single_blocks, *getattr(model, "decoder_blocks", [])]


def compile_blocks(model: mofo.MoFo) -> None:
    """Per-block torch.compile: short compile times (one graph per block kind), Triton kernels as opaque custom ops."""
    for blk in blocks(model):
        blk.compile()


def checkpoint_blocks(model: mofo.MoFo) -> None:
    """Run each block's forward under torch.utils.checkpoint, wrapped in place so parameter names
    (checkpoints, optimizer state) do not change. The wrapper is a Python function (not a
    functools.partial of checkpoint, which disables torch.compile for all it calls), so a compiled
    block traces checkpoint as one region to recompute."""
    def checkpointed(forward):
        def run(*args):
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)
        return run

    for blk in blocks(model):
        blk.forward = checkpointed(blk.forward)


def shard_model(model: mofo.MoFo, mesh, bf16: bool) -> None:
    """FSDP2 in place: every block is one all-gather unit, the fp32 depth head another (mofo.keeps_fp32),
    the root the remaining weights. With bf16 the forward all-gathers bf16 copies of the fp32 shards and
    gradients are reduced in fp32. Inputs are not cast: timesteps and RoPE tables stay fp32, as under autocast."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    # MoFo returns the depth map as a view (x[:, 0]), which flow_loss never writes into in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for blk in blocks(model):
        fully_shard(blk, mesh=mesh, mp_policy=policy)
    if model.cfg.has_depth:
        fully_shard(model.depth_final_layer, mesh=mesh)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def gathered_model(model: mofo.MoFo, device: torch.device) -> mofo.MoFo | None:
    """The whole FSDP `model` as a plain module on rank 0 (None on the others; all must call)."""
    state = full_state_dict(model)
    return model_from_state(model.cfg, state, device) if dist.get_rank() == 0 else None


def learning_rate(args, step: int) -> float:
    """Linear warm-up over --warmup steps, constant, then a linear fall to 0 over the last --decay x --steps."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    left = (args.steps - step) / max(1.0, args.decay * args.steps)
    return args.lr * warm * min(1.0, left)


def train_step(args, step: int, net, model, ema, opt, micro_batches: list[dict], *, rank: int = 0,
               teacher=None) -> dict[str, torch.Tensor]:
    """The step's learning rate, flow-matching loss over the micro-batches, backward, clipping, AdamW, EMA.

    `net` runs the forward (`model` itself or its DDP wrapper); `model` owns the parameters (under FSDP,
    `net` is `model` and the parameters, gradients, AdamW state and EMA are DTensor shards: clipping
    reduces the norm over the ranks, AdamW and the EMA work shard by shard). Batch tensors are on the
    device already. Returns the loss stats as 0-d tensors: nothing here waits for the GPU."""
    for group in opt.param_groups:
        group["lr"] = learning_rate(args, step)
    totals: dict[str, torch.Tensor] = {}
    for micro, b in enumerate(micro_batches):
        last = micro == len(micro_batches) - 1
        if isinstance(net, FSDPModule):
            net.set_requires_gradient_sync(last)
        sync = net.no_sync() if hasattr(net, "no_sync") and not last else contextlib.nullcontext()
        g = step_generator(args.seed, step, rank, micro, b["rgb"].device)
        with sync, autocast(b["rgb"].device, args.dtype):
            loss, stats = mofo.flow_loss(net, b["rgb"], b["text"], b.get("depth"), b.get("valid"), generator=g,
                                         caption_dropout=args.caption_dropout, teacher=teacher,
                                         distill_weights=tuple(args.distill_weights))
            (loss / len(micro_batches)).backward()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v / len(micro_batches)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"), foreach=True)
    totals["grad_norm"] = norm.full_tensor() if isinstance(norm, DTensor) else norm  # replicated: no communication
    opt.step()
    opt.zero_grad(set_to_none=True)
    if (step + 1) % args.ema_every == 0:
        # A short warm-up so early samples are not dominated by the random init.
        decay = min(args.ema, (1 + step) / (10 + step)) ** args.ema_every
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    return totals


# -----------------------------------------------------------------------------
# Training loop


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag checked after each step, so the run saves first."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum


def to_device(batch: dict, device: torch.device, has_depth: bool) -> dict:
    """Move a (pinned) micro-batch without waiting; depth is normalised on the device."""
    out = {"rgb": batch["rgb"].to(device, non_blocking=True), "text": batch["text"].to(device, non_blocking=True)}
    if has_depth:
        out["valid"] = batch["valid"].to(device, non_blocking=True)
        out["depth"] = mofo.normalize_depth(batch["depth"].to(device, non_blocking=True), out["valid"])
    return out


def preview_items(args, res: int) -> list[dict]:
    """Four samples for the progress grids: held-out scenes, or the first rows of the user's data."""
    if args.data == "scenes":
        ds = data.SceneDataset(res, split="test")
        return [ds[i] for i in range(4)]
    if args.data == "manifest":
        ds = data.ManifestDataset(args.data_path, res)
        return [ds[i % len(ds)] for i in range(4)]
    return [s for _, s in zip(range(4), data.ShardDataset(args.data_path, res, loop=True))]


def check_depth_data(args) -> None:
    """A manifest is summarised; --stage mofo on data without any depth is refused."""
    if args.data != "manifest":
        return
    rows = data.ManifestDataset(args.data_path, 8).rows
    with_depth = sum(r["depth"] is not None for r in rows)
    print(f"manifest {args.data_path}: {len(rows)} rows, {with_depth} with depth", flush=True)
    if args.stage == "mofo" and with_depth == 0:
        raise UserError(f"{args.data_path} has no row with depth; --stage mofo needs depth "
                        f"(train --stage t2i on image-only data)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export:
        print(f"exported {export_checkpoint(args.out, args.export)}")
        return 0
    rank, world, device = setup_distributed(args.device)
    use_kernels(args.kernels, device)
    master = rank == 0
    if master:
        note_slow_bf16(args.dtype, device, "train.py")
    if args.batch_size % (world * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} is not divisible by {world} processes x "
                        f"--grad-accum {args.grad_accum}")
    micro_batch = args.batch_size // (world * args.grad_accum)
    if master:
        check_depth_data(args)
    model, ema, tok, start, resume_dir = build_model(args, device)
    res = args.res or model.cfg.res
    if start >= args.steps:
        raise UserError(f"the run in {args.out} is already at step {start} >= --steps {args.steps}")
    ema.requires_grad_(False)
    teacher = None
    if args.distill_from:
        teacher, _ = load_checkpoint(args.distill_from, device, ema=True)
        teacher.requires_grad_(False)
        if teacher.cfg.has_depth:
            raise UserError("--distill-from must be a text-to-image checkpoint (no depth stream)")
    try:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {args.out}: {e.strerror}") from None
    if args.activation_checkpointing:
        checkpoint_blocks(model)
    if args.compile if args.compile is not None else device.type == "cuda":
        compile_blocks(model)  # per-block compile, then fully_shard: the order FSDP2 documents
    if args.fsdp:
        mesh = init_device_mesh(device.type, (world,))
        bf16 = device.type == "cuda" and args.dtype != "fp32"
        shard_model(model, mesh, bf16)
        shard_model(ema, mesh, bf16=False)  # never runs a forward: only its shards matter
        if teacher is not None:
            shard_model(teacher, mesh, bf16)
        if resume_dir:  # meta-device models: allocate the shards, load_sharded fills them
            model.to_empty(device=device)
            ema.to_empty(device=device)
    opt = make_optimizer(model, args)
    if resume_dir and args.fsdp:
        load_sharded(resume_dir, model, ema, opt)
    elif resume_dir:
        load_optimizer(resume_dir, model, opt)
    net = model
    if world > 1 and not args.fsdp:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    metrics: list[dict] = []
    if master and os.path.exists(metrics_path):
        with open(metrics_path) as fh:  # drop lines logged after the checkpoint we resume from
            metrics = [m for m in map(json.loads, fh) if m["step"] <= start]
        write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))
    if master:
        print(f"{args.stage} | {model.cfg.name} {model.num_params() / 1e6:.2f}M params | res {res} | "
              f"batch {args.batch_size} on {world} x {device} | steps {start}->{args.steps}", flush=True)
    previews = preview_items(args, res) if master else []

    collate = functools.partial(collate_batch, tok=tok, text_len=model.cfg.text_len)
    loader = iter(make_loader(args, res, start, rank, world, micro_batch, collate, pin=device.type == "cuda"))
    stop = StopRequest()
    t_start = last_log = time.time()
    window: list[dict] = []
    step = start
    while step < args.steps:
        micro = [to_device(next(loader), device, model.cfg.has_depth) for _ in range(args.grad_accum)]
        window.append(train_step(args, step, net, model, ema, opt, micro, rank=rank, teacher=teacher))
        step += 1

        if step % args.log_every == 0 or step == args.steps:
            # One host sync per log line: average the window's 0-d tensors, then over ranks.
            keys = sorted(window[0])
            vec = torch.stack([torch.stack([s[k].float() for k in keys]) for s in window]).mean(0)
            if world > 1:
                dist.all_reduce(vec)
                vec /= world
            avg, now = dict(zip(keys, vec.tolist())), time.time()
            rate, window, last_log = len(window) / max(now - last_log, 1e-9), [], now
            if master:
                eta, lr = (args.steps - step) / rate, opt.param_groups[0]["lr"]
                if device.type == "cuda":  # rank 0's peak since the start (SCALING.md compares it)
                    avg["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                parts = " ".join(f"{k[5:] or 'total'} {avg[k]:.4f}" for k in sorted(avg) if k.startswith("loss"))
                mem = f" | peak {avg['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in avg else ""
                print(f"step {step:>6}/{args.steps} | loss {parts} | lr {lr:.2e} | {rate:.2f} steps/s{mem} | "
                      f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
                metrics.append({"step": step, "lr": lr, "steps_per_s": rate, "time": now - t_start, **avg})
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(metrics[-1]) + "\n")
        at_save = step % args.save_every == 0 or step == args.steps
        if at_save or (args.sample_every and step % args.sample_every == 0):
            # Under FSDP every rank sends its EMA shards and rank 0 samples with the whole model,
            # which is dropped right after (it is not kept through the training steps).
            preview = gathered_model(ema, device) if args.fsdp else ema
            if master:
                sample_grid(preview, tok, previews, os.path.join(args.out, "samples", f"step_{step:07d}.png"),
                            args.sample_steps, args.dtype)
                plot_losses(metrics, os.path.join(args.out, "loss.png"))
            del preview
        if at_save or stop.signum:
            state = {"step": step, "args": vars(args), "world_size": world,
                     "rng": {"scheme": "torch.Generator per (seed, step, rank, micro-batch)", "seed": args.seed},
                     "data": {"kind": args.data, "samples_seen": step * args.batch_size}}
            if args.fsdp:  # every rank writes its shards; rank 0 the rest
                path = save_sharded_checkpoint(args.out, step, model, ema, opt, tok, state)
            elif master:
                path = save_checkpoint(args.out, step, model, ema, opt, tok, state)
            if master:
                print(f"saved {path}", flush=True)
            if world > 1:
                dist.barrier()
        if stop.signum:
            if master:
                print(f"{signal.Signals(stop.signum).name}: stopped at step {step}; continue with: {sys.executable} "
                      f"train.py --out {args.out} --resume", file=sys.stderr, flush=True)
            return leave(128 + stop.signum, world)
    return leave(0, world)


def leave(code: int, world: int) -> int:
    """The exit code; a rank of a multi-process run exits right here instead. Tearing down its gloo
    group can deadlock: the group's destructor joins the gloo worker thread while holding the GIL,
    and that thread may still be releasing a finished collective's Python tensors, which needs the
    GIL. Everything is saved and flushed by now; the OS reclaims the rest."""
    if world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    cli(main, "train.py")
