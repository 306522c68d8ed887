"""
Sample from a trained Modality Forcing checkpoint.

    python sample.py --ckpt runs/mofo --prompt "a red sphere left of a blue box" --mode joint
    python sample.py --ckpt runs/mofo --mode i2d --image photo.jpg
    python sample.py --ckpt runs/mofo --mode d2i --depth depth.npy --prompt "a green cone"

Writes into --out: rgb.png, depth.npy (float32 relative depth, mean about 1: scale and shift are
not recoverable), depth.png (disparity colour map), cloud.ply (coloured points from a pinhole
camera with --fov-deg, depth edges removed) and metadata.json. The directory is assembled under a
temporary name and renamed when complete, so it never holds a partial result.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import torch

import data
import mofo

DEFAULT_CFG = {"joint": 4.0, "i2d": 1.0, "d2i": 4.0}  # SPEC 4.4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate RGB + depth (joint), depth from an image (i2d) "
                                            "or an image from depth (d2i).")
    p.add_argument("--ckpt", required=True, help="checkpoint or run directory written by train.py")
    p.add_argument("--prompt", default="", help="caption (joint, d2i); ignored by i2d unless given")
    p.add_argument("--mode", default="joint", choices=mofo.MODES, help="which modalities are generated")
    p.add_argument("--image", default=None, help="input image for i2d (any size; letterboxed)")
    p.add_argument("--depth", default=None, help="input depth for d2i: .npy or 16-bit PNG; 0/NaN/inf = unknown")
    p.add_argument("--steps", type=int, default=50, help="Euler steps")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: joint 4, i2d 1, d2i 4)")
    p.add_argument("--log2-alpha", type=float, default=5.0,
                   help="joint trajectory warp: >0 RGB first, <0 depth first (SPEC 4.2)")
    p.add_argument("--refine-depth", action="store_true",
                   help="joint: re-estimate depth with an i2d pass on the generated image")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--res", type=int, default=None, help="sampling resolution (default: the model's)")
    p.add_argument("--fov-deg", type=float, default=65.0, help="camera field of view for the point cloud")
    p.add_argument("--edge-rtol", type=float, default=0.04, help="drop depth edges from the cloud (0: keep)")
    p.add_argument("--out", default=None, help="output directory (default: outputs/<time>_<prompt>)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="autocast dtype")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"], help="attention implementation")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise data.UserError("--steps must be >= 1")
    if args.mode == "i2d" and not args.image:
        raise data.UserError("--mode i2d needs --image PATH")
    if args.mode == "d2i" and not args.depth:
        raise data.UserError("--mode d2i needs --depth PATH (.npy or 16-bit PNG)")
    if args.mode == "joint" and not args.prompt:
        raise data.UserError("--mode joint needs --prompt")
    if not 0 < args.fov_deg < 180:
        raise data.UserError("--fov-deg must be in (0, 180)")
    return args


# -----------------------------------------------------------------------------
# Point cloud (SPEC 5.3)
# -----------------------------------------------------------------------------


def edge_mask(depth: np.ndarray, rtol: float) -> np.ndarray:
    """True where the 3x3 neighbourhood spans more than rtol * depth (a depth discontinuity)."""
    if rtol <= 0:
        return np.zeros(depth.shape, bool)
    padded = np.pad(depth, 1, mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    return (win.max((-2, -1)) - win.min((-2, -1))) > rtol * np.maximum(depth, 1e-6)


def point_cloud(depth: np.ndarray, rgb: np.ndarray, fov_deg: float, rtol: float,
                max_points: int = 1_200_000) -> tuple[np.ndarray, np.ndarray]:
    """Back-project depth (H, W) with a centred pinhole -> (xyz (N, 3) float32, rgb (N, 3) uint8).

    Points are (X, -Y, -d): +Y up, camera looking along -Z (glTF convention), median-centred."""
    H, W = depth.shape
    f = W / (2 * math.tan(math.radians(fov_deg) / 2))
    v, u = np.mgrid[0:H, 0:W]
    ok = np.isfinite(depth) & (depth > 0) & ~edge_mask(depth, rtol)
    d = depth[ok]
    xyz = np.stack([(u[ok] + 0.5 - W / 2) * d / f, -(v[ok] + 0.5 - H / 2) * d / f, -d], -1)
    col = rgb[ok]
    if len(xyz) > max_points:  # keep files manageable; seeded, so reruns match
        keep = np.random.default_rng(0).choice(len(xyz), max_points, replace=False)
        xyz, col = xyz[keep], col[keep]
    if len(xyz):
        xyz = xyz - np.median(xyz, axis=0)
    return xyz.astype(np.float32), col.astype(np.uint8)


def write_ply(path: str, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """Binary little-endian PLY with float32 x, y, z and uchar red, green, blue per vertex."""
    rec = np.empty(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                    ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    rec["x"], rec["y"], rec["z"] = xyz.T
    rec["red"], rec["green"], rec["blue"] = rgb.T
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(xyz)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(rec.tobytes())


# -----------------------------------------------------------------------------
# Inputs and outputs
# -----------------------------------------------------------------------------


def read_input_depth(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(depth, valid) from a .npy float map or a 16-bit PNG (any unit: only relative depth matters)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return data.read_depth(path, "npy")
    if ext == ".png":
        return data.read_depth(path, "nyu")
    raise data.UserError(f"{path}: depth input must be .npy or a 16-bit .png")


def default_out(prompt: str, mode: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:48] or mode
    return os.path.join("outputs", f"{datetime.datetime.now():%Y%m%d_%H%M%S}_{slug}")


def run(args: argparse.Namespace) -> dict[str, str]:
    """Sample and write the outputs; returns {name: path}."""
    out = args.out or default_out(args.prompt, args.mode)
    if os.path.exists(out) and os.listdir(out):
        raise data.UserError(f"output directory {out} exists and is not empty; choose another --out")
    device = mofo.pick_device(args.device)
    try:
        mofo.set_kernels(args.kernels, device)
    except ValueError as e:
        raise data.UserError(f"--kernels {args.kernels}: {e}") from None
    ckpt = mofo.resolve_checkpoint(args.ckpt)
    model, tok = mofo.load_checkpoint(ckpt, device)
    res = args.res or model.cfg.res
    if res % model.cfg.patch:
        raise data.UserError(f"--res {res} is not a multiple of the model's patch size {model.cfg.patch}")
    if args.mode != "joint" and not model.cfg.has_depth:
        raise data.UserError(f"{args.ckpt} is a text-to-image checkpoint: only --mode joint is possible")

    # Inputs go in letterboxed to the square model resolution; outputs come back at the input's size.
    box, out_hw, rgb_in, dep_in, valid_in = (0, 0, res, res), (res, res), None, None, None
    if args.mode == "i2d":
        img = data.load_image(args.image)
        out_hw = img.shape[:2]
        boxed, box = data.resize_image(img, res, "letterbox")
        rgb_in = torch.from_numpy(boxed).permute(2, 0, 1).float()[None] / 127.5 - 1
    if args.mode == "d2i":
        depth, valid = read_input_depth(args.depth)
        if not valid.any():
            raise data.UserError(f"{args.depth}: no valid depth pixel (all zero, NaN or inf)")
        out_hw = depth.shape
        d_box, box = data.resize_image(depth, res, "letterbox", nearest=True)
        v_box, _ = data.resize_image(valid.astype(np.float32), res, "letterbox", nearest=True)
        valid_in = torch.from_numpy(v_box > 0.5)[None]
        dep_in = mofo.normalize_depth(torch.from_numpy(d_box)[None], valid_in)

    cfg = DEFAULT_CFG[args.mode] if args.cfg is None else args.cfg
    log2_alpha = args.log2_alpha if args.mode == "joint" else None
    ids = data.encode_text(tok, [args.prompt], model.cfg.text_len)
    rgb, z = mofo.sample(model, ids, mode=args.mode, rgb=rgb_in, depth=dep_in, depth_valid=valid_in,
                         steps=args.steps, cfg=cfg, log2_alpha=log2_alpha, seed=args.seed, res=res, dtype=args.dtype)
    if args.refine_depth and args.mode == "joint" and z is not None:
        _, z = mofo.sample(model, ids, mode="i2d", rgb=rgb.clamp(-1, 1), steps=args.steps, cfg=1.0,
                           seed=args.seed, dtype=args.dtype)

    rgb_u8 = ((rgb[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    if args.mode == "i2d":
        rgb_u8 = img  # the input itself, at its own resolution
    elif box != (0, 0, res, res):
        rgb_u8 = np.stack([data.undo_letterbox(rgb_u8[..., c].astype(np.float32), box, out_hw)
                           for c in range(3)], -1).round().clip(0, 255).astype(np.uint8)

    tmp = f"{out.rstrip(os.sep)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = {"rgb": "rgb.png"}
    data.save_png(os.path.join(tmp, "rgb.png"), rgb_u8)
    if z is not None:
        depth = mofo.denormalize_depth(z[0]).cpu().numpy()
        if box != (0, 0, res, res):
            depth = data.undo_letterbox(depth, box, out_hw)
        depth = depth.astype(np.float32)
        np.save(os.path.join(tmp, "depth.npy"), depth)
        data.save_png(os.path.join(tmp, "depth.png"), data.colorize_depth(depth))
        write_ply(os.path.join(tmp, "cloud.ply"), *point_cloud(depth, rgb_u8, args.fov_deg, args.edge_rtol))
        files.update(depth="depth.npy", depth_png="depth.png", cloud="cloud.ply")
    meta = {"args": vars(args), "checkpoint": os.path.abspath(ckpt), "model": model.cfg.name, "res": res,
            "cfg_scale": cfg, "log2_alpha": log2_alpha, "seed": args.seed, "output_hw": list(out_hw),
            "depth": "relative depth, mean about 1 (affine-invariant: scale and shift unknown)",
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    with open(os.path.join(tmp, "metadata.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    files["metadata"] = "metadata.json"
    if os.path.isdir(out):  # an empty directory the user made for us
        os.rmdir(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.rename(tmp, out)
    return {k: os.path.join(out, v) for k, v in files.items()}


def main(argv: list[str] | None = None) -> None:
    try:
        files = run(parse_args(argv))
    except data.UserError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    for k, v in files.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
