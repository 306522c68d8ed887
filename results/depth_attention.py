"""
Where the depth tokens look during i2d: for each joint-attention layer and head, the share of the
depth queries' attention that lands on text, RGB and depth keys, and on the RGB token at the
query's own grid position (results/demo.md, "Depth queries that do not read the image").

    OMP_NUM_THREADS=1 .venv/bin/python results/depth_attention.py --ckpt runs/demo/mofo [--raw]

The i2d inputs are those of a one-step sample: held-out scenes' clean RGB (t_rgb = 0), an empty
caption and pure-noise depth (t_depth = 1). In i2d the depth tokens carry no information, so a head
whose depth queries attend to depth keys reads nothing; the depth has to come from the RGB keys.
Uniform attention would give each key kind its share of the sequence, and the same-position RGB
key 1 / (number of RGB tokens).
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import data  # noqa: E402
from common import UserError, cli, from_uint8  # noqa: E402
import mofo  # noqa: E402
import scenes  # noqa: E402


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) in fp32: (B, heads, S, D) x 2 -> (B, heads, S, S)."""
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


@torch.no_grad()
def depth_query_shares(model: mofo.MoFo, tok, rgb: torch.Tensor, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Per joint-attention layer (triple blocks, then single blocks): the depth queries' mean attention
    share on text / RGB / depth keys and on the same-position RGB key, each (heads,)."""
    B, _, H, W = rgb.shape
    text = data.encode_text(tok, [""] * B, model.cfg.text_len)
    n_txt, n_img = text.shape[1], (H // model.cfg.patch) * (W // model.cfg.patch)
    probs = []

    def recording_attend(q, k, v):
        w = attention_probs(q, k)
        probs.append(w)
        return (w.to(v.dtype) @ v).transpose(1, 2).flatten(2)

    noise = torch.randn(B, H, W, generator=torch.Generator().manual_seed(seed))
    plain, mofo.attend = mofo.attend, recording_attend
    try:
        model(rgb, torch.zeros(B), text, noise, torch.ones(B))
    finally:
        mofo.attend = plain
    shares = []
    for w in probs:
        if w.shape[-1] != n_txt + 2 * n_img:  # the depth decoder attends over depth tokens only
            continue
        dq = w[:, :, n_txt + n_img:]  # (B, heads, n_img depth queries, S)
        img = dq[..., n_txt:n_txt + n_img]
        shares.append({"text": dq[..., :n_txt].sum(-1).mean((0, 2)).numpy(),
                       "rgb": img.sum(-1).mean((0, 2)).numpy(),
                       "depth": dq[..., n_txt + n_img:].sum(-1).mean((0, 2)).numpy(),
                       "rgb_same_position": torch.diagonal(img, dim1=-2, dim2=-1).mean((0, 2)).numpy()})
    return shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run or checkpoint folder with a depth stream")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--offset", type=int, default=64, help="first held-out scene")
    p.add_argument("--n", type=int, default=32, help="number of held-out scenes")
    args = p.parse_args()

    model, tok = checkpoint.load_checkpoint(args.ckpt, ema=not args.raw)
    if not model.cfg.has_depth:
        raise UserError(f"{args.ckpt} has no depth stream (a text-to-image checkpoint)")
    res = model.cfg.res
    items = [scenes.render(scenes.sample_scene(scenes.TEST_OFFSET + i), res)
             for i in range(args.offset, args.offset + args.n)]
    rgb = from_uint8(np.stack([it["rgb"] for it in items]))
    names = [f"triple {i}" for i in range(model.cfg.n_triple)] + [f"single {i}" for i in range(model.cfg.n_single)]
    n_txt, n_img = model.cfg.text_len, (res // model.cfg.patch) ** 2
    print(f"{args.ckpt} ({'raw' if args.raw else 'EMA'}), {args.n} held-out scenes; depth queries' attention "
          f"share per head (uniform: text {n_txt / (n_txt + 2 * n_img):.2f}, RGB or depth "
          f"{n_img / (n_txt + 2 * n_img):.2f}, same-position RGB {1 / (n_txt + 2 * n_img):.3f})")
    for name, s in zip(names, depth_query_shares(model, tok, rgb)):
        print(f"  {name:<9}" + " | ".join(f"{k} " + " ".join(f"{v:.2f}" if k != "rgb_same_position" else f"{v:.3f}"
                                                          for v in s[k]) for k in s))


if __name__ == "__main__":
    cli(main, "depth_attention.py")
