"""
Sample from a trained Modality Forcing checkpoint.

    .venv/bin/python sample.py --ckpt runs/mofo --prompt "a red sphere left of a blue box" --mode joint
    .venv/bin/python sample.py --ckpt runs/mofo --mode i2d --image photo.jpg
    .venv/bin/python sample.py --ckpt runs/mofo --mode i2d --image rgb.png --depth lidar.npy   # completion
    .venv/bin/python sample.py --ckpt runs/mofo --mode d2i --depth depth.npy --prompt "a green cone"

Writes into --out: rgb.png, depth.npy (float32; relative depth with mean about 1, or metric
depth when i2d is given known depth pixels), depth.png (disparity colour map), cloud.ply and
cloud.glb (coloured points from a pinhole camera with --fov-deg, depth edges removed) and
metadata.json (arguments, timings). Unknown depth is NaN in depth.npy and grey in depth.png. The
folder is assembled under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import time

import numpy as np
import torch

import data
import kernels
import mofo
import pointcloud
from checkpoint import load_checkpoint, resolve_checkpoint
from common import UserError, cli, from_uint8, pick_device, save_png, staged_dir, to_uint8, write_json

DEFAULT_CFG = {"joint": 4.0, "i2d": 1.0, "d2i": 4.0}

EXAMPLE = """example:
  .venv/bin/python sample.py --ckpt runs/demo/mofo --mode joint --prompt "a red sphere on grass" --out out/joint"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate RGB + depth (joint), depth from an image (i2d) "
                                            "or an image from depth (d2i).",
                                epilog=EXAMPLE, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint or run folder written by train.py")
    p.add_argument("--prompt", default="", help="caption (joint, d2i); ignored by i2d unless given")
    p.add_argument("--mode", default="joint", choices=mofo.MODES, help="which modalities are generated")
    p.add_argument("--image", default=None, help="input image for i2d (any size; letterboxed)")
    p.add_argument("--depth", default=None,
                   help="d2i: the conditioning depth; i2d: known depth pixels to complete (e.g. LiDAR). "
                        ".npy (metres) or 16-bit PNG (mm); 0 / NaN / inf = unknown")
    p.add_argument("--steps", type=int, default=50, help="Euler steps")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: joint 4, i2d 1, d2i 4)")
    p.add_argument("--log2-alpha", type=float, default=5.0,
                   help="joint trajectory warp: >0 RGB first, <0 depth first")
    p.add_argument("--refine-depth", action="store_true",
                   help="joint: re-estimate depth with an i2d pass on the generated image")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--res", type=int, default=None, help="sampling resolution (default: the model's)")
    p.add_argument("--fov-deg", type=float, default=65.0, help="camera field of view for the point cloud")
    p.add_argument("--edge-rtol", type=float, default=0.04,
                   help="drop depth edges from the cloud, relative tolerance at 512 px (0: keep all)")
    p.add_argument("--sor", default=None, metavar="K,STD",
                   help="statistical outlier removal for the cloud: K neighbours, keep within mean + STD * std")
    p.add_argument("--out", default=None, help="output folder (default: outputs/<time>_<prompt>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="weights' dtype: auto = bf16 on CUDA (depth head fp32), fp32 on CPU")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"], help="attention implementation")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    if args.mode == "i2d" and not args.image:
        raise UserError("--mode i2d needs --image PATH")
    if args.mode == "d2i" and not args.depth:
        raise UserError("--mode d2i needs --depth PATH (.npy or 16-bit PNG)")
    if args.mode == "joint" and not args.prompt:
        raise UserError("--mode joint needs --prompt")
    if not 0 < args.fov_deg < 180:
        raise UserError("--fov-deg must be in (0, 180)")
    if args.sor is not None:
        try:
            k, std = args.sor.split(",")
            args.sor = (int(k), float(std))
        except ValueError:
            raise UserError(f"--sor wants K,STD such as 8,2.0, got {args.sor!r}") from None
        if args.sor[0] < 1 or not args.sor[1] > 0:
            raise UserError("--sor needs K >= 1 and STD > 0")
    return args


def read_input_depth(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(depth, valid) from a .npy float map or a 16-bit PNG (any unit: only relative depth matters)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        depth, valid = data.read_depth(path, "npy")
    elif ext == ".png":
        depth, valid = data.read_depth(path, "nyu")
    else:
        raise UserError(f"{path}: depth input must be .npy or a 16-bit .png")
    if not valid.any():
        raise UserError(f"{path}: no valid depth pixel (all zero, NaN or inf)")
    return depth, valid


def default_out(prompt: str, mode: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:48] or mode
    return os.path.join("outputs", f"{datetime.datetime.now():%Y%m%d_%H%M%S}_{slug}")


def fit_scale(rel: np.ndarray, metric: np.ndarray, known: np.ndarray) -> tuple[float, float]:
    """Least-squares scale a with a * rel ~ metric on the known pixels -> (a, RMS residual in metric units)."""
    r, m = rel[known].astype(np.float64), metric[known].astype(np.float64)
    a = float((r * m).sum() / max((r * r).sum(), 1e-12))
    return a, float(np.sqrt(np.mean((a * r - m) ** 2)))


def run(args: argparse.Namespace) -> dict[str, str]:
    """Sample and write the outputs; returns {name: path}."""
    out = args.out or default_out(args.prompt, args.mode)
    device = pick_device(args.device)
    try:
        kernels.set_backend(args.kernels, device)
    except ValueError as e:
        raise UserError(f"--kernels {args.kernels}: {e}") from None
    times, t0 = {}, time.perf_counter()
    ckpt = resolve_checkpoint(args.ckpt)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    model, tok = load_checkpoint(ckpt, device, dtype=torch.bfloat16 if bf16 else torch.float32)
    res = args.res or model.cfg.res
    if res % model.cfg.patch:
        raise UserError(f"--res {res} is not a multiple of the model's patch size {model.cfg.patch}")
    if args.mode != "joint" and not model.cfg.has_depth:
        raise UserError(f"{args.ckpt} is a text-to-image checkpoint: only --mode joint is possible")
    if args.depth and args.mode == "joint":
        raise UserError("--depth is for --mode i2d (known pixels to complete) or d2i (the condition)")

    # Inputs go in letterboxed to the square model resolution; outputs come back at the input's size.
    box, out_hw, rgb_in, dep_in, known = (0, 0, res, res), (res, res), None, None, None
    if args.mode == "i2d":
        img = data.load_image(args.image)
        out_hw = img.shape[:2]
        boxed, box = data.resize_image(img, res, "letterbox")
        rgb_in = from_uint8(boxed)[None]
    if args.depth:
        depth_m, valid = read_input_depth(args.depth)
        if args.mode == "i2d" and depth_m.shape != tuple(out_hw):
            raise UserError(f"--depth is {depth_m.shape[1]}x{depth_m.shape[0]} but --image is "
                            f"{out_hw[1]}x{out_hw[0]}; they must match pixel for pixel")
        out_hw = depth_m.shape
        d_box, box = data.resize_image(depth_m, res, "letterbox", nearest=True)
        v_box, _ = data.resize_image(valid, res, "letterbox", nearest=True)
        known = torch.from_numpy(np.ascontiguousarray(v_box))[None]
        dep_in = mofo.normalize_depth(torch.from_numpy(d_box)[None], known)
    times["load"] = time.perf_counter() - t0

    cfg_scale = DEFAULT_CFG[args.mode] if args.cfg is None else args.cfg
    log2_alpha = args.log2_alpha if args.mode == "joint" else None
    ids = data.encode_text(tok, [args.prompt], model.cfg.text_len)
    t0 = time.perf_counter()
    rgb, z = mofo.sample(model, ids, mode=args.mode, rgb=rgb_in, depth=dep_in, depth_valid=known,
                         steps=args.steps, cfg_scale=cfg_scale, log2_alpha=log2_alpha, seed=args.seed, res=res)
    if args.refine_depth and args.mode == "joint" and z is not None:
        _, z = mofo.sample(model, ids, mode="i2d", rgb=rgb.clamp(-1, 1), steps=args.steps, seed=args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times["denoise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rgb_u8 = img if args.mode == "i2d" else to_uint8(rgb[0])  # i2d: the input itself, at its own size
    if args.mode != "i2d":
        rgb_u8 = np.stack([data.undo_letterbox(rgb_u8[..., c], box, out_hw) for c in range(3)], -1)
        rgb_u8 = rgb_u8.round().clip(0, 255).astype(np.uint8)
    meta = {"args": vars(args), "checkpoint": os.path.abspath(ckpt), "model": model.cfg.name, "res": res,
            "cfg_scale": cfg_scale, "log2_alpha": log2_alpha, "seed": args.seed, "output_hw": list(out_hw),
            "device": str(device), "dtype": "bf16" if bf16 else "fp32",
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    with staged_dir(out) as tmp:
        files = {"rgb": "rgb.png"}
        save_png(os.path.join(tmp, "rgb.png"), rgb_u8)
        if z is not None:
            depth = data.undo_letterbox(mofo.denormalize_depth(z[0]).cpu().numpy(), box, out_hw)
            if args.mode == "d2i":  # the condition itself; its unknown pixels stay unknown
                depth = np.where(valid, depth_m / depth_m[valid].mean(), np.nan)
                meta["depth"] = "the conditioning depth, scaled to mean 1; unknown pixels NaN"
            elif args.depth:  # completion: metric, scaled to the known points
                scale, rms = fit_scale(depth, depth_m, valid)
                depth = depth * scale
                meta.update(depth="metric: scaled to the given depth pixels by least squares",
                            depth_scale=scale, depth_fit_rms=rms, known_pixels=int(valid.sum()))
            else:
                meta["depth"] = "relative depth, mean about 1 (affine-invariant: scale and shift unknown)"
            files.update(pointcloud.write_all(tmp, depth.astype(np.float32), rgb_u8, args.fov_deg, args.edge_rtol,
                                                 args.sor))
        times["write"] = time.perf_counter() - t0
        meta["timings_s"] = {k: round(v, 4) for k, v in times.items()}
        write_json(os.path.join(tmp, "metadata.json"), meta)
        files["metadata"] = "metadata.json"
    return {k: os.path.join(out, v) for k, v in files.items()}


def main(argv: list[str] | None = None) -> int:
    files = run(parse_args(argv))
    for k, v in files.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    cli(main, "sample.py")
