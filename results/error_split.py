"""
Where an i2d model's error lies on held-out scenes, beside the ground-truth-plane baseline
(results/demo.md, "Where the error is").

    OMP_NUM_THREADS=1 .venv/bin/python results/error_split.py --ckpt runs/base/mofo --offset 64 --n 128

Each prediction is aligned to the ground truth exactly as evaluate.py does (one step, seed 0, least
squares over all valid pixels or --alignment), then its AbsRel is averaged per image over pixel sets:
  floor    valid pixels whose depth is the ground plane's (the scene rendered without objects
           gives the same depth there),
  objects  the other valid pixels,
and the floor is split again by relative depth d / mean(d), near (bottom rows) to far (horizon).
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import evaluate as ev  # noqa: E402
import scenes  # noqa: E402

BUCKETS = ((0, 0.5), (0.5, 1), (1, 2), (2, 4), (4, np.inf))  # d / mean(d) over the valid pixels


def split(pred: np.ndarray, item: dict, objects: np.ndarray, alignment: str) -> dict:
    valid, gt = item["valid"], item["depth"].astype(np.float64)
    err = np.abs(ev.align_depth(pred, gt, valid, alignment) - gt) / np.where(valid, gt, 1)
    rel = gt / gt[valid].mean()
    floor = valid & ~objects
    out = {"all": err[valid].mean(), "floor": err[floor].mean() if floor.any() else np.nan,
           "objects": err[valid & objects].mean() if (valid & objects).any() else np.nan,
           "object_share": (valid & objects).sum() / valid.sum()}
    for lo, hi in BUCKETS:
        m = floor & (rel >= lo) & (rel < hi)
        out[f"floor {lo}-{hi:g}"] = err[m].mean() if m.any() else np.nan
        out[f"share {lo}-{hi:g}"] = m.sum() / max(floor.sum(), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run or checkpoint folder with a depth stream")
    p.add_argument("--offset", type=int, default=64, help="first held-out scene")
    p.add_argument("--n", type=int, default=128, help="number of held-out scenes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--alignment", default="least_squares", choices=ev.ALIGNMENTS, help="as in evaluate.py")
    args = p.parse_args()

    model, tok = checkpoint.load_checkpoint(args.ckpt)
    res = model.cfg.res
    indices = [scenes.TEST_OFFSET + i for i in range(args.offset, args.offset + args.n)]
    items = [scenes.render(scenes.sample_scene(i), res) for i in indices]
    empties = [ev.empty_scene_depth(i, res) for i in indices]  # each scene without its objects, rendered once
    objects = [ev.scene_object_mask(it["depth"], e) for it, e in zip(items, empties)]
    preds = []
    for b in range(0, len(items), args.batch_size):
        rgbs = [it["rgb"] for it in items[b:b + args.batch_size]]
        preds += ev.predict_batch(model, tok, rgbs, steps=1, ensemble=1, seed=0, device=torch.device("cpu"))[0]
    planes = [ev.scene_plane_baseline(i, res, e) for i, e in zip(indices, empties)]

    for name, source in (("model", preds), ("plane", planes)):
        rows = [split(pr, it, om, args.alignment) for pr, it, om in zip(source, items, objects)]
        mean = {k: 100 * float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
        buckets = " | ".join(f"{lo}-{hi:g}: {mean[f'floor {lo}-{hi:g}']:.1f} ({mean[f'share {lo}-{hi:g}']:.0f} % px)"
                             for lo, hi in BUCKETS)
        print(f"{name}: AbsRel all {mean['all']:.2f} | floor {mean['floor']:.2f} | objects {mean['objects']:.2f} "
              f"({mean['object_share']:.1f} % of valid px)\n    floor by d/mean: {buckets}")


if __name__ == "__main__":
    main()
