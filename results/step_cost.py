"""
Milliseconds per MoFo training step of a preset on one random batch: train.train_step itself (the
flow-matching loss, backward, clipping, fused AdamW, EMA), without data loading or logging
(results/demo.md, "Batch 8").

    OMP_NUM_THREADS=1 .venv/bin/python results/step_cost.py --batch-size 8 16 32

The mean of 30 steps after 5 warm-up steps, per batch size, one after the other in one process.
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mofo  # noqa: E402
import train  # noqa: E402


def step_ms(preset: str, batch: int, dtype: str, steps: int = 30, warmup: int = 5) -> float:
    args = train.parse_args(["--config", preset, "--out", "unused", "--batch-size", str(batch), "--dtype", dtype])
    torch.manual_seed(0)
    model = mofo.MoFo(mofo.get_config(preset))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = train.make_optimizer(model, args)
    R, cfg = model.cfg.res, model.cfg
    micro = {"rgb": torch.rand(batch, 3, R, R) * 2 - 1, "depth": torch.rand(batch, R, R),
             "text": torch.randint(0, cfg.vocab_size, (batch, cfg.text_len)), "valid": torch.rand(batch, R, R) > 0.2}
    for step in range(warmup):
        train.train_step(args, step, model, model, ema, opt, [micro])
    t = time.perf_counter()
    for step in range(warmup, warmup + steps):
        train.train_step(args, step, model, model, ema, opt, [micro])
    return 1000 * (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=list(mofo.PRESETS), help="model preset")
    p.add_argument("--batch-size", type=int, nargs="+", default=[8, 16, 32], help="batch sizes to time")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast or plain fp32")
    args = p.parse_args()
    res = mofo.PRESETS[args.config].res
    print(f"{args.config}, {res} px, {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for b in args.batch_size:
        print(f"batch {b:4d}: {step_ms(args.config, b, args.dtype):7.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
