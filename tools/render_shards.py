"""
Pre-render built-in scenes into tar shards, for GPUs that train faster than the CPUs can render.

    .venv/bin/python tools/render_shards.py --n 100000 --res 256 --out shards/ --workers 16
    .venv/bin/python train.py --data shards --data-path shards/ ...

Each sample is <key>.png (RGB), <key>.txt (caption) and <key>.depth.npy (z-depth in metres, 0 on
sky): the layout `train.py --data shards` reads (data.ShardDataset). Training scene i is the same
scene as with `--data scenes`; sparse masks are drawn when training reads the shards.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import UserError, cli, staged_dir  # noqa: E402
from scenes import render_scene  # noqa: E402


def encode(args: tuple[int, int]) -> list[tuple[str, bytes]]:
    """Scene index at res -> the (name, bytes) members of one sample."""
    index, res = args
    scene = render_scene(index, res)
    png, npy = io.BytesIO(), io.BytesIO()
    Image.fromarray(scene["rgb"]).save(png, format="PNG")
    np.save(npy, scene["depth"])
    key = f"{index:09d}"
    return [(f"{key}.png", png.getvalue()), (f"{key}.txt", scene["caption"].encode()),
            (f"{key}.depth.npy", npy.getvalue())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Pre-render built-in training scenes into tar shards.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, required=True, help="number of scenes (training scenes 0..n-1)")
    p.add_argument("--res", type=int, default=256, help="image size in pixels")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per tar file")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="rendering processes")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    args = p.parse_args(argv)
    if args.n < 1 or args.res < 8 or args.per_shard < 1 or args.workers < 1:
        raise UserError("--n, --per-shard and --workers must be >= 1 and --res >= 8")
    t0 = time.time()
    with staged_dir(args.out) as tmp, Pool(args.workers) as pool:
        samples = pool.imap(encode, ((i, args.res) for i in range(args.n)), chunksize=16)
        for first in range(0, args.n, args.per_shard):
            with tarfile.open(os.path.join(tmp, f"scenes-{first // args.per_shard:05d}.tar"), "w") as tar:
                for _ in range(min(args.per_shard, args.n - first)):
                    for name, blob in next(samples):
                        info = tarfile.TarInfo(name)
                        info.size = len(blob)
                        tar.addfile(info, io.BytesIO(blob))
            done = min(first + args.per_shard, args.n)
            print(f"{done}/{args.n} scenes, {done / (time.time() - t0):.0f} scenes/s", flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    cli(main, "render_shards.py")
