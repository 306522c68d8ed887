"""
Sampling settings against held-out scenes, one model load for the whole sweep (results/sampling.md).

    OMP_NUM_THREADS=1 .venv/bin/python results/sweep_sampling.py --ckpt runs/base/mofo --offset 64 --n 128 \\
        --part i2d            # steps x ensemble x schedule shift, i2d AbsRel / delta1
    ... --part gen            # joint / d2i: guidance scale x steps, adherence and d2i depth faithfulness
    ... --part hold           # i2d steps with the pixels that have no ground truth kept at noise

Each line: the setting, its metrics (x100) and the seconds it took (wall clock on a shared machine).
The schedule shift is mofo.SHIFT_MU, which mofo.sample reads at call time; it is restored after
each setting (training is not run here).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import adherence  # noqa: E402
import checkpoint  # noqa: E402
import data  # noqa: E402
import evaluate as ev  # noqa: E402
import mofo  # noqa: E402
import scenes  # noqa: E402
from common import from_uint8  # noqa: E402
from evalsets import SceneEvalDataset  # noqa: E402


def i2d(model, tok, items, steps, ensemble, shift, bs):
    default, mofo.SHIFT_MU = mofo.SHIFT_MU, shift
    try:
        preds = []
        for s in range(0, len(items), bs):
            preds += ev.predict_batch(model, tok, [it["rgb"] for it in items[s:s + bs]], steps=steps,
                                      ensemble=ensemble, seed=0, device="cpu")[0]
    finally:
        mofo.SHIFT_MU = default
    return ev.mean_metrics([ev.depth_metrics(p, it["depth"], it["valid"]) for p, it in zip(preds, items)])


@torch.no_grad()
def i2d_hold(model, tok, items, steps, hold):
    """i2d with mofo.sample's Euler steps, written out so that with `hold` the depth pixels without
    ground truth (the sky) stay at their initial noise at every step, as missing depth is in
    training. A diagnostic only: it reads the ground truth's mask, which a real input lacks."""
    rgb = from_uint8(np.stack([it["rgb"] for it in items]))
    if rgb.shape[-1] != model.cfg.res:
        raise SystemExit("--part hold needs evaluation images at the model's resolution")
    unknown = torch.from_numpy(np.stack([~it["valid"] for it in items]))
    ids = data.encode_text(tok, [""] * len(items), model.cfg.text_len)
    eps = torch.randn(unknown.shape, generator=torch.Generator().manual_seed(0))
    x, zero, (_, t) = eps.clone(), torch.zeros(len(items)), mofo.rollout_timesteps(steps, "i2d")
    for i in range(steps):
        td = torch.full((len(items),), float(t[i]))
        x = torch.where(unknown, eps, x) if hold else x
        x = x + float(t[i + 1] - t[i]) * mofo.velocity(x, model(rgb, zero, ids, x, td)[1], td)
    preds = mofo.denormalize_depth(x).numpy()
    return ev.mean_metrics([ev.depth_metrics(p, it["depth"], it["valid"]) for p, it in zip(preds, items)])


def gen(model, tok, items, mode, steps, cfg, i2d_steps, bs):
    imgs = []
    for s in range(0, len(items), bs):
        imgs += ev.generate_batch(model, tok, items[s:s + bs], mode, steps=steps, cfg=cfg, log2_alpha=5.0,
                                  seed=s, device="cpu")[0]
    objects = [scenes.sample_scene(it["scene"]).objects for it in items]
    out = adherence.score_set(imgs, objects)
    if mode == "d2i":
        est = []
        for s in range(0, len(imgs), bs):
            est += ev.predict_batch(model, tok, imgs[s:s + bs], steps=i2d_steps, ensemble=1, seed=0, device="cpu")[0]
        out["faithful_abs_rel"] = float(np.mean([ev.depth_metrics(e, it["depth"], it["valid"])["abs_rel"]
                                                 for e, it in zip(est, items)]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--offset", type=int, default=64)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--part", choices=["i2d", "gen", "hold"], required=True)
    ap.add_argument("--settings", default=None,
                    help="i2d: steps:ensemble:shift,... ; gen: mode:steps:cfg,... (default: the full grid)")
    ap.add_argument("--i2d-steps", type=int, default=1, help="gen: i2d steps for d2i faithfulness")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    model, tok = checkpoint.load_checkpoint(args.ckpt, device="cpu", ema=True)
    ds = SceneEvalDataset(model.cfg.res, args.n, args.offset)
    items = [ds[i] for i in range(len(ds))]
    if args.part == "i2d":
        grid = args.settings or ",".join([f"{s}:1:1.1" for s in (1, 2, 4, 10, 30, 50)]
                                         + [f"{s}:{k}:1.1" for k in (4, 10) for s in (1, 4, 10)]
                                         + [f"{s}:1:{mu}" for mu in (0.0, 0.5, 2.0) for s in (4, 10, 30)])
        print("| steps | ensemble | shift mu | AbsRel x100 | delta1 x100 | seconds |\n|---|---|---|---|---|---|")
        for setting in grid.split(","):
            steps, k, mu = setting.split(":")
            t0 = time.time()
            m = i2d(model, tok, items, int(steps), int(k), float(mu), args.batch_size)
            print(f"| {steps} | {k} | {mu} | {100 * m['abs_rel']:.2f} | {100 * m['delta1']:.1f} | "
                  f"{time.time() - t0:.0f} |", flush=True)
    elif args.part == "hold":
        print("| steps | unknown pixels | AbsRel x100 | delta1 x100 |\n|---|---|---|---|")
        for steps in (args.settings or "1,2,4,10,30").split(","):
            for hold in (False, True):
                m = i2d_hold(model, tok, items, int(steps), hold)
                print(f"| {steps} | {'held at noise' if hold else 'follow the ODE'} | {100 * m['abs_rel']:.2f} | "
                      f"{100 * m['delta1']:.1f} |", flush=True)
    else:
        grid = args.settings or ",".join(f"{mode}:30:{c}" for mode in ("joint", "d2i") for c in (1, 2, 4, 7))
        print("| mode | steps | cfg | adherence x100 (colour / relation / both) | random caption | "
              "d2i faithfulness AbsRel x100 | seconds |\n|---|---|---|---|---|---|---|")
        for setting in grid.split(","):
            mode, steps, cfg = setting.split(":")
            t0 = time.time()
            r = gen(model, tok, items, mode, int(steps), float(cfg), args.i2d_steps, args.batch_size)
            print(f"| {mode} | {steps} | {cfg} | {ev._rates(r['matched'])} | {ev._rates(r['mismatched'])} | "
                  f"{100 * r['faithful_abs_rel']:.2f} | {time.time() - t0:.0f} |" if mode == "d2i" else
                  f"| {mode} | {steps} | {cfg} | {ev._rates(r['matched'])} | {ev._rates(r['mismatched'])} | - | "
                  f"{time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
