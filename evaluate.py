"""
Zero-shot affine-invariant depth evaluation (image -> depth) for a MoFo checkpoint.

The protocol follows the one most diffusion depth estimators report (Marigold's), rewritten here
from its description:
  1. run i2d on each RGB image (letterboxed to the model resolution), map the relative depth back
     to the ground-truth resolution;
  2. fit a per-image scale and shift against the ground truth over valid pixels (least squares in
     depth space by default, because MoFo models relative *depth*, not disparity);
  3. clip the aligned prediction to the dataset's depth range (and >= 1e-6);
  4. compute AbsRel, delta1..3, RMSE, SqRel and log10 per image over valid pixels, then average
     over images (not over the pooled pixels: every image weighs the same).

Optionally K samples with different seeds are ensembled without looking at the ground truth (see
`ensemble_depth`). Trivial baselines go through the very same alignment and metrics so a reader can
tell how much of a number the alignment alone explains.

Usage:
    python evaluate.py --ckpt out/tiny --data scenes --n 8 --steps 10
    python evaluate.py --ckpt out/big --data nyu --root data/nyuv2 --ensemble 10 --steps 50
    python evaluate.py --ckpt out/big --data manifest --root data/val.jsonl

Metric dicts hold raw fractions (0.055, not 5.5); tables print AbsRel and delta1 x 100.
"""

import argparse
import csv
import dataclasses
import datetime
import math
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import checkpoint
import data
import mofo
import scenes
from common import UserError, check_out_dir, cli, from_uint8, pick_device, save_png, staged_dir, write_json
from evalsets import get_eval_dataset

METRIC_KEYS = ("abs_rel", "delta1", "delta2", "delta3", "rmse", "sq_rel", "log10")
ALIGNMENTS = ("least_squares", "least_squares_disparity", "median", "none")

# -----------------------------------------------------------------------------
# Alignment: affine-invariant predictions are compared after fitting scale (+ shift) to GT


def _fit_scale_shift(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Closed-form least squares for y ~ a*x + b over 1-D arrays (any length >= 1).

    Solved through centred moments (numerically nicer than the raw 2x2 normal equations). When x
    is (numerically) constant the 2x2 system is singular: any line through (mean x, mean y) fits
    equally well, so we fall back to shift only (a = 1), which gives the best constant prediction.
    """
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    mx, my = x.mean(), y.mean()
    dx = x - mx
    var = float(np.mean(dx * dx))
    # relative threshold: a spread of ~1e-6 of the magnitude counts as constant
    if var <= 1e-12 * max(float(np.mean(x * x)), 1e-300):
        return 1.0, float(my - mx)
    a = float(np.mean(dx * (y - my)) / var)
    return a, float(my - a * mx)


def _check_inputs(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Validate shapes and the GT on valid pixels; return the mask as bool."""
    if pred.shape != gt.shape or gt.shape != valid.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape}, gt {gt.shape}, valid {valid.shape}")
    valid = valid.astype(bool)
    if not valid.any():
        raise ValueError("empty valid mask: no ground-truth pixel to evaluate on")
    g = gt[valid]
    if not (np.all(np.isfinite(g)) and np.all(g > 0)):
        raise ValueError("ground truth must be finite and > 0 on valid pixels")
    return valid


def align_depth(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray,
                alignment: str = "least_squares") -> np.ndarray:
    """Align a relative depth map to metric GT; returns the aligned depth (H, W) float64.

    pred, gt: (H, W) depth maps; valid: (H, W) bool, only these pixels enter the fit.
    alignment:
      least_squares            d' = a*d + b, (a, b) minimise sum over valid of (d' - gt)^2
      least_squares_disparity  pred is depth; fit a/d + b to 1/gt, clip that disparity >= 1e-3,
                               invert back to depth (for comparing with disparity-space protocols)
      median                   d' = d * median(gt) / median(d) (scale only)
      none                     d' = d
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {alignment!r}; choose from {', '.join(ALIGNMENTS)}")
    valid = _check_inputs(pred, gt, valid)
    pred = pred.astype(np.float64)
    if alignment == "none":
        return pred.copy()
    if alignment == "median":
        med = float(np.median(pred[valid]))
        if med <= 0:
            raise ValueError("median alignment needs a positive median prediction")
        return pred * (float(np.median(gt[valid])) / med)
    if alignment == "least_squares":
        a, b = _fit_scale_shift(pred[valid], gt[valid])
        return a * pred + b
    # disparity: a model's depth can be ~0 after an affine ensemble, so guard the inversion
    disp = 1.0 / np.maximum(pred, 1e-6)
    a, b = _fit_scale_shift(disp[valid], 1.0 / gt[valid].astype(np.float64))
    return 1.0 / np.maximum(a * disp + b, 1e-3)


# -----------------------------------------------------------------------------
# Metrics: per image over valid pixels, then a plain mean over images


def depth_metrics(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray,
                  alignment: str = "least_squares", min_depth: float = 1e-5,
                  max_depth: float = math.inf) -> dict[str, float]:
    """Metrics of one image: align, clip to [min_depth, max_depth] and >= 1e-6, then compare.

    pred, gt: (H, W); valid: (H, W) bool. Returns raw fractions (not x100):
      abs_rel  mean |p - g| / g          sq_rel  mean (p - g)^2 / g
      rmse     sqrt(mean (p - g)^2)      log10   mean |log10 p - log10 g|
      deltaK   fraction with max(p/g, g/p) < 1.25^K, K = 1, 2, 3
    """
    valid = _check_inputs(pred, gt, valid)
    aligned = align_depth(pred, gt, valid, alignment)
    p = np.maximum(np.clip(aligned[valid], min_depth, max_depth), 1e-6)
    g = gt[valid].astype(np.float64)
    diff = p - g
    ratio = np.maximum(p / g, g / p)
    return {
        "abs_rel": float(np.mean(np.abs(diff) / g)),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25 ** 2)),
        "delta3": float(np.mean(ratio < 1.25 ** 3)),
        "rmse": float(np.sqrt(np.mean(diff * diff))),
        "sq_rel": float(np.mean(diff * diff / g)),
        "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
    }


def mean_metrics(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Average per-image metric dicts key by key (each image counts once, whatever its size)."""
    if not per_image:
        raise ValueError("mean_metrics needs at least one image")
    return {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}


# -----------------------------------------------------------------------------
# Ensembling: K seeds -> one prediction + an uncertainty map, without touching the GT


def ensemble_depth(preds: np.ndarray, fit_mask: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Combine K affine-invariant depth samples into a median map and a spread map.

    preds: (K, H, W); fit_mask: optional (H, W) bool of pixels used to fit the alignments
    (e.g. the letterbox content), default all pixels. Each sample has its own unknown scale and
    shift, so members are first brought into a common frame: align every member to a reference by
    least squares (reference = member 0, then once more to the median of that first pass, so the
    result does not hinge on member 0), then take the pixel-wise median. The spread is the median
    absolute deviation from that median, a robust per-pixel uncertainty in the same units.
    Returns (median (H, W), spread (H, W)), float64.
    """
    if preds.ndim != 3 or preds.shape[0] < 1:
        raise ValueError(f"expected preds of shape (K, H, W), got {preds.shape}")
    preds = preds.astype(np.float64)
    m = np.ones(preds.shape[1:], bool) if fit_mask is None else fit_mask.astype(bool)
    ref = preds[0]
    for _ in range(2):
        aligned = np.empty_like(preds)
        for k, p in enumerate(preds):
            a, b = _fit_scale_shift(p[m], ref[m])
            aligned[k] = a * p + b
        ref = np.median(aligned, axis=0)
    spread = np.median(np.abs(aligned - ref), axis=0)
    return ref, spread


# -----------------------------------------------------------------------------
# Baselines: predictors that need no model, scored through the same alignment and metrics


def mean_baseline(gt: np.ndarray) -> np.ndarray:
    """A constant map (all ones). After alignment it is the best constant: mean GT depth for
    least squares, median GT for median alignment, harmonic mean for the disparity fit."""
    return np.ones(gt.shape, np.float64)


def scene_plane_baseline(scene_index: int, res: int) -> np.ndarray:
    """The 'flat ground' predictor of procedural scene `scene_index`: (res, res) z-depth of its
    ground plane alone, as seen by the scene's own camera (the scene rendered with no objects).

    It knows the true camera height, pitch and field of view, so it is the best a model could do
    that understands the camera but sees no object. Pixels where the ray never meets the ground
    (sky, or an object standing above the horizon) get the farthest ground depth.
    """
    scene = dataclasses.replace(scenes.sample_scene(scene_index), objects=[])
    r = scenes.render(scene, res)
    depth, on_ground = r["depth"].astype(np.float64), r["valid"]
    if not on_ground.any():  # camera sees no ground: degenerate to the constant baseline
        return np.ones((res, res))
    return np.where(on_ground, depth, depth[on_ground].max())


# -----------------------------------------------------------------------------
# Running the model: batched i2d, K seeds per image


@torch.no_grad()
def predict_batch(model: torch.nn.Module, tok, rgbs: list[np.ndarray], *, steps: int,
                  ensemble: int, seed: int, device: torch.device
                  ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """i2d on a batch of uint8 images (each (H_i, W_i, 3), any size).

    Each image is letterboxed to the model's square resolution, sampled `ensemble` times with
    seeds seed, seed+1, ... (the noise is per batch, so results depend on the batch size), and
    the relative depth is mapped back to (H_i, W_i). Returns per image the prediction (H_i, W_i)
    and, for ensemble > 1, the spread map (H_i, W_i) in the same relative-depth units (else None).
    """
    res = model.cfg.res
    boxed = [data.resize_image(img, res, "letterbox") for img in rgbs]
    x = from_uint8(np.stack([b[0] for b in boxed])).to(device)           # (B, 3, res, res)
    # i2d runs unconditionally: an empty caption is the "no text" token sequence
    ids = data.encode_text(tok, [""] * len(rgbs), model.cfg.text_len).to(device)
    members = []
    for k in range(ensemble):
        _, z = mofo.sample(model, ids, mode="i2d", rgb=x, steps=steps, seed=seed + k)
        members.append(mofo.denormalize_depth(z).float().cpu().numpy())
    members = np.stack(members, axis=1)                                  # (B, K, res, res)

    preds, spreads = [], []
    for img, (_, box), stack in zip(rgbs, boxed, members):
        hw = img.shape[:2]
        if ensemble == 1:
            preds.append(data.undo_letterbox(stack[0], box, hw))
            spreads.append(None)
            continue
        # fit the member alignments on the image content only, not on the letterbox bars
        top, left, h, w = box
        content = np.zeros((res, res), bool)
        content[top:top + h, left:left + w] = True
        median, spread = ensemble_depth(stack, fit_mask=content)
        preds.append(data.undo_letterbox(median.astype(np.float32), box, hw))
        spreads.append(data.undo_letterbox(spread.astype(np.float32), box, hw))
    return preds, spreads


# -----------------------------------------------------------------------------
# Pictures: worst-case rows and uncertainty maps


def error_colormap(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to a black -> red -> yellow -> white ramp; returns uint8 (..., 3)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    rgb = np.clip(3.0 * x - np.array([0.0, 1.0, 2.0]), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def worst_row(item: dict, pred: np.ndarray, title: str, height: int = 192) -> np.ndarray:
    """One row of worst.png: RGB | GT | prediction | relative error, each `height` px tall.

    pred is the aligned and clipped prediction the metrics saw. The error panel shows
    |pred - gt| / gt on valid pixels, 0 (black) to 0.25 (white); invalid pixels are grey.
    """
    gt, valid = item["depth"], item["valid"]
    h, w = gt.shape
    err = np.abs(pred - gt) / np.where(valid, gt, 1.0)
    err_rgb = error_colormap(err / 0.25)
    err_rgb[~valid] = 64
    # one colour scale for both, taken from the GT: a prediction's outliers must not hide the GT
    scale = data.disparity_range(gt, valid)
    panels = [item["rgb"], data.colorize_depth(gt, valid, scale), data.colorize_depth(pred, None, scale),
              err_rgb]
    size = (max(1, round(w * height / h)), height)
    # nearest when enlarging keeps small (e.g. 32 px) maps crisp instead of smeared
    resample = Image.NEAREST if h < height else Image.BILINEAR
    panels = [Image.fromarray(np.ascontiguousarray(p)).resize(size, resample) for p in panels]
    row = Image.new("RGB", (size[0] * 4, height))
    for i, p in enumerate(panels):
        row.paste(p, (i * size[0], 0))
    draw = ImageDraw.Draw(row)
    draw.rectangle((0, 0, 6 * len(title) + 6, 14), fill=(0, 0, 0))
    draw.text((3, 2), title, fill=(255, 255, 255))
    return np.asarray(row)


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Stack rows of equal height but possibly different widths, padding on the right."""
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows])


# -----------------------------------------------------------------------------
# Report helpers


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


# -----------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Affine-invariant depth evaluation (i2d) of a MoFo "
                                "checkpoint, with constant and ground-plane baselines.")
    p.add_argument("--ckpt", required=True, help="checkpoint directory written by train.py")
    p.add_argument("--data", required=True,
                   choices=["scenes", "nyu", "kitti", "eth3d", "scannet", "diode", "manifest"],
                   help="evaluation set; 'scenes' is the procedural set (no download needed)")
    p.add_argument("--root", default=None,
                   help="dataset folder (or the .jsonl file for --data manifest)")
    p.add_argument("--n", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--ensemble", type=int, default=1,
                   help="samples per image (seeds seed..seed+K-1), merged by a GT-free median")
    p.add_argument("--steps", type=int, default=50, help="sampling steps per sample")
    p.add_argument("--alignment", default="least_squares", choices=ALIGNMENTS,
                   help="how predictions are fitted to the GT before scoring")
    p.add_argument("--seed", type=int, default=0, help="seed of the first ensemble member")
    p.add_argument("--out", default=None, help="new or empty output folder (default eval_out/<data>)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampling batch")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--n", args.n), ("--ensemble", args.ensemble), ("--steps", args.steps),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")


def evaluate(args: argparse.Namespace) -> None:
    """Evaluate and write the report into --out (default eval_out/<data>), which must be new or
    empty: it is checked before the model is loaded, and filled only once everything succeeded."""
    check_args(args)
    out = args.out or os.path.join("eval_out", args.data)
    check_out_dir(out)
    device = pick_device(args.device)
    model, tok = checkpoint.load_checkpoint(args.ckpt, device=device, ema=True)
    if not model.cfg.has_depth:
        raise UserError(f"checkpoint {args.ckpt} has no depth stream (train --stage mofo)")
    ds = get_eval_dataset(args.data, args.root, args.n, model.cfg.res)
    with staged_dir(out) as stage:
        run(args, model, tok, ds, device, stage)
    print(f"wrote {out}/")


def run(args: argparse.Namespace, model: torch.nn.Module, tok, ds, device: torch.device, stage: str) -> None:
    """The evaluation loop proper; writes per_image.csv, summary.json, worst.png (+ maps)."""
    n = len(ds)  # every evaluation set already stops at --n
    baselines = ["mean"] + (["plane"] if args.data == "scenes" else [])
    if args.ensemble > 1:
        os.makedirs(os.path.join(stage, "uncertainty"))
    print(f"evaluating {args.ckpt} on {args.data}: {n} images at {model.cfg.res}px, "
          f"{args.steps} steps x {args.ensemble} samples, alignment {args.alignment}, {device}")

    rows, model_m, base_m = [], [], {b: [] for b in baselines}
    worst: list[tuple[float, np.ndarray]] = []   # (abs_rel, picture row) of the 4 worst so far
    skipped, t0 = 0, time.time()
    for start in range(0, n, args.batch_size):
        items = [ds[i] for i in range(start, min(n, start + args.batch_size))]
        preds, spreads = predict_batch(model, tok, [it["rgb"] for it in items], steps=args.steps,
                                       ensemble=args.ensemble, seed=args.seed, device=device)
        for j, (item, pred, spread) in enumerate(zip(items, preds, spreads)):
            idx, gt, valid = start + j, item["depth"], item["valid"]
            if not valid.any():  # e.g. a manifest row without depth: nothing to score
                skipped += 1
                continue
            span = (item["min_depth"], item["max_depth"])
            m = depth_metrics(pred, gt, valid, args.alignment, *span)
            row = {"index": idx, "name": item["name"], **m}
            model_m.append(m)
            for b in baselines:
                # held-out scene i is scene TEST_OFFSET + i (evalsets.SceneEvalDataset), at model res
                bp = mean_baseline(gt) if b == "mean" else \
                    scene_plane_baseline(scenes.TEST_OFFSET + idx, model.cfg.res)
                bm = depth_metrics(bp, gt, valid, args.alignment, *span)
                base_m[b].append(bm)
                row[f"{b}_abs_rel"], row[f"{b}_delta1"] = bm["abs_rel"], bm["delta1"]
            rows.append(row)

            if len(worst) < 4 or m["abs_rel"] > worst[-1][0]:
                shown = align_depth(pred, gt, valid, args.alignment)
                shown = np.maximum(np.clip(shown, *span), 1e-6)   # what the metrics saw
                title = f"#{idx} {item['name'][:40]}  AbsRel {100 * m['abs_rel']:.2f}"
                worst = sorted(worst + [(m["abs_rel"], worst_row(item, shown, title))],
                               key=lambda w: -w[0])[:4]
            if spread is not None:
                np.save(os.path.join(stage, "uncertainty", f"{idx:05d}.npy"), spread)
                scale = max(float(np.percentile(spread, 99)), 1e-12)
                save_png(os.path.join(stage, "uncertainty", f"{idx:05d}.png"), error_colormap(spread / scale))

        done, elapsed = start + len(items), time.time() - t0
        if model_m:
            running = mean_metrics(model_m)
            print(f"[{done}/{n}] AbsRel {100 * running['abs_rel']:.2f} "
                  f"d1 {100 * running['delta1']:.1f} | {done / elapsed:.2f} img/s | "
                  f"eta {fmt_time((n - done) * elapsed / done)}", flush=True)

    if not model_m:
        raise UserError("no image had valid ground-truth depth")
    summary = {
        "data": args.data, "n": len(model_m), "skipped": skipped,
        "checkpoint": os.path.abspath(args.ckpt),
        "alignment": args.alignment, "ensemble": args.ensemble, "steps": args.steps,
        "seed": args.seed, "res": model.cfg.res, "seconds": round(time.time() - t0, 2),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": mean_metrics(model_m),
        "baselines": {b: mean_metrics(ms) for b, ms in base_m.items()},
        "args": vars(args),
    }
    write_csv(os.path.join(stage, "per_image.csv"), rows)
    write_json(os.path.join(stage, "summary.json"), summary)
    save_png(os.path.join(stage, "worst.png"), stack_rows([w[1] for w in worst]))

    # final table; AbsRel and delta1 are printed x100 (the dicts hold fractions)
    print(f"\n{'':<28}{'AbsRel x100':>12}{'delta1 x100':>13}")
    table = [(f"model (K={args.ensemble}, {args.steps} steps)", summary["model"])]
    table += [(f"{b} baseline", m) for b, m in summary["baselines"].items()]
    for label, m in table:
        print(f"{label:<28}{100 * m['abs_rel']:>12.2f}{100 * m['delta1']:>13.1f}")


def main(argv: list[str] | None = None) -> None:
    evaluate(parse_args(argv))


if __name__ == "__main__":
    cli(main, "evaluate.py")
