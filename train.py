"""
Train a Modality Forcing model: text-to-image pre-training, then depth post-training.

Single process (CPU or one GPU):
    python train.py --config tiny --stage t2i  --data scenes --steps 300 --out runs/t2i
    python train.py --config tiny --stage mofo --data scenes --steps 600 --out runs/mofo \\
        --init runs/t2i --sparse lidar
Several processes (DDP; gloo on CPU, nccl on CUDA), e.g. 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --config small --stage mofo ...

--out is a run directory: ckpt_XXXXXXX/ checkpoints (weights, optimizer, config, tokenizer, train
state), a `latest` pointer, metrics.jsonl, samples/ grids and loss.png. A run killed at any moment
continues with --resume and ends with the same weights as if it had never stopped (CPU): every
random number of a step comes from a generator seeded by (seed, step, rank), the data order is a
function of the step, and checkpoints are written to a temp dir and published by renaming.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import data
import mofo

# -----------------------------------------------------------------------------
# Arguments
# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a Modality Forcing model (t2i pre-training or depth post-training).")
    p.add_argument("--config", default="tiny", choices=list(mofo.PRESETS), help="model preset")
    p.add_argument("--stage", default="mofo", choices=["t2i", "mofo"],
                   help="t2i: RGB only (pre-training); mofo: RGB + depth with per-modality noise")
    p.add_argument("--data", default="scenes", choices=["scenes", "manifest", "shards"],
                   help="scenes: embedded procedural renderer; manifest: jsonl file; shards: tar files")
    p.add_argument("--data-path", default=None, help="manifest .jsonl or shard glob (for --data manifest/shards)")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps of the run")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, pictures)")
    p.add_argument("--init", default=None, help="start from this checkpoint (a t2i one gains a depth stream)")
    p.add_argument("--resume", action="store_true", help="continue the run found in --out up to --steps")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every K steps (and at the end)")
    p.add_argument("--sample-every", type=int, default=0, help="sample grid every K steps (0: at checkpoints)")
    p.add_argument("--log-every", type=int, default=10, help="progress line every K steps")
    p.add_argument("--batch-size", type=int, default=16, help="global batch size (split across ranks)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm (0: off)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights used for sampling")
    p.add_argument("--res", type=int, default=None, help="training resolution (default: the preset's)")
    p.add_argument("--sparse", default="none", choices=["none", "lidar", "random"],
                   help="simulate sparse depth supervision (LiDAR scan lines or random pixels)")
    p.add_argument("--density", type=float, default=0.05, help="kept fraction for --sparse random")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="P(caption -> \"\") for CFG")
    p.add_argument("--distill-from", default=None,
                   help="frozen t2i checkpoint for self-distillation of the RGB head (SPEC 3.3)")
    p.add_argument("--distill-weights", type=float, nargs=2, default=(1.0, 0.1), metavar=("HI", "LO"),
                   help="distillation weight at t_depth=1 and t_depth=0")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and every step's noise")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="attention/RMSNorm implementation: auto = Triton on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--num-workers", type=int, default=2, help="data loader worker processes per rank")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps for the progress grids")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; with --resume, the saved run's arguments overridden only by the
    options given explicitly (e.g. a new --steps)."""
    args = build_parser().parse_args(argv)
    if args.resume:
        quiet = build_parser()
        for action in quiet._actions:  # defaults suppressed: what remains was typed by the user
            action.default = argparse.SUPPRESS
        given = vars(quiet.parse_args(argv))
        ckpt = mofo.resolve_checkpoint(args.out)
        with open(os.path.join(ckpt, "train_state.json")) as fh:
            saved = json.load(fh)["args"]
        args = argparse.Namespace(**{**saved, **given})
    if args.steps < 1 or args.batch_size < 1 or args.save_every < 1 or args.log_every < 1:
        raise data.UserError("--steps, --batch-size, --save-every and --log-every must be >= 1")
    if args.data != "scenes" and not args.data_path:
        raise data.UserError(f"--data {args.data} needs --data-path")
    return args


# -----------------------------------------------------------------------------
# Distributed setup, data order
# -----------------------------------------------------------------------------


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). DDP only when launched by torchrun (RANK is set)."""
    if "RANK" not in os.environ:
        return 0, 1, mofo.pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = mofo.pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class StepBatches(torch.utils.data.Sampler):
    """Index batches for steps start..steps-1 of one rank: the data order is a pure function of the
    step, so a resumed run sees exactly the samples the uninterrupted one would have.

    Global sample k of the run is index k of an infinite dataset (the procedural scenes), or of a
    finite one reshuffled every epoch by a generator seeded with (seed, epoch)."""

    def __init__(self, n: int | None, start: int, steps: int, batch: int, rank: int, world: int, seed: int):
        self.n, self.start, self.steps, self.batch, self.rank, self.world, self.seed = \
            n, start, steps, batch, rank, world, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, k: int) -> int:
        if self.n is None:
            return k
        epoch = k // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][k % self.n])

    def __iter__(self):
        for step in range(self.start, self.steps):
            first = (step * self.world + self.rank) * self.batch
            yield [self._index(first + j) for j in range(self.batch)]

    def __len__(self) -> int:
        return self.steps - self.start


def make_loader(args, res: int, start: int, rank: int, world: int, local_batch: int):
    """An iterator of batches (dicts of stacked tensors + caption lists) from step `start` on."""
    if args.data == "shards":
        ds = data.ShardDataset(args.data_path, res, rank=rank, world_size=world, sparse=args.sparse,
                               density=args.density, start=start * local_batch, loop=True)
        return torch.utils.data.DataLoader(ds, batch_size=local_batch, num_workers=args.num_workers)
    ds = data.make_dataset(args.data, res, args.sparse, args.density, args.data_path)
    n = None if args.data == "scenes" else len(ds)
    sampler = StepBatches(n, start, args.steps, local_batch, rank, world, args.seed)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=args.num_workers,
                                       persistent_workers=False)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """All randomness of one step (modes, t, noise, caption dropout) for one rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank)


def corpus_captions(args, n: int = 4000) -> list[str]:
    """Captions the BPE tokenizer is trained on (the first n of the training data)."""
    if args.data == "scenes":
        return data.scene_captions(n)
    if args.data == "manifest":
        return [row["caption"] for row in data.ManifestDataset(args.data_path, 8).rows[:n]]
    samples = iter(data.ShardDataset(args.data_path, 8, loop=False))
    return [s["caption"] for _, s in zip(range(n), samples)]


# -----------------------------------------------------------------------------
# Checkpoints: a directory per save, published atomically through the `latest` pointer
# -----------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(out: str, step: int, model, ema, opt, tok, train_state: dict) -> str:
    """Write ckpt_<step>/ into a temp dir, rename it into place, then atomically repoint `latest`.
    A crash at any point leaves the previous checkpoint (and `latest`) intact."""
    name = f"ckpt_{step:07d}"
    tmp = os.path.join(out, f".tmp_{name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {f"ema.{k}": v.detach().float().cpu().contiguous() for k, v in ema.state_dict().items()}
    tensors.update({f"raw.{k}": v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()})
    save_file(tensors, os.path.join(tmp, "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors = {f"{names[id(p)]}/{k}": v.detach().cpu().contiguous()
                   for p, st in opt.state.items() for k, v in st.items()}
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as fh:
        fh.write(mofo.config_to_json(model.cfg))
    data.save_tokenizer(tok, os.path.join(tmp, "tokenizer.json"))
    _write_json(os.path.join(tmp, "train_state.json"), train_state)
    for f in os.listdir(tmp):
        with open(os.path.join(tmp, f), "rb") as fh:
            os.fsync(fh.fileno())
    final = os.path.join(out, name)
    shutil.rmtree(final, ignore_errors=True)  # a leftover from a run killed before publishing it
    os.rename(tmp, final)
    pointer_tmp = os.path.join(out, f".{mofo.LATEST}.tmp")
    with open(pointer_tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(pointer_tmp, os.path.join(out, mofo.LATEST))
    _fsync_dir(out)
    for old in os.listdir(out):  # keep only the published checkpoint
        if old.startswith("ckpt_") and old != name:
            shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    return final


def load_optimizer(path: str, model, opt) -> None:
    """Fill AdamW's state from optimizer.safetensors (keys '<param name>/<state key>')."""
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for key, v in tensors.items():
        name, k = key.rsplit("/", 1)
        opt.state[params[name]][k] = v.to(params[name].device) if k != "step" else v


# -----------------------------------------------------------------------------
# Pictures: sample grid and loss curve, drawn with Pillow
# -----------------------------------------------------------------------------


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def sample_grid(model, tok, path: str, res: int, steps: int, dtype: str) -> None:
    """Rows of held-out scenes: joint RGB | joint depth | true RGB | i2d depth | true depth."""
    scenes = data.SceneDataset(res, split="test")
    items = [scenes[i] for i in range(4)]
    ids = data.encode_text(tok, [it["caption"] for it in items], model.cfg.text_len)
    rgb, dep = mofo.sample(model, ids, mode="joint", steps=steps, cfg=3.0,
                           log2_alpha=5 if model.cfg.has_depth else None, res=res, dtype=dtype)
    rows = []
    for b, it in enumerate(items):
        row = [to_uint8(rgb[b]), to_uint8(it["rgb"])]
        if dep is not None:
            row.insert(1, data.colorize_depth(mofo.denormalize_depth(dep[b]).cpu().numpy()))
        rows.append(row)
    if model.cfg.has_depth:
        gt = torch.stack([it["rgb"] for it in items])
        _, pred = mofo.sample(model, torch.zeros_like(ids), mode="i2d", rgb=gt, steps=steps, dtype=dtype)
        for b, it in enumerate(items):
            rows[b].append(data.colorize_depth(mofo.denormalize_depth(pred[b]).cpu().numpy()))
            rows[b].append(data.colorize_depth(it["depth"].numpy(), it["dense_valid"].numpy()))
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    scale = max(1, 128 // res)  # small training images are hard to see at 1:1
    data.save_png(path, np.kron(grid, np.ones((scale, scale, 1), dtype=np.uint8)))


def plot_losses(metrics: list[dict], path: str, size: tuple[int, int] = (640, 360)) -> None:
    """Loss per modality against step, log-scaled y, as a PNG."""
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
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------


def build_model(args, device, rank: int):
    """(model, ema, tokenizer, start_step, resume_dir) for a fresh, --init or --resume run."""
    latest = os.path.join(args.out, mofo.LATEST)
    if args.resume:
        ckpt = mofo.resolve_checkpoint(args.out)
        model, tok = mofo.load_checkpoint(ckpt, device, ema=False)
        ema, _ = mofo.load_checkpoint(ckpt, device, ema=True)
        with open(os.path.join(ckpt, "train_state.json")) as fh:
            state = json.load(fh)
        return model, ema, tok, state["step"], ckpt
    if os.path.exists(latest):
        raise data.UserError(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    # Seeded before any weight is created, --init included: add_depth_stream draws fresh weights
    # for the depth-only modules, and every run (and rank) must draw the same ones.
    torch.manual_seed(args.seed)
    overrides = {"has_depth": args.stage == "mofo"}
    if args.res:
        overrides["res"] = args.res
    if args.init:
        model, tok = mofo.load_checkpoint(args.init, "cpu", ema=True)
        if args.stage == "mofo" and not model.cfg.has_depth:
            model = mofo.add_depth_stream(model)
        elif args.stage == "t2i" and model.cfg.has_depth:
            raise data.UserError(f"--init {args.init} has a depth stream; --stage t2i needs a t2i checkpoint")
        if args.res:
            model.cfg = dataclasses.replace(model.cfg, res=args.res).validate()
    else:
        tok = data.train_tokenizer(corpus_captions(args), args.vocab_size or mofo.PRESETS[args.config].vocab_size)
        overrides["vocab_size"] = tok.get_vocab_size()
        model = mofo.MoFo(mofo.get_config(args.config, **overrides))
    model = model.to(device)
    return model, copy.deepcopy(model), tok, 0, None


# -----------------------------------------------------------------------------
# One optimizer step
# -----------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW over all weights (PyTorch's default multi-tensor implementation)."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)


def train_step(args, step: int, net, model, ema, opt, rgb: torch.Tensor, text: torch.Tensor,
               depth: torch.Tensor | None, valid: torch.Tensor | None, *, rank: int = 0,
               teacher=None) -> dict[str, torch.Tensor]:
    """Warm-up lr, flow-matching loss, backward, clipping, AdamW, EMA; batch tensors on the device.

    `net` is what runs the forward (`model` itself, or its compiled / DDP wrapper); `model` owns
    the parameters. Returns the loss stats as 0-d tensors (no host sync here).
    """
    for group in opt.param_groups:
        group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
    with mofo.autocast(rgb.device, args.dtype):
        loss, stats = mofo.flow_loss(net, rgb, text, depth, valid, generator=step_generator(args.seed, step, rank),
                                     caption_dropout=args.caption_dropout, teacher=teacher,
                                     distill_weights=tuple(args.distill_weights))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    opt.step()
    # EMA with a short warm-up so early samples are not dominated by the random init.
    decay = min(args.ema, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    return stats


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        mofo.set_kernels(args.kernels, device)
    except ValueError as e:
        raise data.UserError(f"--kernels {args.kernels}: {e}") from None
    master = rank == 0
    if args.batch_size % world:
        raise data.UserError(f"--batch-size {args.batch_size} is not divisible by {world} processes")
    local_batch = args.batch_size // world
    model, ema, tok, start, resume_dir = build_model(args, device, rank)
    if master:  # only now: a run that fails its checks leaves nothing behind
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    res = args.res or model.cfg.res
    if start >= args.steps:
        raise data.UserError(f"the run in {args.out} is already at step {start} >= --steps {args.steps}")
    ema.requires_grad_(False)
    teacher = None
    if args.distill_from:
        teacher, _ = mofo.load_checkpoint(args.distill_from, device, ema=True)
        teacher.requires_grad_(False)
        if teacher.cfg.has_depth:
            raise data.UserError("--distill-from must be a text-to-image checkpoint (no depth stream)")
    opt = make_optimizer(model, args)
    if resume_dir:
        load_optimizer(resume_dir, model, opt)
    net = model
    if args.compile:
        net = torch.compile(net)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    metrics: list[dict] = []
    if master and os.path.exists(metrics_path):
        with open(metrics_path) as fh:  # drop lines logged after the checkpoint we resume from
            metrics = [m for m in map(json.loads, fh) if m["step"] <= start]
        tmp = metrics_path + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(m) + "\n" for m in metrics)
        os.replace(tmp, metrics_path)
    if master:
        print(f"{args.stage} | {model.cfg.name} {model.num_params() / 1e6:.2f}M params | res {res} | "
              f"batch {args.batch_size} on {world} x {device} | steps {start}->{args.steps}", flush=True)

    loader = make_loader(args, res, start, rank, world, local_batch)
    t_start, last_log, window = time.time(), time.time(), []
    step = start
    for batch in loader:
        if step >= args.steps:  # a shard stream is endless; the step count ends the run
            break
        rgb = batch["rgb"].to(device)
        text = data.encode_text(tok, list(batch["caption"]), model.cfg.text_len).to(device)
        depth = valid = None
        if model.cfg.has_depth:
            valid = batch["valid"].to(device)
            depth = mofo.normalize_depth(batch["depth"].to(device), valid)
        stats = train_step(args, step, net, model, ema, opt, rgb, text, depth, valid, rank=rank, teacher=teacher)
        lr = opt.param_groups[0]["lr"]
        step += 1

        window.append(stats)
        log_now = step % args.log_every == 0 or step == args.steps
        if log_now:
            # One host sync per log line: average the window's 0-d tensors, then over ranks.
            keys = sorted(window[0])
            vec = torch.stack([torch.stack([s[k].float() for k in keys]) for s in window]).mean(0)
            if world > 1:
                dist.all_reduce(vec)
                vec /= world
            avg = dict(zip(keys, vec.tolist()))
            now = time.time()
            rate = len(window) / max(now - last_log, 1e-9)
            window, last_log = [], now
        if master and log_now:
            eta = (args.steps - step) / rate
            parts = " ".join(f"{k[5:] or 'total'} {avg[k]:.4f}" for k in sorted(avg) if k.startswith("loss"))
            print(f"step {step:>6}/{args.steps} | loss {parts} | lr {lr:.2e} | {rate:.2f} steps/s | "
                  f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            metrics.append({"step": step, "lr": lr, "steps_per_s": rate, "time": now - t_start, **avg})
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(metrics[-1]) + "\n")
        save = step % args.save_every == 0 or step == args.steps
        if master and (save or (args.sample_every and step % args.sample_every == 0)):
            sample_grid(ema, tok, os.path.join(args.out, "samples", f"step_{step:07d}.png"), res,
                        args.sample_steps, args.dtype)
            plot_losses(metrics, os.path.join(args.out, "loss.png"))
        if master and save:
            state = {"step": step, "args": vars(args), "world_size": world,
                     "rng": {"scheme": "torch.Generator per (seed, step, rank)", "seed": args.seed},
                     "data": {"kind": args.data, "samples_seen": step * args.batch_size}}
            path = save_checkpoint(args.out, step, model, ema, opt, tok, state)
            print(f"saved {path}", flush=True)
        if world > 1 and save:
            dist.barrier()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except data.UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
