"""
Sample from a trained Modality Forcing checkpoint.

    .venv/bin/python sample.py --ckpt runs/mofo --prompt "a red sphere left of a blue box" --mode joint
    .venv/bin/python sample.py --ckpt runs/mofo --mode i2d --image photo.jpg
    .venv/bin/python sample.py --ckpt runs/mofo --mode i2d --image rgb.png --depth lidar.npy   # completion
    .venv/bin/python sample.py --ckpt runs/mofo --mode d2i --depth depth.npy --prompt "a green cone"
    .venv/bin/python sample.py --ckpt runs/mofo --mode i2d --image photos/ --out out   # out/<stem>/ each
    .venv/bin/python sample.py --ckpt runs/mofo --mode joint --prompts prompts.txt --out out

Writes into --out: rgb.png, depth.npy (float32; relative depth with mean about 1, or metric
depth when i2d is given known depth pixels, which it keeps), depth.png (disparity colour map), cloud.ply and
cloud.glb (coloured points from a pinhole camera with --fov-deg, depth edges removed), index.html
(the pictures and a point cloud to turn, self-contained) and metadata.json (arguments, seed,
timings). Unknown depth is NaN in depth.npy and grey in depth.png. The folder is assembled under a
temporary name and renamed when complete.

Batch work: --image / --depth given a folder or a quoted glob, or --prompts FILE, give one item
per input file or prompt, each written to its own subfolder of --out (the file's stem; for prompts
index_slug), sampled --batch-size at a time with seed --seed + index. An item that fails is
reported on one line and skipped; the exit code is 1 if any failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import os
import re
import sys
import time

import numpy as np
import torch

import data
import mofo
import pointcloud
import viewer
from checkpoint import load_checkpoint, resolve_checkpoint
from common import (HelpFormatter, UserError, check_out_dir, cli, from_uint8, note_slow_bf16, pick_device, save_png,
                    staged_dir, to_uint8, use_kernels, wants_bf16, write_json)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEPTH_EXTS = (".npy", ".png")

EXAMPLE = """example:
  .venv/bin/python sample.py --ckpt runs/demo/mofo --mode joint --prompt "a red sphere on grass" --out out/joint
  .venv/bin/python sample.py --ckpt runs/demo/mofo --mode i2d --image "photos/*.jpg" --out out/photos"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate RGB + depth (joint), depth from an image (i2d) "
                                            "or an image from depth (d2i).",
                                epilog=EXAMPLE, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint or run folder written by train.py")
    p.add_argument("--prompt", default="", help="caption (joint, d2i); ignored by i2d unless given")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="joint / d2i: a text file with one prompt per line; one output subfolder per prompt")
    p.add_argument("--mode", default="joint", choices=mofo.MODES, help="which modalities are generated")
    p.add_argument("--image", default=None,
                   help="input image for i2d (any size; letterboxed), or a folder or quoted glob of them")
    p.add_argument("--depth", default=None,
                   help="d2i: the conditioning depth; i2d: known depth pixels to complete (e.g. LiDAR). "
                        ".npy (metres) or 16-bit PNG (mm); 0 / NaN / inf = unknown. A folder or quoted glob "
                        "for batch work (i2d pairs it with --image by file stem)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="items denoised together (default: 8 on CUDA, 1 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: joint 30, i2d 1, d2i 30)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: joint 3, i2d 1, d2i 7)")
    p.add_argument("--log2-alpha", type=float, default=5.0,
                   help="joint trajectory warp: >0 RGB first, <0 depth first")
    p.add_argument("--refine-depth", action="store_true",
                   help="joint: re-estimate depth with an i2d pass on the generated image")
    p.add_argument("--seed", type=int, default=0, help="noise seed (batch item i gets seed + i)")
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
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (reduce-overhead: CUDA graphs replay each step's launches); "
                        "the first batch is run once more as a warm-up")
    args = p.parse_args(argv)
    args.steps = mofo.DEFAULT_STEPS[args.mode] if args.steps is None else args.steps
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.mode == "i2d" and not args.image:
        raise UserError("--mode i2d needs --image PATH")
    if args.mode == "d2i" and not args.depth:
        raise UserError("--mode d2i needs --depth PATH (.npy or 16-bit PNG)")
    if args.prompts and (args.prompt or args.mode == "i2d"):
        raise UserError("--prompts is for joint and d2i, instead of --prompt")
    if args.mode == "joint" and not (args.prompt or args.prompts):
        raise UserError("--mode joint needs --prompt (or --prompts FILE)")
    if args.depth and args.mode == "joint":
        raise UserError("--depth is for --mode i2d (known pixels to complete) or d2i (the condition)")
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


# -----------------------------------------------------------------------------
# The work: one item per input file or prompt


@dataclasses.dataclass
class Item:
    index: int
    label: str  # what the progress line calls it: the input file's name or the prompt
    out: str  # its output folder
    prompt: str
    image: str | None = None
    depth: str | None = None
    error: str | None = None  # known before loading, e.g. an image without its depth file


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48]


def default_out(prompt: str, mode: str) -> str:
    return os.path.join("outputs", f"{datetime.datetime.now():%Y%m%d_%H%M%S}_{slug(prompt) or mode}")


def expand(spec: str, exts: tuple[str, ...], flag: str) -> list[str] | None:
    """A folder or a glob -> its input files, sorted; a single path -> None (its reader reports it if missing)."""
    if os.path.isdir(spec):
        paths = [e.path for e in os.scandir(spec)
                 if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(exts)]
    elif any(c in spec for c in "*?[") and not os.path.exists(spec):
        paths = [p for p in glob.glob(spec) if os.path.isfile(p)]
    else:
        return None
    if not paths:
        raise UserError(f"{flag} {spec}: no input files there ({' '.join(exts)})")
    return sorted(paths)


def read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {path}: cannot read ({e})") from None
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in the file")
    return prompts


def stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def plan_items(args: argparse.Namespace) -> tuple[list[Item], str | None]:
    """The items to sample and, for batch work, the folder that gets one subfolder per item. None
    means a single run: straight into --out, and a bad input is a user error."""
    images = expand(args.image, IMAGE_EXTS, "--image") if args.mode == "i2d" else None
    depths = expand(args.depth, DEPTH_EXTS, "--depth") if args.depth else None
    prompts = read_prompts(args.prompts) if args.prompts else None
    if images is None and depths is None and prompts is None:
        out = args.out or default_out(args.prompt, args.mode)
        label = os.path.basename(args.image or args.depth or "") or args.prompt
        return [Item(0, label, out, args.prompt, args.image, args.depth)], None

    out = args.out or default_out(args.prompt or "batch", args.mode)
    if args.mode == "i2d":  # rows of (label, folder name, prompt, image, depth)
        if images is None or (args.depth and depths is None):
            raise UserError("give --image and --depth both as folders or globs (files are paired by stem), "
                            "or both as single files")
        by_stem: dict[str, str] = {}
        for d in depths or []:
            if by_stem.setdefault(stem(d), d) != d:
                raise UserError(f"--depth {args.depth}: two depth files for {stem(d)!r}")
        rows = [(os.path.basename(p), stem(p), args.prompt, p, by_stem.get(stem(p))) for p in images]
    elif prompts is None:  # d2i over a folder of depth maps, one prompt for all
        rows = [(os.path.basename(d), stem(d), args.prompt, None, d) for d in depths]
    elif depths is None:  # joint, or d2i of one depth map, once per prompt
        rows = [(p, f"{i:03d}_{slug(p) or 'prompt'}", p, None, args.depth) for i, p in enumerate(prompts)]
    else:
        raise UserError("--prompts takes one --depth file; for a folder of depth maps give one --prompt")

    items, taken = [], set()
    for i, (label, name, prompt, image, depth) in enumerate(rows):
        if name in taken:  # photo.jpg and photo.png
            name = f"{name}_{os.path.splitext(image or depth)[1][1:].lower()}"
        taken.add(name)
        item = Item(i, label, os.path.join(out, name), prompt, image, depth)
        if args.mode == "i2d" and depths is not None and depth is None:
            item.error = f"no depth file {stem(image)}.npy or .png in --depth {args.depth}"
        items.append(item)
    return items, out


# -----------------------------------------------------------------------------
# Loading, denoising and writing


def load_item(item: Item, mode: str, res: int) -> dict:
    """Read an item's inputs and letterbox them to the square model resolution. The outputs come
    back at the input's size (`out_hw`); `box` is where the input sits in the square."""
    if item.error:
        raise UserError(item.error)
    x = {"box": (0, 0, res, res), "out_hw": (res, res), "img": None, "depth_m": None, "valid": None}
    if mode == "i2d":
        x["img"] = data.load_image(item.image)
        x["out_hw"] = x["img"].shape[:2]
        boxed, x["box"] = data.resize_image(x["img"], res, "letterbox")
        x["rgb_in"] = from_uint8(boxed)
    if item.depth:
        kind = {".npy": "npy", ".png": "nyu"}.get(os.path.splitext(item.depth)[1].lower())  # nyu: 16-bit PNG, mm
        if kind is None:
            raise UserError(f"{item.depth}: depth input must be .npy or a 16-bit .png")
        depth_m, valid = data.read_depth(item.depth, kind)  # any unit: only relative depth matters
        if not valid.any():
            raise UserError(f"{item.depth}: no valid depth pixel (all zero, NaN or inf)")
        if mode == "i2d" and depth_m.shape != tuple(x["out_hw"]):
            raise UserError(f"depth {item.depth} is {depth_m.shape[1]}x{depth_m.shape[0]} but image {item.image} "
                            f"is {x['out_hw'][1]}x{x['out_hw'][0]}; they must match pixel for pixel")
        x.update(depth_m=depth_m, valid=valid, out_hw=depth_m.shape)
        d_box, x["box"] = data.resize_image(depth_m, res, "letterbox", nearest=True)
        v_box, _ = data.resize_image(valid, res, "letterbox", nearest=True)
        x["known"] = torch.from_numpy(np.ascontiguousarray(v_box))
        x["dep_in"] = mofo.normalize_depth(torch.from_numpy(d_box)[None], x["known"][None])[0]
    return x


def denoise(args, model, tok, res: int, meta: dict, items: list[Item], inputs: list[dict]
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch through the sampler -> (rgb (B, 3, res, res), depth z (B, res, res) or None)."""
    def stack(key):
        return torch.stack([x[key] for x in inputs]) if key in inputs[0] else None

    ids = data.encode_text(tok, [it.prompt for it in items], model.cfg.text_len)
    if any("known" in x for x in inputs):  # i2d items without known depth: nothing known
        for x in inputs:
            x.setdefault("known", torch.zeros(res, res, dtype=torch.bool))
            x.setdefault("dep_in", torch.zeros(res, res))
    seeds = [args.seed + it.index for it in items]  # item i is reproducible alone with its seed
    rgb, z = mofo.sample(model, ids, mode=args.mode, rgb=stack("rgb_in"), depth=stack("dep_in"),
                         depth_valid=stack("known"), steps=args.steps, cfg_scale=meta["cfg_scale"],
                         log2_alpha=meta["log2_alpha"], seed=seeds, res=res)
    if args.refine_depth and args.mode == "joint" and z is not None:
        _, z = mofo.sample(model, ids, mode="i2d", rgb=rgb.clamp(-1, 1), steps=args.steps, seed=seeds)
    if args.mode == "d2i" and not all(x["known"].all() for x in inputs):
        # Partial conditioning depth: complete it as i2d does, from the generated image.
        _, z = mofo.sample(model, ids, mode="i2d", rgb=rgb.clamp(-1, 1), depth=stack("dep_in"),
                           depth_valid=stack("known"), steps=args.steps, seed=seeds)
    return rgb, z


def placed_depth(z: torch.Tensor, box, out_hw) -> tuple[np.ndarray, dict[str, int]]:
    """Network output z (res, res) -> relative depth at the output size. Pixels the model puts
    beyond the contraction's range are marked, not clamped: +inf where z reaches 2 (farther than it
    can place), NaN where z <= 0 (no valid depth). Returns the map and the counts."""
    z = z.float().cpu().numpy()
    depth = data.undo_letterbox(mofo.denormalize_depth(torch.from_numpy(z)).numpy(), box, out_hw)
    marks = {}
    for name, mask, value in (("beyond_range", z >= mofo.Z_MAX, np.inf), ("not_positive", z <= 0, np.nan)):
        mask = data.undo_letterbox(mask.astype(np.float32), box, out_hw) > 0.5
        depth[mask], marks[name] = value, int(mask.sum())
    return depth, marks


def write_item(args, item: Item, x: dict, rgb: torch.Tensor, z: torch.Tensor | None, meta: dict
               ) -> tuple[dict[str, str], str]:
    """Write one item's folder from its model outputs -> ({name: path}, a note on its cloud)."""
    t0 = time.perf_counter()
    box, out_hw, depth_m, valid = x["box"], x["out_hw"], x["depth_m"], x["valid"]
    if args.mode == "i2d":
        rgb_u8 = x["img"]  # the input itself, at its own size
    else:
        rgb_u8 = to_uint8(rgb)
        rgb_u8 = np.stack([data.undo_letterbox(rgb_u8[..., c], box, out_hw) for c in range(3)], -1)
        rgb_u8 = rgb_u8.round().clip(0, 255).astype(np.uint8)
    meta = dict(meta, index=item.index, seed=args.seed + item.index, prompt=item.prompt, output_hw=list(out_hw),
                inputs={"image": item.image, "depth": item.depth})
    title = f"{args.mode}: {item.label}" + (f" ({item.prompt})" if item.prompt and item.prompt != item.label else "")
    note = "no depth stream"
    with staged_dir(item.out) as tmp:
        files = {"rgb": "rgb.png"}
        save_png(os.path.join(tmp, "rgb.png"), rgb_u8)
        if z is None:
            viewer.write(os.path.join(tmp, "index.html"), rgb_u8, title=title)
            files["viewer"] = "index.html"
        else:
            depth, meta["marked_pixels"] = placed_depth(z, box, out_hw)
            if depth_m is not None:  # completion (i2d, or d2i with holes): metric, the known points kept
                ok = valid & np.isfinite(depth)
                scale, rms = data.fit_scale(depth, depth_m, ok) if ok.any() else (1.0, 0.0)
                depth = np.where(valid, depth_m, depth * scale)
                meta.update(depth="metric: the given depth pixels, the rest generated and scaled to them by "
                                  "least squares", depth_scale=scale, depth_fit_rms=rms, known_pixels=int(valid.sum()))
            else:
                meta["depth"] = "relative depth, mean about 1 (affine-invariant: scale and shift unknown)"
            more, kept, known = pointcloud.write_all(tmp, depth.astype(np.float32), rgb_u8, args.fov_deg,
                                                     args.edge_rtol, args.sor, title)
            files.update(more)
            meta.update(cloud_points=kept, depth_pixels=known)
            note = f"{kept} of {known} depth pixels kept"
        times = dict(meta["timings_s"], write=time.perf_counter() - t0)
        meta["timings_s"] = {k: round(v, 4) for k, v in times.items()}
        write_json(os.path.join(tmp, "metadata.json"), meta)
        files["metadata"] = "metadata.json"
    return {k: os.path.join(item.out, v) for k, v in files.items()}, note


def load_model(args):
    """Device, kernels and checkpoint -> (model, tokenizer, resolution, metadata shared by every item)."""
    device = pick_device(args.device)
    use_kernels(args.kernels, device)
    ckpt = resolve_checkpoint(args.ckpt)
    note_slow_bf16(args.dtype, device, "sample.py")
    bf16 = wants_bf16(args.dtype, device)
    model, tok = load_checkpoint(ckpt, device, dtype=torch.bfloat16 if bf16 else torch.float32)
    res = args.res or model.cfg.res
    if res % model.cfg.patch:
        raise UserError(f"--res {res} is not a multiple of the model's patch size {model.cfg.patch}")
    if args.mode != "joint" and not model.cfg.has_depth:
        raise UserError(f"{args.ckpt} is a text-to-image checkpoint: only --mode joint is possible")
    if args.compile:
        model = torch.compile(model, mode="reduce-overhead", dynamic=False)
    meta = {"args": vars(args), "checkpoint": os.path.abspath(ckpt), "model": model.cfg.name, "res": res,
            "cfg_scale": mofo.DEFAULT_CFG[args.mode] if args.cfg is None else args.cfg,
            "log2_alpha": args.log2_alpha if args.mode == "joint" else None, "device": str(device),
            "dtype": "bf16" if bf16 else "fp32"}
    return model, tok, res, meta


def timed(fn, device: torch.device):
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def run(args: argparse.Namespace, items: list[Item], batch: bool):
    """Sample the items --batch-size at a time, in order. Yields (item, {name: path} or None, a note:
    the cloud's size or the error, seconds spent on it). In a single run a bad input raises."""
    t0 = time.perf_counter()
    model, tok, res, meta = load_model(args)
    t_ckpt, device = time.perf_counter() - t0, next(model.parameters()).device
    size = args.batch_size or (8 if device.type == "cuda" else 1)
    t_warm = 0.0
    for a in range(0, len(items), size):
        chunk, inputs, errors, spent = items[a:a + size], {}, {}, {}
        for it in chunk:
            t0 = time.perf_counter()
            try:
                inputs[it.index] = load_item(it, args.mode, res)
            except (UserError, OSError) as e:
                if not batch:
                    raise
                errors[it.index] = str(e)
            spent[it.index] = time.perf_counter() - t0
        ok = [it for it in chunk if it.index in inputs]
        if ok:
            batch_in = [inputs[it.index] for it in ok]
            if args.compile and a == 0:  # compilation and graph capture stay out of "denoise"
                t_warm = timed(lambda: denoise(args, model, tok, res, meta, ok, batch_in), device)[1]
            (rgb, z), t_denoise = timed(lambda: denoise(args, model, tok, res, meta, ok, batch_in), device)
        for it in chunk:
            if it.index in errors:
                yield it, None, errors[it.index], spent[it.index]
                continue
            j, t0 = ok.index(it), time.perf_counter()
            item_meta = dict(meta, batch_size=len(ok), date=datetime.datetime.now().isoformat(timespec="seconds"),
                             timings_s={"checkpoint": t_ckpt, "load": spent[it.index], "warmup": t_warm,
                                        "denoise": t_denoise})
            try:
                files, note = write_item(args, it, inputs[it.index], rgb[j], None if z is None else z[j], item_meta)
            except (UserError, OSError) as e:
                if not batch:
                    raise
                files, note = None, str(e)
            yield it, files, note, spent[it.index] + t_denoise / len(ok) + time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    items, out = plan_items(args)
    if out is None:
        for _, files, note, _ in run(args, items, batch=False):
            sor = "" if args.sor is None else f", outlier removal --sor {args.sor[0]},{args.sor[1]:g}"
            if "cloud" in files:
                print(f"cloud: {note} (edge filter --edge-rtol {args.edge_rtol:g}{sor})")
            for k, v in files.items():
                print(f"{k}: {v}")
        return 0
    check_out_dir(out)
    t_start, failed, n = time.perf_counter(), [], len(items)
    for it, files, note, seconds in run(args, items, batch=True):
        head = f"[{it.index + 1}/{n}] {it.label}"
        if files is None:
            failed.append(it.label)
            print(f"{head}: skipped: {note}", file=sys.stderr, flush=True)
        else:
            print(f"{head} -> {it.out}: {seconds:.1f} s, cloud: {note}", flush=True)
    print(f"done: {n - len(failed)} of {n} written to {out} in {time.perf_counter() - t_start:.1f} s"
          + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    cli(main, "sample.py")
