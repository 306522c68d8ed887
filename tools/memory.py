"""Training memory per GPU on paper, for SCALING.md: DDP against FSDP, with and without activation
checkpointing, and from it the largest batch per GPU.

    .venv/bin/python tools/memory.py                      # base, large, xl at 256 px on 8 GPUs, 80 GB
    .venv/bin/python tools/memory.py --configs xl --gpus 16 --gpu-gb 141

Nothing is allocated and no GPU is needed. Parameter counts are the real ones (the model built on
the meta device). Activations per sample are counted, not estimated: one batch-1 forward on the
meta device with bf16 weights (the depth head fp32, as FSDP's mixed precision and autocast keep
it) and the Triton path of the attention and QK-norm kernels (their custom ops' shape-only fakes:
exactly the tensors the CUDA autograd functions save), summing the bytes of each distinct
non-parameter storage that autograd saves for the backward pass. With activation checkpointing
only the inputs of each block stay (plus what is saved outside the blocks), and the backward
recomputes one block at a time, so the largest block's own saved storages are added once.

Fixed bytes per GPU (P parameters, N GPUs), fp32 master weights, gradients, AdamW and EMA:
  DDP : weights 4P, gradients 4P + 4P (DDP's bucket copies), AdamW 8P, EMA 4P, plus the bf16
        copies of the weights that autocast saves for the backward pass, 2P.
  FSDP: weights, gradients, AdamW and EMA divided by N, plus what is unsharded at a time: the
        root's bf16 weights (kept through the step) and about 10 bytes per parameter of the
        largest block (bf16 weights of the block running and of the one prefetched, its bf16
        gradient and the fp32 copy reduce-scattered).
Not counted: the CUDA context, NCCL buffers, allocator fragmentation, the loss's temporaries,
transient gradients of activations in the backward pass, torch.compile's different choice of what
to save; --grad-accum > 1 under FSDP adds unsharded fp32 gradients (4P) between micro-batches.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import mofo  # noqa: E402
from kernels import flash_attention, qknorm_rope  # noqa: E402
from train import blocks  # noqa: E402

GB = 1e9


@contextlib.contextmanager
def meta_forward():
    """Let a forward run on the meta device: the autocast queries and guards of mofo.py do not
    accept "meta" (autocast is off there anyway), and the kernels take their custom ops, whose
    fakes give the outputs' shapes without launching anything."""
    saved = torch.is_autocast_enabled, torch.autocast, kernels._use_triton, \
        flash_attention.eager_or_op, qknorm_rope.eager_or_op
    enabled, autocast = saved[0], saved[1]
    torch.is_autocast_enabled = lambda dev=None: False if dev == "meta" else enabled(*([dev] if dev else []))
    torch.autocast = lambda device_type, **kw: contextlib.nullcontext() if device_type == "meta" \
        else autocast(device_type, **kw)
    kernels._use_triton = lambda x: True
    flash_attention.eager_or_op = qknorm_rope.eager_or_op = lambda eager, op: op
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.autocast, kernels._use_triton, \
            flash_attention.eager_or_op, qknorm_rope.eager_or_op = saved


def count(name: str, res: int) -> dict:
    """Parameter counts and saved bytes of one sample, without and with activation checkpointing."""
    with torch.device("meta"):
        model = mofo.MoFo(mofo.get_config(name, res=res))
        batch = dict(rgb=torch.zeros(1, 3, res, res), t_rgb=torch.zeros(1),
                     text=torch.zeros(1, model.cfg.text_len, dtype=torch.long),
                     depth=torch.zeros(1, res, res), t_depth=torch.zeros(1))
    for n, p in model.named_parameters():
        if not mofo.keeps_fp32(n):
            p.data = p.data.to(torch.bfloat16)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    sizes: dict[int, int] = {}
    where: dict[str, set[int]] = {"outside": set()}
    inputs: set[int] = set()
    current, alive = ["outside"], []

    def key(t: torch.Tensor) -> int:
        """A storage's identity; the tensor is kept alive so that no later storage reuses it."""
        alive.append(t)
        sizes[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t.untyped_storage()._cdata

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = key(t)
        if k not in params and not any(k in s for s in where.values()):
            where[current[0]].add(k)
        return t

    def enter(i):
        def hook(_module, args):
            current[0] = f"block {i}"
            where[current[0]] = set()
            inputs.update(key(t) for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor))
        return hook

    for i, blk in enumerate(blocks(model)):
        blk.register_forward_pre_hook(enter(i))
        blk.register_forward_hook(lambda *_: current.__setitem__(0, "outside"))
    with meta_forward(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)

    def nbytes(keys) -> int:
        return sum(sizes[k] for k in keys)
    kept = where["outside"] | (inputs - params)
    per_block = [nbytes(s - kept) for b, s in where.items() if b != "outside"]
    block_params = [sum(p.numel() for p in blk.parameters()) for blk in blocks(model)]
    return {"params": model.num_params(), "block_params": max(block_params),
            "root_params": model.num_params() - sum(block_params),
            "act": nbytes(set().union(*where.values())), "act_ac": nbytes(kept) + max(per_block)}


def fixed_bytes(c: dict, fsdp: bool, gpus: int) -> dict:
    """Bytes per GPU that do not grow with the batch (the module docstring says what is in each)."""
    P = c["params"]
    if not fsdp:
        return {"weights": 4 * P, "grads": 8 * P, "adamw": 8 * P, "ema": 4 * P, "copies": 2 * P}
    return {"weights": 4 * P / gpus, "grads": 4 * P / gpus, "adamw": 8 * P / gpus, "ema": 4 * P / gpus,
            "copies": 2 * c["root_params"] + 10 * c["block_params"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["base", "large", "xl"], choices=list(mofo.PRESETS))
    p.add_argument("--res", type=int, default=256, help="training resolution in pixels")
    p.add_argument("--gpus", type=int, default=8, help="GPUs FSDP shards over")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="memory per GPU in GB (1e9 bytes)")
    args = p.parse_args()
    print("| preset | params | strategy | weights | gradients | AdamW | EMA | working copies | fixed total | "
          "act/sample | act/sample, AC | max batch/GPU | max batch/GPU, AC |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        c = count(name, args.res)
        for fsdp in (False, True):
            f = fixed_bytes(c, fsdp, args.gpus)
            total = sum(f.values())
            free = args.gpu_gb * GB - total
            fits = [max(0, int(free // a)) for a in (c["act"], c["act_ac"])]
            print(f"| {name} | {c['params'] / 1e6:.1f} M | {f'FSDP x{args.gpus}' if fsdp else 'DDP'} | "
                  + " | ".join(f"{f[k] / GB:.2f}" for k in ("weights", "grads", "adamw", "ema", "copies"))
                  + f" | {total / GB:.2f} | {c['act'] / GB:.3f} | {c['act_ac'] / GB:.3f} | {fits[0]} | {fits[1]} |")
    print(f"\nGB = 1e9 bytes; res {args.res} px; batch limits: floor(({args.gpu_gb:g} GB - fixed total) / act/sample).")


if __name__ == "__main__":
    main()
