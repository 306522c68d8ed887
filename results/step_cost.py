"""
Milliseconds per MoFo training step of a preset on random inputs: the flow-matching loss, its
backward, gradient clipping and fused AdamW, nothing else (no data, no EMA, no logging)
(results/demo.md, "Batch 8").

    OMP_NUM_THREADS=1 .venv/bin/python results/step_cost.py --batch-size 8 16 32

The mean of 30 steps after 5 warm-up steps, per batch size, one after the other in one process.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mofo  # noqa: E402


def step_ms(cfg: mofo.Config, batch: int, bf16: bool, steps: int = 30, warmup: int = 5) -> float:
    torch.manual_seed(0)
    model = mofo.MoFo(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)
    R = cfg.res
    rgb, depth = torch.rand(batch, 3, R, R) * 2 - 1, torch.rand(batch, R, R)
    text, valid = torch.randint(0, cfg.vocab_size, (batch, cfg.text_len)), torch.rand(batch, R, R) > 0.2
    g = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss, _ = mofo.flow_loss(model, rgb, text, depth, valid, generator=g)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=list(mofo.PRESETS), help="model preset")
    p.add_argument("--batch-size", type=int, nargs="+", default=[8, 16, 32], help="batch sizes to time")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast or plain fp32")
    args = p.parse_args()
    cfg = mofo.get_config(args.config)
    print(f"{args.config}, {cfg.res} px, {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for b in args.batch_size:
        print(f"batch {b:4d}: {step_ms(cfg, b, args.dtype == 'bf16'):7.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
