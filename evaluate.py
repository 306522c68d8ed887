"""
Evaluation of a MoFo checkpoint: zero-shot affine-invariant depth (i2d) on any evaluation set, and
on held-out procedural scenes (whose ground truth is exact) the other modes as well.

The protocol follows the one most diffusion depth estimators report (Marigold's), rewritten here
from its description:
  1. run i2d on each RGB image (letterboxed to the model resolution), map the relative depth back
     to the ground-truth resolution;
  2. fit a per-image scale and shift against the ground truth over valid pixels (least squares in
     depth space by default, because MoFo models relative *depth*, not disparity; `--alignment
     abs_rel` fits the scale and shift that minimise AbsRel instead: the paper's protocol, MoGe's fit);
  3. clip the aligned prediction to the dataset's depth range (and >= 1e-6);
  4. compute AbsRel, delta1..3, RMSE, SqRel and log10 per image over valid pixels, then average
     over images (not over the pooled pixels: every image weighs the same).

Optionally K samples with different seeds are ensembled without looking at the ground truth (see
`ensemble_depth`). Trivial baselines go through the very same alignment and metrics so a reader can
tell how much of a number the alignment alone explains.

On scenes (--tasks, default all four) each number stands beside a reference that tells what it
is worth:
  i2d       beside the constant map and the ground-truth plane (the scene rendered without its
            objects: exact on the floor, blind to what stands on it), with AbsRel also split into
            object and floor pixels (abs_rel_objects / abs_rel_floor; the same alignment, fitted
            on all pixels), which tells a model that reads the objects from one that only draws a
            floor;
  joint     caption -> RGB + depth: prompt adherence of the RGB (adherence.py: named colours present,
            relations in the right order) beside the same images scored against other scenes'
            captions (random caption) and the ground-truth renders (the scorer's ceiling);
            self-consistency: i2d on the generated RGB against the generated depth (AbsRel);
  d2i       depth + caption -> RGB: adherence as above; depth faithfulness: i2d on the generated RGB
            against the conditioning depth, and against another scene's depth (the chance level);
  complete  RGB + LiDAR-like known depth (data.lidar_mask) -> dense depth, scored on the pixels not
            given: metric (scaled to the known points by least squares, data.fit_scale) and
            affine-aligned, beside a nearest-known-point fill and the i2d prediction so scaled.

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

import adherence
import checkpoint
import data
import mofo
import scenes
from common import (UserError, check_out_dir, cli, colorize_depth, disparity_range, from_uint8, note_slow_bf16,
                    pick_device, save_png, staged_dir, to_uint8, use_kernels, wants_bf16, write_json)
from evalsets import get_eval_dataset

METRIC_KEYS = ("abs_rel", "delta1", "delta2", "delta3", "rmse", "sq_rel", "log10")
PIXEL_KIND_KEYS = ("abs_rel_objects", "abs_rel_floor")  # i2d on procedural scenes (depth_metrics objects=)
ALIGNMENTS = ("least_squares", "least_squares_disparity", "abs_rel", "median", "none")

# -----------------------------------------------------------------------------
# Scoring: affine-invariant predictions are fitted in scale (+ shift) to the GT, then compared


def _fit_scale_shift(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares y ~ a*x + b over 1-D arrays (any length >= 1), through centred moments (numerically
    nicer than the normal equations). For a constant x any line through the means fits: a = 1, shift only."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = x.mean(), y.mean()
    dx = x - mx
    var = float(np.mean(dx * dx))
    if var <= 1e-12 * max(float(np.mean(x * x)), 1e-300):  # a spread of ~1e-6 of the magnitude: constant
        return 1.0, float(my - mx)
    a = float(np.mean(dx * (y - my)) / var)
    return a, float(my - a * mx)


def _weighted_median(r: np.ndarray, w: np.ndarray) -> float:
    """A minimiser of sum w_i |r_i - m| over m: the first r (sorted) at which the weights reach half their sum."""
    order = np.argsort(r)
    cum = np.cumsum(w[order])
    return float(r[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _fit_abs_rel(x: np.ndarray, y: np.ndarray, tol: float = 1e-10) -> tuple[float, float]:
    """The scale a >= 0 and shift b that minimise sum |a*x + b - y| / y over 1-D arrays (y > 0): the AbsRel
    of the aligned map itself. For a fixed a the best b is the 1/y-weighted median of y - a*x, and the
    cost of that best b is convex in a, so a golden-section search over a finds the optimum."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    w = 1.0 / y

    def cost(a: float) -> tuple[float, float]:
        b = _weighted_median(y - a * x, w)
        return float(np.sum(w * np.abs(a * x + b - y))), b

    if np.ptp(x) <= 1e-6 * max(float(np.abs(x).max()), 1e-300):  # constant x: only the shift matters
        return 1.0, cost(1.0)[1]
    hi = max(abs(_fit_scale_shift(x, y)[0]), 1e-12)
    c_hi = cost(hi)[0]
    while (c_next := cost(2 * hi)[0]) < c_hi:  # convex: once doubling stops helping, the minimum is below 2*hi
        hi, c_hi = 2 * hi, c_next
    lo, hi = 0.0, 2 * hi
    width = hi  # the tolerance is relative to the first bracket, so an optimum at a = 0 ends the search too
    g = (math.sqrt(5) - 1) / 2
    a1, a2 = hi - g * (hi - lo), lo + g * (hi - lo)
    c1, c2 = cost(a1)[0], cost(a2)[0]
    while hi - lo > tol * width:
        if c1 <= c2:
            hi, a2, c2 = a2, a1, c1
            a1 = hi - g * (hi - lo)
            c1 = cost(a1)[0]
        else:
            lo, a1, c1 = a1, a2, c2
            a2 = lo + g * (hi - lo)
            c2 = cost(a2)[0]
    a = (lo + hi) / 2
    return a, cost(a)[1]


def _check_inputs(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Validate shapes and the GT on valid pixels; return the mask as bool."""
    if pred.shape != gt.shape or gt.shape != valid.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape}, gt {gt.shape}, valid {valid.shape}")
    valid = valid.astype(bool)
    if not valid.any():
        raise ValueError("empty valid mask: no ground-truth pixel to evaluate on")
    if not np.all(np.isfinite(gt[valid]) & (gt[valid] > 0)):
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
      abs_rel                  d' = a*d + b with a >= 0, (a, b) minimise the AbsRel itself, sum over valid of
                               |d' - gt| / gt: the objective MoGe's evaluation fits for affine-invariant
                               depth, as the paper scores i2d; unlike least squares, far pixels do not
                               dominate it
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
    if alignment == "abs_rel":
        a, b = _fit_abs_rel(pred[valid], gt[valid])
        return a * pred + b
    # disparity: a model's depth can be ~0 after an affine ensemble, so guard the inversion
    disp = 1.0 / np.maximum(pred, 1e-6)
    a, b = _fit_scale_shift(disp[valid], 1.0 / gt[valid].astype(np.float64))
    return 1.0 / np.maximum(a * disp + b, 1e-3)


def depth_metrics(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray,
                  alignment: str = "least_squares", min_depth: float = 1e-5,
                  max_depth: float = math.inf, objects: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of one image: align, clip to [min_depth, max_depth] and >= 1e-6, then compare.

    pred, gt: (H, W); valid: (H, W) bool. Returns raw fractions (not x100):
      abs_rel  mean |p - g| / g          sq_rel  mean (p - g)^2 / g
      rmse     sqrt(mean (p - g)^2)      log10   mean |log10 p - log10 g|
      deltaK   fraction with max(p/g, g/p) < 1.25^K, K = 1, 2, 3
    objects: (H, W) bool, the pixels of objects (scene_object_mask). With it, the same aligned AbsRel is
    also averaged over the valid object pixels (abs_rel_objects) and the others (abs_rel_floor), NaN
    where the image has none: the alignment is fitted on all valid pixels either way.
    """
    valid = _check_inputs(pred, gt, valid)
    aligned = align_depth(pred, gt, valid, alignment)
    p = np.maximum(np.clip(aligned[valid], min_depth, max_depth), 1e-6)
    g = gt[valid].astype(np.float64)
    diff = p - g
    ratio = np.maximum(p / g, g / p)
    m = {
        "abs_rel": float(np.mean(np.abs(diff) / g)),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25 ** 2)),
        "delta3": float(np.mean(ratio < 1.25 ** 3)),
        "rmse": float(np.sqrt(np.mean(diff * diff))),
        "sq_rel": float(np.mean(diff * diff / g)),
        "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
    }
    if objects is not None:
        rel, on_object = np.abs(diff) / g, objects[valid]
        m["abs_rel_objects"] = float(rel[on_object].mean()) if on_object.any() else math.nan
        m["abs_rel_floor"] = float(rel[~on_object].mean()) if not on_object.all() else math.nan
    return m


def mean_metrics(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Average per-image metric dicts key by key (each image counts once, whatever its size); an image
    whose value is NaN (e.g. no object pixels for abs_rel_objects) is left out of that key's mean."""
    if not per_image:
        raise ValueError("mean_metrics needs at least one image")
    out = {}
    for k in per_image[0]:
        vals = [m[k] for m in per_image if not math.isnan(m[k])]
        out[k] = float(np.mean(vals)) if vals else math.nan
    return out


def paired_difference(model: list[float], baseline: list[float]) -> dict[str, float]:
    """Per-image model minus baseline (e.g. AbsRel) on the same images: the mean difference, its
    standard error (the spread of the differences over sqrt(n); 0 for one image) and the fraction of
    images where the model's value is the smaller. A mean below zero by more than two standard errors
    says the model is better on this set of images, not on another draw of them."""
    d = np.asarray(model, float) - np.asarray(baseline, float)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"mean": float(d.mean()), "se": se, "model_lower": float(np.mean(d < 0))}


def ensemble_depth(preds: np.ndarray, fit_mask: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Merge K affine-invariant depth samples (K, H, W), without the GT, into (median, spread), each (H, W) float64.

    Each sample has its own unknown scale and shift: every member is aligned by least squares over fit_mask
    ((H, W) bool, e.g. the letterbox content; default all pixels) to member 0, then once more to the median of
    that first pass, so the result does not hinge on member 0. The spread is the median absolute deviation
    from the median: a robust per-pixel uncertainty in the same units.
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
    return ref, np.median(np.abs(aligned - ref), axis=0)


def mean_baseline(gt: np.ndarray) -> np.ndarray:
    """A constant map (all ones). After alignment it is the best constant: mean GT depth for
    least squares, median GT for median alignment, harmonic mean for the disparity fit, the 1/GT-weighted
    median for the abs_rel fit."""
    return np.ones(gt.shape, np.float64)


def empty_scene_depth(scene_index: int, res: int) -> np.ndarray:
    """(res, res) z-depth of procedural scene `scene_index` rendered without its objects, 0 off the ground."""
    r = scenes.render(dataclasses.replace(scenes.sample_scene(scene_index), objects=[]), res)
    return np.where(r["valid"], r["depth"].astype(np.float64), 0.0)


def scene_plane_baseline(scene_index: int, res: int, empty: np.ndarray | None = None) -> np.ndarray:
    """The 'flat ground' predictor of procedural scene `scene_index`: (res, res) z-depth of the scene
    rendered with no objects, so the best a model could do that knows the true camera but sees no object.
    Pixels where the ray never meets the ground (sky, or above the horizon) get the farthest ground depth.
    empty: empty_scene_depth(scene_index, res), when the caller has it already."""
    depth = empty_scene_depth(scene_index, res) if empty is None else empty
    on_ground = depth > 0
    if not on_ground.any():  # camera sees no ground: degenerate to the constant baseline
        return np.ones((res, res))
    return np.where(on_ground, depth, depth[on_ground].max())


def scene_object_mask(depth: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """The pixels of a scene's objects: where its depth (H, W) differs from empty_scene_depth's."""
    return np.abs(empty - depth) > 1e-4 * np.maximum(depth, 1.0)


# -----------------------------------------------------------------------------
# Running the model, in batches


@torch.no_grad()
def predict_batch(model: torch.nn.Module, tok, rgbs: list[np.ndarray], *, steps: int,
                  ensemble: int, seed: int, device: torch.device
                  ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """i2d on uint8 images (each (H_i, W_i, 3), any size), letterboxed to the model resolution and sampled
    `ensemble` times with seeds seed, seed+1, ... (the noise is per batch, so results depend on the batch
    size). Returns per image the relative depth (H_i, W_i) and, for ensemble > 1, the spread map (H_i, W_i)
    in the same units (else None)."""
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


@torch.no_grad()
def generate_batch(model: torch.nn.Module, tok, items: list[dict], mode: str, *, steps: int, cfg: float,
                   log2_alpha: float, seed: int, device: torch.device
                   ) -> tuple[list[np.ndarray], np.ndarray | None]:
    """joint (caption -> RGB + depth) or d2i (the item's depth + caption -> RGB) on square items at the model
    resolution. Returns uint8 images (res, res, 3) and the generated relative depth (B, res, res) (d2i: None)."""
    ids = data.encode_text(tok, [it["caption"] for it in items], model.cfg.text_len).to(device)
    cond = {}
    if mode == "d2i":  # unknown (sky) pixels are noise, as in training
        valid = torch.from_numpy(np.stack([it["valid"] for it in items]))
        depth = mofo.normalize_depth(torch.from_numpy(np.stack([it["depth"] for it in items])), valid)
        cond = {"depth": depth.to(device), "depth_valid": valid.to(device)}
    rgb, z = mofo.sample(model, ids, mode=mode, steps=steps, cfg_scale=cfg, seed=seed, res=model.cfg.res,
                         log2_alpha=log2_alpha if mode == "joint" else None, **cond)
    depth = mofo.denormalize_depth(z).cpu().numpy() if mode == "joint" else None
    return list(to_uint8(rgb)), depth


@torch.no_grad()
def complete_batch(model: torch.nn.Module, tok, items: list[dict], *, steps: int, seed: int,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Depth completion of square scene items: i2d given the LiDAR-like subset of the true depth
    (data.lidar_mask, the mask a `--sparse lidar` sample of that scene has) as known pixels.
    Returns (relative depth (B, res, res) with the known pixels kept, known masks (B, res, res))."""
    known = np.stack([data.lidar_mask(it["valid"], data._mask_rng(it["scene"])) for it in items])
    metric = np.stack([np.where(k, it["depth"], 0.0) for k, it in zip(known, items)]).astype(np.float32)
    z = mofo.normalize_depth(torch.from_numpy(metric), torch.from_numpy(known))
    ids = data.encode_text(tok, [""] * len(items), model.cfg.text_len).to(device)
    x = from_uint8(np.stack([it["rgb"] for it in items])).to(device)
    _, z = mofo.sample(model, ids, mode="i2d", rgb=x, depth=z.to(device),
                       depth_valid=torch.from_numpy(known).to(device), steps=steps, seed=seed)
    return mofo.denormalize_depth(z).cpu().numpy(), known


def nearest_fill(depth: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Every pixel takes the depth of its nearest known pixel (the completion baseline)."""
    kr, kc = np.nonzero(known)
    if kr.size == 0:
        return np.ones(depth.shape)
    r, c = np.indices(depth.shape).reshape(2, -1, 1)
    nearest = ((r - kr) ** 2 + (c - kc) ** 2).argmin(1)
    return depth[kr[nearest], kc[nearest]].reshape(depth.shape).astype(np.float64)


# -----------------------------------------------------------------------------
# Pictures and report files


def error_colormap(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to a black -> red -> yellow -> white ramp; returns uint8 (..., 3)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    rgb = np.clip(3.0 * x - np.array([0.0, 1.0, 2.0]), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def worst_row(item: dict, pred: np.ndarray, title: str, height: int = 192) -> np.ndarray:
    """One row of worst.png, each panel `height` px tall: RGB | GT | pred (aligned and clipped, as the metrics
    saw it) | |pred - gt| / gt on valid pixels, 0 (black) to 0.25 (white), invalid pixels grey."""
    gt, valid = item["depth"], item["valid"]
    h, w = gt.shape
    err_rgb = error_colormap(np.abs(pred - gt) / np.where(valid, gt, 1.0) / 0.25)
    err_rgb[~valid] = 64
    # one colour scale for both, taken from the GT: a prediction's outliers must not hide the GT
    scale = data.disparity_range(gt, valid)
    panels = [item["rgb"], data.colorize_depth(gt, valid, scale), data.colorize_depth(pred, None, scale), err_rgb]
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


def sheet(rows: list[list[np.ndarray]], size: int = 96) -> np.ndarray:
    """A grid of uint8 (h, w, 3) panels, each enlarged (nearest) to size x size."""
    def big(p):
        return np.asarray(Image.fromarray(np.ascontiguousarray(p)).resize((size, size), Image.NEAREST))
    return np.concatenate([np.concatenate([big(p) for p in r], axis=1) for r in rows], axis=0)


def write_csv(path: str, rows: list[dict]) -> None:
    """One line per row; the columns are the union of the rows' keys (missing values empty)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


# -----------------------------------------------------------------------------
# CLI

TASKS = ("i2d", "joint", "d2i", "complete")
SCENE_TASKS = ("joint", "d2i", "complete")  # need a scene's caption, objects and exact depth
# Sampling defaults are the recipe's (mofo.DEFAULT_STEPS, mofo.DEFAULT_CFG per mode; completion is
# i2d with known depth), measured on held-out scenes 64..191 (results/sampling.md).
EXAMPLE = """example:
  .venv/bin/python evaluate.py --ckpt runs/demo/mofo --data scenes --n 64 --out runs/demo/eval
  .venv/bin/python evaluate.py --ckpt runs/demo/mofo --data scenes --n 128 --offset 64 --tasks i2d,complete
  .venv/bin/python evaluate.py --ckpt runs/demo/mofo --data scenes --n 128 --split train --tasks i2d
  .venv/bin/python evaluate.py --ckpt runs/big --data nyu --data-path data/nyuv2 --ensemble 10"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a MoFo checkpoint: affine-invariant depth (i2d) beside "
                                "constant and ground-plane baselines; on held-out scenes also prompt adherence "
                                "(joint, d2i), depth faithfulness, self-consistency and LiDAR completion.",
                                epilog=EXAMPLE, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory written by train.py")
    p.add_argument("--data", required=True,
                   choices=["scenes", "nyu", "kitti", "eth3d", "scannet", "diode", "manifest"],
                   help="evaluation set; 'scenes' is the procedural set (no download needed)")
    p.add_argument("--data-path", "--root", dest="data_path", default=None,
                   help="dataset folder, or the .jsonl file for --data manifest (--root: same flag)")
    p.add_argument("--n", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--offset", type=int, default=0,
                   help="scenes: start at scene OFFSET of --split (e.g. 64 to stay clear of the demo's 0..63)")
    p.add_argument("--split", default="test", choices=["test", "train"],
                   help="scenes: the held-out scenes, or the training ones (to measure the train / test gap)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated subset of {','.join(TASKS)} (default: all for scenes, i2d otherwise; "
                        "joint, d2i and complete need the scenes' ground truth)")
    p.add_argument("--ensemble", type=int, default=1,
                   help="i2d samples per image (seeds seed..seed+K-1), merged by a GT-free median")
    p.add_argument("--steps", type=int, default=mofo.DEFAULT_STEPS["i2d"],
                   help="sampling steps of i2d and completion")
    p.add_argument("--gen-steps", type=int, default=mofo.DEFAULT_STEPS["joint"],
                   help="sampling steps of joint and d2i")
    p.add_argument("--cfg", type=float, default=None,
                   help=f"guidance scale of joint and d2i (default: joint {mofo.DEFAULT_CFG['joint']:g}, "
                        f"d2i {mofo.DEFAULT_CFG['d2i']:g})")
    p.add_argument("--log2-alpha", type=float, default=5.0, help="joint trajectory warp (>0: RGB first)")
    p.add_argument("--alignment", default="least_squares", choices=ALIGNMENTS,
                   help="how predictions are fitted to the GT before scoring (abs_rel: the fit that minimises "
                        "AbsRel, robust to far pixels; about 1 s per 0.3-megapixel image)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first ensemble member")
    p.add_argument("--out", default=None, help="new or empty output folder (default eval_out/<data>)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"], help="attention implementation")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="weights' dtype: auto = bf16 on CUDA (depth head fp32), as sample.py, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampling batch")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Validate the flags; --tasks becomes the list of tasks to run, in TASKS order."""
    for flag, value in (("--n", args.n), ("--ensemble", args.ensemble), ("--steps", args.steps),
                        ("--gen-steps", args.gen_steps), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.offset < 0 or (args.offset and args.data != "scenes"):
        raise UserError(f"--offset is a scene number (>= 0, --data scenes only), got {args.offset}")
    if args.split != "test" and args.data != "scenes":
        raise UserError(f"--split {args.split} is for --data scenes only; {args.data} is a test set")
    if isinstance(args.tasks, str):
        args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    elif args.tasks is None:
        args.tasks = list(TASKS) if args.data == "scenes" else ["i2d"]
    bad = [t for t in args.tasks if t not in TASKS]
    if bad or not args.tasks:
        raise UserError(f"--tasks: unknown task {','.join(bad) or '(none)'}; choose from {','.join(TASKS)}")
    if args.data != "scenes" and set(args.tasks) & set(SCENE_TASKS):
        raise UserError(f"--tasks {','.join(t for t in args.tasks if t in SCENE_TASKS)} needs --data scenes "
                        f"(captions, objects and exact depth); {args.data} has only i2d")
    args.tasks = [t for t in TASKS if t in args.tasks]


def evaluate(args: argparse.Namespace) -> None:
    """Evaluate and write the report into --out (default eval_out/<data>), which must be new or
    empty: it is checked before the model is loaded, and filled only once everything succeeded."""
    check_args(args)
    out = args.out or os.path.join("eval_out", args.data)
    check_out_dir(out)
    device = pick_device(args.device)
    use_kernels(args.kernels, device)
    note_slow_bf16(args.dtype, device, "evaluate.py")
    bf16 = wants_bf16(args.dtype, device)
    model, tok = checkpoint.load_checkpoint(args.ckpt, device=device, ema=True,
                                            dtype=torch.bfloat16 if bf16 else torch.float32)
    if not model.cfg.has_depth:
        raise UserError(f"checkpoint {args.ckpt} has no depth stream (train --stage mofo)")
    ds = get_eval_dataset(args.data, args.data_path, args.n, model.cfg.res, args.offset, args.split)
    with staged_dir(out) as stage:
        run(args, model, tok, ds, device, stage)
    print(f"wrote {out}/")


def run(args: argparse.Namespace, model: torch.nn.Module, tok, ds, device: torch.device, stage: str) -> None:
    """Every task in turn; writes per_image.csv, summary.json, worst.png (i2d), samples.png (scene
    tasks) and uncertainty maps (ensembles)."""
    t0 = time.time()
    split = " (training scenes)" if args.split == "train" else ""
    dtype = "bf16" if model.img_in.weight.dtype == torch.bfloat16 else "fp32"
    print(f"evaluating {args.ckpt} on {args.data}{split}: {len(ds)} images at {model.cfg.res}px, tasks "
          f"{','.join(args.tasks)}; i2d {args.steps} steps x {args.ensemble} samples, alignment "
          f"{args.alignment}, {device} {dtype}")
    summary = {"data": args.data, "n": len(ds), "tasks": args.tasks, "checkpoint": os.path.abspath(args.ckpt),
               "alignment": args.alignment, "ensemble": args.ensemble, "steps": args.steps, "seed": args.seed,
               "res": model.cfg.res, "dtype": dtype, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    rows: dict[int, dict] = {}
    keep = "complete" in args.tasks  # completion compares with the i2d predictions, scaled
    i2d_preds = run_i2d(args, model, tok, ds, device, stage, rows, summary, keep) if "i2d" in args.tasks else None
    if set(args.tasks) & set(SCENE_TASKS):
        run_scene_tasks(args, model, tok, [ds[i] for i in range(len(ds))], device, stage, rows, summary, i2d_preds)
    summary.update(seconds=round(time.time() - t0, 2), args=vars(args))
    write_csv(os.path.join(stage, "per_image.csv"), [rows[i] for i in sorted(rows)])
    write_json(os.path.join(stage, "summary.json"), summary)
    print_tables(args, summary)


def run_i2d(args, model, tok, ds, device, stage: str, rows: dict, summary: dict, keep: bool) -> list | None:
    """i2d on every image, scored beside the baselines; fills rows and summary, writes worst.png.
    Returns the predictions when `keep` (else None)."""
    n = len(ds)  # every evaluation set already stops at --n
    baselines = ["mean"] + (["plane"] if args.data == "scenes" else [])
    if args.ensemble > 1:
        os.makedirs(os.path.join(stage, "uncertainty"))
    model_m, base_m, kept = [], {b: [] for b in baselines}, []
    worst: list[tuple[float, np.ndarray]] = []   # (abs_rel, picture row) of the 4 worst so far
    skipped, t0 = 0, time.time()
    for start in range(0, n, args.batch_size):
        items = [ds[i] for i in range(start, min(n, start + args.batch_size))]
        preds, spreads = predict_batch(model, tok, [it["rgb"] for it in items], steps=args.steps,
                                       ensemble=args.ensemble, seed=args.seed, device=device)
        kept += preds if keep else []
        for j, (item, pred, spread) in enumerate(zip(items, preds, spreads)):
            idx, gt, valid = start + j, item["depth"], item["valid"]
            if not valid.any():  # e.g. a manifest row without depth: nothing to score
                skipped += 1
                continue
            span = (item["min_depth"], item["max_depth"])
            # on procedural scenes the error is also split into object and floor pixels
            empty = empty_scene_depth(item["scene"], model.cfg.res) if args.data == "scenes" else None
            objects = scene_object_mask(gt, empty) if empty is not None else None
            m = depth_metrics(pred, gt, valid, args.alignment, *span, objects=objects)
            row = rows.setdefault(idx, {"index": idx, "name": item["name"]})
            row.update(m)
            model_m.append(m)
            for b in baselines:
                bp = mean_baseline(gt) if b == "mean" else scene_plane_baseline(item["scene"], model.cfg.res, empty)
                bm = depth_metrics(bp, gt, valid, args.alignment, *span, objects=objects)
                base_m[b].append(bm)
                row[f"{b}_abs_rel"], row[f"{b}_delta1"] = bm["abs_rel"], bm["delta1"]

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
            print(f"i2d [{done}/{n}] AbsRel {100 * running['abs_rel']:.2f} "
                  f"d1 {100 * running['delta1']:.1f} | {done / elapsed:.2f} img/s | "
                  f"eta {fmt_time((n - done) * elapsed / done)}", flush=True)

    if not model_m:
        raise UserError("no image had valid ground-truth depth")
    summary.update(n=len(model_m), skipped=skipped, model=mean_metrics(model_m),
                   baselines={b: mean_metrics(ms) for b, ms in base_m.items()},
                   abs_rel_minus_baseline={b: paired_difference([m["abs_rel"] for m in model_m],
                                                                [m["abs_rel"] for m in ms])
                                           for b, ms in base_m.items()})
    save_png(os.path.join(stage, "worst.png"), stack_rows([w[1] for w in worst]))
    return kept if keep else None


def run_scene_tasks(args, model, tok, items: list[dict], device, stage: str, rows: dict, summary: dict,
                    i2d_preds: list | None) -> None:
    """joint, d2i and completion on held-out scenes; fills rows and summary, writes samples.png."""
    n, bs = len(items), args.batch_size
    objects = [scenes.sample_scene(it["scene"]).objects for it in items]
    other = [adherence.mismatched(i, n) for i in range(n)]
    summary["adherence_oracle"] = adherence.score_set([it["rgb"] for it in items], objects)
    shown = min(6, n)
    panels = [[it["rgb"], colorize_depth(it["depth"], it["valid"])] for it in items[:shown]]
    for mode in [m for m in ("joint", "d2i") if m in args.tasks]:
        cfg, t0 = mofo.DEFAULT_CFG[mode] if args.cfg is None else args.cfg, time.time()
        imgs, depths, est = [], [], []
        for start in range(0, n, bs):
            chunk = items[start:start + bs]
            rgb, dep = generate_batch(model, tok, chunk, mode, steps=args.gen_steps, cfg=cfg,
                                      log2_alpha=args.log2_alpha, seed=args.seed + start, device=device)
            imgs += rgb
            depths += [] if dep is None else list(dep)
            est += predict_batch(model, tok, rgb, steps=args.steps, ensemble=args.ensemble, seed=args.seed,
                                 device=device)[0]
            print(f"{mode} [{len(imgs)}/{n}] | {len(imgs) / (time.time() - t0):.2f} img/s", flush=True)
        counts = [adherence.score_image(im, ob) for im, ob in zip(imgs, objects)]
        res = {"steps": args.gen_steps, "cfg": cfg, "adherence": adherence.rates(counts),
               "adherence_random_caption": adherence.rates(
                   [adherence.score_image(im, objects[j]) for im, j in zip(imgs, other)])}
        for i, c in enumerate(counts):
            tests = c["colours"] + c["relations"]
            row = rows.setdefault(i, {"index": i, "name": items[i]["name"]})
            row[f"{mode}_adherence"] = (c["colours_ok"] + c["relations_ok"]) / tests if tests else math.nan
        if mode == "joint":  # i2d on the generated image against the generated depth
            res["log2_alpha"] = args.log2_alpha
            def consistency(e, d):
                return depth_metrics(e, d, np.ones(d.shape, bool), "least_squares")
            per = [consistency(e, d) for e, d in zip(est, depths)]
            res["self_consistency"] = mean_metrics(per)
            res["self_consistency_mismatched"] = mean_metrics([consistency(e, depths[j]) for e, j in zip(est, other)])
            for i, (p, d) in enumerate(zip(imgs[:shown], depths)):
                panels[i] += [p, colorize_depth(d)]
        else:  # i2d on the generated image against the conditioning depth (and another scene's)
            per = [depth_metrics(e, it["depth"], it["valid"], args.alignment) for e, it in zip(est, items)]
            res["depth_faithfulness"] = mean_metrics(per)
            res["depth_faithfulness_mismatched"] = mean_metrics(
                [depth_metrics(e, items[j]["depth"], items[j]["valid"], args.alignment) for e, j in zip(est, other)])
            for i, p in enumerate(imgs[:shown]):
                panels[i].append(p)
        for i, m in enumerate(per):
            rows[i][f"{mode}_{'self' if mode == 'joint' else 'faithful'}_abs_rel"] = m["abs_rel"]
        summary[mode] = res
    if "complete" in args.tasks:
        summary["complete"] = run_complete(args, model, tok, items, device, rows, i2d_preds, panels)
    save_png(os.path.join(stage, "samples.png"), sheet(panels))


def run_complete(args, model, tok, items: list[dict], device, rows: dict, i2d_preds: list | None,
                 panels: list) -> dict:
    """The completion task (see the module docstring); i2d_preds, when given, is scaled to the known points."""
    per = {k: [] for k in ("metric", "affine", "nearest", "i2d_scaled")}
    fraction, t0 = [], time.time()
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        rel, known = complete_batch(model, tok, chunk, steps=args.steps, seed=args.seed, device=device)
        for j, (it, r, k) in enumerate(zip(chunk, rel, known)):
            i, gt = start + j, it["depth"]
            mask, span = it["valid"] & ~k, (it["min_depth"], it["max_depth"])
            fraction.append(k.sum() / it["valid"].sum())
            metric = data.fit_scale(r, gt, k)[0] * r  # relative depth in metres, scaled to the known points
            per["metric"].append(depth_metrics(metric, gt, mask, "none", *span))
            per["affine"].append(depth_metrics(r, gt, mask, args.alignment, *span))
            per["nearest"].append(depth_metrics(nearest_fill(gt, k), gt, mask, "none", *span))
            if i2d_preds is not None:
                p = i2d_preds[i]
                per["i2d_scaled"].append(depth_metrics(data.fit_scale(p, gt, k)[0] * p, gt, mask, "none", *span))
            rows.setdefault(i, {"index": i, "name": it["name"]})["complete_abs_rel"] = per["metric"][-1]["abs_rel"]
            if i < len(panels):
                panels[i].append(colorize_depth(metric, None, disparity_range(gt, it["valid"])))
        print(f"complete [{start + len(chunk)}/{len(items)}] | "
              f"{(start + len(chunk)) / (time.time() - t0):.2f} img/s", flush=True)
    return {"steps": args.steps, "known_fraction": float(np.mean(fraction)),
            "metric": mean_metrics(per["metric"]), "affine": mean_metrics(per["affine"]),
            "baselines": {k: mean_metrics(per[k]) for k in ("nearest", "i2d_scaled") if per[k]}}


def print_tables(args, s: dict) -> None:
    """The final tables; AbsRel, delta1 and rates are printed x100 (the summary holds fractions)."""
    if "model" in s:
        # beside each baseline: the paired AbsRel difference (x100, two standard errors) and the share
        # of images on which the model has the lower AbsRel
        print(f"\n{'i2d':<28}{'AbsRel x100':>12}{'delta1 x100':>13}{'model - it (2 SE)':>20}{'model lower on':>16}")
        label = f"model (K={args.ensemble}, {args.steps} steps)"
        print(f"{label:<28}{100 * s['model']['abs_rel']:>12.2f}{100 * s['model']['delta1']:>13.1f}")
        for b, m in s["baselines"].items():
            d = s["abs_rel_minus_baseline"][b]
            diff = f"{100 * d['mean']:+.2f} ({200 * d['se']:.2f})"
            print(f"{b + ' baseline':<28}{100 * m['abs_rel']:>12.2f}{100 * m['delta1']:>13.1f}{diff:>20}"
                  f"{100 * d['model_lower']:>14.0f} %")
        if "abs_rel_objects" in s["model"]:
            kinds = ", ".join(f"{name} {100 * m['abs_rel_objects']:.2f} / {100 * m['abs_rel_floor']:.2f}"
                              for name, m in [("model", s["model"])] + list(s["baselines"].items()))
            print(f"i2d AbsRel x100 on object / floor pixels: {kinds}")
    if "adherence_oracle" in s:
        o = s["adherence_oracle"]
        print(f"\nprompt adherence x100 (colour / relation / both): ground-truth renders "
              f"{_rates(o['matched'])}, against other captions {_rates(o['mismatched'])}")
    for mode in [m for m in ("joint", "d2i") if m in s]:
        r = s[mode]
        print(f"{mode} ({r['steps']} steps, cfg {r['cfg']:g}): adherence {_rates(r['adherence'])}, "
              f"random caption {_rates(r['adherence_random_caption'])}")
    if "joint" in s:
        print(f"joint self-consistency (i2d of the RGB vs the depth): AbsRel "
              f"{100 * s['joint']['self_consistency']['abs_rel']:.2f}, against another sample's depth "
              f"{100 * s['joint']['self_consistency_mismatched']['abs_rel']:.2f}")
    if "d2i" in s:
        print(f"d2i depth faithfulness (i2d of the RGB vs the condition): AbsRel "
              f"{100 * s['d2i']['depth_faithfulness']['abs_rel']:.2f}, against another scene's depth "
              f"{100 * s['d2i']['depth_faithfulness_mismatched']['abs_rel']:.2f}")
    if "complete" in s:
        c = s["complete"]
        base = ", ".join(f"{k} {100 * m['abs_rel']:.2f}" for k, m in c["baselines"].items())
        print(f"completion ({100 * c['known_fraction']:.1f}% known): AbsRel metric {100 * c['metric']['abs_rel']:.2f} "
              f"(baselines: {base}), affine {100 * c['affine']['abs_rel']:.2f}")


def _rates(r: dict) -> str:
    return f"{100 * r['colour']:.1f} / {100 * r['relation']:.1f} / {100 * r['adherence']:.1f}"


def main(argv: list[str] | None = None) -> None:
    evaluate(parse_args(argv))


if __name__ == "__main__":
    cli(main, "evaluate.py")
