"""Benchmark the Triton kernels, a training step and the sampler on a CUDA GPU (BENCHMARKS.md).

Sections (``--only`` picks one; the ceilings always run first, every percentage is relative to them):

1. Ceilings measured on this GPU: a 2 GiB device-to-device copy and an 8192³ bf16 GEMM.
2. Attention, bf16, non-causal, (B, H, S, D): forward, backward and forward+backward of our
   kernels against SDPA with the backend pinned (flash, cuDNN, efficient; a backend that refuses a
   shape is n/a). FLOPs: forward 4·B·H·S²·D, backward 2.5 × forward, forward+backward 3.5 ×.
3. RMSNorm, bf16: ours against eager ``F.rms_norm`` and ``torch.compile`` of it. Bytes, the same
   for every implementation: forward 4·M·N + 4·M, backward 6·M·N + 4·M + 8·P·N (P = the partial rows the kernel launches).
   A shape marked "graph" (in either table) is timed as a CUDA-graph replay (forward,
   forward+backward): device time without the host's. It carries no target.
4. QK-norm + RoPE, bf16 (B, H, S, D): the fused kernel against the eager reference and
   ``torch.compile`` of it. Bytes: forward 4·M·D + 4·M, backward 6·M·D + 4·M + 8·P·D (M = B·H·S rows).
5. Training step (``--only step``): whole ``train.train_step`` calls with the "torch" and the
   "triton" backend (optionally with compiled blocks), outputs checked against the eager torch
   backend first; the median step time, throughput, MFU (model FLOPs = 3 × the counted forward)
   and the profiler's split of device time.
6. Sampler (``--only sample``): a 50-step joint sample with CFG of one image, bf16 weights, each
   backend eager and compiled: the seconds of the denoising loop.
7. Targets: every bar judged per shape as met, missed or not measured.

Correctness comes first: outputs and gradients against an fp32 (attention) or fp64 (RMSNorm)
reference, ‖out − ref‖ / ‖ref‖ above the tolerance is flagged FAIL. Kernel times are medians of
``triton.testing.do_bench`` (L2 flushed before every run; the correctness call autotunes first).
BENCHMARKS.md has the full protocol and the commands.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import math
import os
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
import kernels  # noqa: E402
from common import UserError, cli, write_json  # noqa: E402
from tools.timing import cuda_graph, do_bench_timer, error_text, fmt, print_table, rel_err, time_calls  # noqa: E402
import kernels.flash_attention as fa  # noqa: E402
import mofo  # noqa: E402
from kernels import qknorm_rope, rmsnorm  # noqa: E402

ATTN_SHAPES = [  # (B, H, S, D): 256 px and 512 px DiT joint sequences, plus a published-curve tie
    (48, 16, 640, 64), (48, 16, 640, 128), (48, 16, 589, 128),
    (16, 16, 2176, 64), (16, 16, 2176, 128), (4, 16, 4096, 128),
    (16, 24, 2176, 128),  # the xl preset's 24 heads of 128 at 512 px
    (1, 16, 640, 64, "graph"),  # one sample at 256 px, where the fixed cost per call shows
]
RMS_SHAPES = [  # (M, N): main-stream norm rows, QK-norm rows (B·S·H, head dim), a tiny-M graph row
    (32768, 1024), (32768, 2048), (32768, 3072),
    (491520, 64), (491520, 128), (557056, 64), (557056, 128),
    (256, 2048, "graph"),
]
QK_SHAPES = [  # (B, H, S, D): q of the base preset at 256 px, of the xl preset at 512 px, a graph row
    (32, 16, 576, 64), (16, 24, 2176, 128), (1, 16, 576, 64, "graph"),
]
SAMPLE_CONFIG = ("base", 50, 4.0)  # preset, Euler steps, guidance scale (joint, log2 alpha 5, batch 1)
SAMPLE_VARIANTS = [("torch", False), ("triton", False), ("torch", True), ("triton", True)]  # (backend, compiled)
DATASHEET = {"H100": (989.0, 3.35), "H200": (989.0, 4.8)}  # dense bf16 TFLOP/s, HBM TB/s
# (preset, batch, overrides): configs (a) and (b) of BENCHMARKS.md; the batch sizes fit the activations
# autograd saves per sample next to the fp32 weights, gradients, AdamW state and EMA.
STEP_CONFIGS = [
    ("base", 32, {}),                          # 256 px, width 1024 = 16 × 64, 576 tokens
    ("base", 2, {"res": 512, "width": 2048}),  # 512 px, width 2048 = 16 × 128, 2112 tokens
]
# The reference backend's attention in the step: cuDNN first, falling back in this order.
STEP_SDPA = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
PASSES = ("fwd", "bwd", "fwd+bwd")
# Module constants, so that tests/test_bench.py can dry-run the plumbing on CPU at toy sizes.
DEVICE = "cuda"
COPY_ELEMS = 1 << 30  # bf16 elements: a 2 GiB copy, far beyond L2
GEMM_N = 8192
ATTN_TOL = 2e-2
RMS_TOL = 2e-2
EPS = 1e-6


def step_label(preset: str, overrides: dict) -> str:
    return preset + "".join(f" {k}={v}" for k, v in overrides.items())


def _indices(table: list) -> Callable[[str], List[int]]:
    def parse(text: str) -> List[int]:
        try:
            idx = [int(t) for t in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected indices like 0,2 not {text!r}") from None
        if not idx or any(not 0 <= i < len(table) for i in idx):
            raise argparse.ArgumentTypeError(f"indices must lie in 0..{len(table) - 1}")
        return idx
    return parse


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark mofo's Triton kernels against PyTorch (needs a CUDA GPU).")
    p.add_argument("--only", choices=["attention", "rmsnorm", "qknorm", "step", "sample", "ceilings"], default=None,
                   help="run one section only (the ceilings always run first)")
    p.add_argument("--out", default=None, help="write the full results as JSON to this path")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup time per measurement, ms")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time per measurement, ms")
    p.add_argument("--step-compile", action="store_true",
                   help="step section: also time both backends under torch.compile (slow to compile)")
    p.add_argument("--step-iters", type=int, default=20,
                   help="step section: steps timed per variant, after 3 untimed ones (median reported)")
    # A full run autotunes a few hundred kernels; these selections split it over shorter runs.
    step_labels = [f"{step_label(preset, over)} batch {batch}" for preset, batch, over in STEP_CONFIGS]
    for flag, table, labels in (("--attn-shapes", ATTN_SHAPES, ATTN_SHAPES), ("--rms-shapes", RMS_SHAPES, RMS_SHAPES),
                                ("--qk-shapes", QK_SHAPES, QK_SHAPES), ("--step-configs", STEP_CONFIGS, step_labels)):
        p.add_argument(flag, type=_indices(table), default=None,
                       help="comma-separated indices to run (default all): "
                            + ", ".join(f"{i}={label}" for i, label in enumerate(labels)))
    return p.parse_args(argv)


def pick(table: list, idx: Optional[List[int]]) -> list:
    return table if idx is None else [table[i] for i in idx]


def measure(fn: Callable, inputs: tuple, dout, ref: tuple, tol: float, timer: Callable, graph: bool) -> dict:
    """Check ``fn(*inputs)`` (output, then the gradient of each input) against ``ref``, then time
    its passes. An exception (e.g. a backend refusing the shape) ends the record as n/a."""
    rec = {"rel_err": None, "ok": None, "ms": {}, "error": None}
    try:
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(dout)
        rec["rel_err"] = max(rel_err(a, b) for a, b in zip([out] + [t.grad for t in leaves], ref))
        rec["ok"] = rec["rel_err"] <= tol
        # Fresh leaves: nothing of the check's autograd graph may live on into a CUDA-graph capture.
        del out
        leaves = [t.clone().requires_grad_() for t in inputs]

        def fwd():
            with torch.no_grad():
                fn(*inputs)

        def fwd_bwd():
            for t in leaves:  # gradients written, not accumulated (no accumulation kernels)
                t.grad = None
            fn(*leaves).backward(dout)

        wrap = cuda_graph if graph else (lambda f: f)
        rec["ms"]["fwd"] = timer(wrap(fwd))
        rec["ms"]["fwd+bwd"] = timer(wrap(fwd_bwd))
        if not graph:
            out = fn(*leaves)
            rec["ms"]["bwd"] = timer(lambda: out.backward(dout, retain_graph=True), grad_to_none=leaves)
    except Exception as e:
        rec["error"] = error_text(e)
    return rec


def add_rates(row: dict, work: Dict[str, float], unit: str, ceiling: float, sheet: Optional[float]) -> None:
    """Per implementation: work / time in ``unit`` (TFLOPs or GBps; ceiling and sheet in it too)
    and as % of the measured ceiling and the datasheet; then the row's speedups, base ms / our
    ms (> 1: ours is faster), None where either was not timed."""
    scale = 1e12 if unit == "TFLOPs" else 1e9
    for rec in row["impls"].values():
        rec[unit] = {p: work[p] / (ms * 1e-3) / scale for p, ms in rec["ms"].items()}
        rec["pct_ceiling"] = {p: 100 * r / ceiling for p, r in rec[unit].items()}
        if sheet:
            rec["pct_datasheet"] = {p: 100 * r / sheet for p, r in rec[unit].items()}
    ours = row["impls"]["triton"]["ms"]
    row["speedup_vs"] = {base: {p: rec["ms"][p] / ours[p] if p in ours and p in rec["ms"] else None for p in PASSES}
                         for base, rec in row["impls"].items() if base != "triton"}


def report(title: str, results: List[dict], unit: str, tol: float, baselines: Dict[str, str]) -> None:
    """One table row per (shape, pass): ours, then each baseline's ms, then base/ours ratios."""
    header = (["shape", "pass", "ours ms", {"TFLOPs": "TFLOP/s", "GBps": "GB/s"}[unit], "%ceil", "relerr"]
              + [f"{label} ms" for label in baselines.values()] + [f"x{label}" for label in baselines.values()])
    rows = []
    for r in results:
        ours = r["impls"]["triton"]
        for p in PASSES:
            rows.append(
                [",".join(map(str, r["shape"])) + (" graph" if r["cuda_graph"] else ""), p,
                 fmt(ours["ms"].get(p)), fmt(ours[unit].get(p), ".0f"), fmt(ours["pct_ceiling"].get(p), ".0f"),
                 fmt(ours["rel_err"], ".1e") + ("" if ours["ok"] else " FAIL")]
                + [fmt(r["impls"][b]["ms"].get(p)) for b in baselines]
                + [fmt(r["speedup_vs"][b][p], ".2f") for b in baselines])
    print_table(title, header, rows)
    for r in results:
        for name, rec in r["impls"].items():
            if rec["error"] or rec["ok"] is False:
                problem = rec["error"] or f"rel_err {rec['rel_err']:.2e} above {tol:.0e}"
                print(f"  note {r['shape']} {name}: {problem}")


# 1. ceilings -------------------------------------------------------------------------------
def run_ceilings(timer: Callable) -> Dict[str, float]:
    src = torch.randn(COPY_ELEMS, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    copy_tbs = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12
    del src, dst
    a, b = (torch.randn(GEMM_N, GEMM_N, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))  # never zeros
    gms = timer(lambda: torch.mm(a, b))
    gemm_tflops = 2 * GEMM_N ** 3 / (gms * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    print_table("Ceilings (measured)", ["what", "ms", "rate"], [
        [f"{COPY_ELEMS * 2 / 2**30:g} GiB D2D copy (read+write)", fmt(ms), f"{copy_tbs:.2f} TB/s"],
        [f"{GEMM_N}^3 bf16 GEMM (random)", fmt(gms), f"{gemm_tflops:.0f} TFLOP/s"],
    ])
    return {"copy_ms": ms, "copy_TBps": copy_tbs, "gemm_ms": gms, "gemm_TFLOPs": gemm_tflops}


def run_table(timer: Callable, shapes: List[tuple], case: Callable, impls: Callable, tol: float,
              unit: str, ceiling: float, sheet: Optional[float]) -> List[dict]:
    """Every implementation of ``impls()`` (name -> (fn, context)) measured at every shape.

    ``case(*shape)`` gives (inputs, upstream gradient, reference output and gradients, work per
    pass); a trailing "graph" in a shape asks for CUDA-graph replays.
    """
    results = []
    for shape in shapes:
        graph = shape[-1] == "graph"
        shape = list(shape[:-1] if graph else shape)
        torch.manual_seed(0)
        inputs, dout, ref, work = case(*shape)
        row = {"shape": shape, "cuda_graph": graph, "work": work, "impls": {}}
        for name, (fn, ctx) in impls().items():
            with ctx():
                row["impls"][name] = measure(fn, inputs, dout, ref, tol, timer, graph)
            torch.cuda.empty_cache()
        add_rates(row, work, unit, ceiling, sheet)
        results.append(row)
        del inputs, dout, ref
    return results


# 2. attention -------------------------------------------------------------------------------
def attention_case(B: int, H: int, S: int, D: int) -> tuple:
    """bf16 q, k, v and dO; the fp32 output and gradients; FLOPs per pass."""
    q, k, v, do = (torch.randn(B, H, S, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    o = torch.softmax(qf @ kf.transpose(-1, -2) / math.sqrt(D), dim=-1) @ vf
    o.backward(do.float())
    fwd = 4.0 * B * H * S * S * D
    return (q, k, v), do, (o.detach(), qf.grad, kf.grad, vf.grad), {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}


def attention_impls() -> dict:
    def sdpa(backend):
        return F.scaled_dot_product_attention, lambda: sdpa_kernel([backend])

    return {"triton": (fa.flash_attention, contextlib.nullcontext), "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}


def run_attention(timer: Callable, ceil: Dict[str, float], sheet_tflops: Optional[float],
                  shapes: List[tuple]) -> List[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    results = []
    for shape in shapes:
        (row,) = run_table(timer, [shape], attention_case, attention_impls, ATTN_TOL, "TFLOPs",
                           ceil["gemm_TFLOPs"], sheet_tflops)
        row["impls"]["triton"]["configs"] = {  # what the autotuner picked at this shape
            name: str(getattr(getattr(fa, name), "best_config", "n/a"))
            for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")}
        results.append(row)
    report("Attention, bf16, non-causal, shape B,H,S,D (x<base> = base ms / ours ms; %ceil = % of measured "
           "GEMM; graph = device time of a CUDA-graph replay)", results, "TFLOPs", ATTN_TOL,
           {"sdpa_flash": "flash", "sdpa_cudnn": "cudnn", "sdpa_efficient": "eff"})
    return results


# 3. RMSNorm ---------------------------------------------------------------------------------
def rms_norm_case(M: int, N: int, p_rows: int) -> tuple:
    """bf16 x, weight and dy; the fp64 output and gradients; bytes per pass (P = ``p_rows``)."""
    x, dy = (torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    w = (1.0 + 0.5 * torch.randn(N, device=DEVICE)).to(torch.bfloat16)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS) * wd
    y.backward(dy.double())
    nbytes = {"fwd": 4.0 * M * N + 4 * M, "bwd": 6.0 * M * N + 4 * M + 8.0 * p_rows * N}
    return (x, w), dy, (y.detach(), xd.grad, wd.grad), {**nbytes, "fwd+bwd": nbytes["fwd"] + nbytes["bwd"]}


def triton_eager_compiled(triton_fn: Callable, eager_fn: Callable) -> Callable[[], dict]:
    """impls() for run_table: ours, the eager reference and torch.compile of it."""
    import torch._functorch.config as functorch_config
    # Timing backward alone replays one graph with retain_graph=True, which compiled backwards
    # refuse while they donate their saved buffers; turning donation off only affects memory reuse.
    functorch_config.donated_buffer = False

    def impls() -> dict:
        # A fresh compile per shape: with dynamic=False every shape is another cache entry, and
        # past the recompile limit dynamo would silently fall back to eager.
        torch._dynamo.reset()
        return {"triton": (triton_fn, contextlib.nullcontext), "eager": (eager_fn, contextlib.nullcontext),
                "compile": (torch.compile(eager_fn, dynamic=False), contextlib.nullcontext)}
    return impls


def dw_partial_rows(n: int, m: int, bytes_per_element: int) -> int:
    """P, the fp32 partial dw rows the backward kernel launches for m rows of n (kernels/rmsnorm.py)."""
    return rmsnorm._bwd_grid(n, m, bytes_per_element, torch.device(DEVICE))[0]


def run_rmsnorm(timer: Callable, ceil: Dict[str, float], sheet_tbs: Optional[float],
                shapes: List[tuple]) -> List[dict]:
    impls = triton_eager_compiled(lambda x, w: rmsnorm.triton_rms_norm(x, w, EPS),
                                  lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS))
    results = run_table(timer, shapes, lambda M, N: rms_norm_case(M, N, dw_partial_rows(N, M, 4)), impls, RMS_TOL,
                        "GBps", ceil["copy_TBps"] * 1e3, sheet_tbs and sheet_tbs * 1e3)
    report("RMSNorm, bf16, shape M,N (x<base> = base ms / ours ms; %ceil = % of measured copy bandwidth; "
           "graph = device time of a CUDA-graph replay)", results, "GBps", RMS_TOL,
           {"eager": "eager", "compile": "compile"})
    return results


# 4. QK-norm + RoPE --------------------------------------------------------------------------
def qknorm_case(B: int, H: int, S: int, D: int) -> tuple:
    """bf16 x and dy, a bf16 weight; fp64 output and gradients; bytes per pass. The RoPE tables
    come from real 4-axis angles and are bound into the functions (fixed inputs, no gradient)."""
    x, dy = (torch.randn(B, H, S, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    w = (1.0 + 0.5 * torch.randn(D, device=DEVICE)).to(torch.bfloat16)
    ids = torch.randint(0, 64, (S, 4), device=DEVICE)
    cos, sin = mofo.rope_angles(ids, D, 2000.0)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS) * wd
    n0, n1 = n[..., 0::2], n[..., 1::2]
    c, s_ = cos.double(), sin.double()
    y = torch.stack([n0 * c - n1 * s_, n0 * s_ + n1 * c], -1).flatten(-2)
    y.backward(dy.double())
    M = B * H * S
    P = dw_partial_rows(D, M, 8)  # bytes per element as kernels/qknorm_rope.py sizes its grid
    nbytes = {"fwd": 4.0 * M * D + 4 * M, "bwd": 6.0 * M * D + 4 * M + 8.0 * P * D}
    QK_ROPE.update(cos=cos, sin=sin)
    return (x, w), dy, (y.detach(), xd.grad, wd.grad), {**nbytes, "fwd+bwd": nbytes["fwd"] + nbytes["bwd"]}


QK_ROPE: Dict[str, torch.Tensor] = {}  # the RoPE tables of the shape qknorm_case made last


def run_qknorm(timer: Callable, ceil: Dict[str, float], sheet_tbs: Optional[float],
               shapes: List[tuple]) -> List[dict]:
    impls = triton_eager_compiled(
        lambda x, w: qknorm_rope.qk_norm_rope(x, w, QK_ROPE["cos"], QK_ROPE["sin"], EPS),
        lambda x, w: qknorm_rope.qk_norm_rope_reference(x, w, QK_ROPE["cos"], QK_ROPE["sin"], EPS))
    results = run_table(timer, shapes, qknorm_case, impls, RMS_TOL, "GBps", ceil["copy_TBps"] * 1e3,
                        sheet_tbs and sheet_tbs * 1e3)
    report("QK-norm + RoPE, bf16, shape B,H,S,D (x<base> = base ms / ours ms; %ceil = % of measured copy "
           "bandwidth)", results, "GBps", RMS_TOL, {"eager": "eager", "compile": "compile"})
    return results


# 5. whole training step ---------------------------------------------------------------------
# Profiler categories for the step's time split, first match wins: CUDA kernel names on a GPU
# (cuBLAS/CUTLASS GEMMs, SDPA backends, our kernels, Inductor's fused kernels), aten op names on CPU.
CATEGORIES = [
    ("optimizer/EMA/clip", r"multi_tensor|foreach|adam|lerp"),
    ("attention", r"attn|attention|flash|fmha|sdpa|softmax"),
    ("GEMM", r"gemm|nvjet|xmma|cutlass|^aten::(mm|addmm|bmm|baddbmm)$"),
    ("norm", r"rms|norm|rsqrt"),
    ("copy/cast/fill", r"memcpy|memset|copy_kernel|fillfunctor|^aten::(copy_|_to_copy|fill_|zero_)$"),
]


def categorise(name: str) -> str:
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, name, re.I)), "other")


def profile_split(fn: Callable[[], object], n_calls: int = 3, top: int = 8) -> dict:
    """The time of ``n_calls`` calls split by category, and the ``top`` entries by self time.

    On CUDA only device events count: an aten op's self device time repeats its kernels', and an
    annotated region (torch.compile's) spans them. On the CPU dry run, ops by self CPU time.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = DEVICE == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(n_calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages()
              if not cuda or (e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False))]

    def self_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = sorted((e for e in events if self_us(e) > 0), key=self_us, reverse=True)
    total = sum(map(self_us, events)) or 1.0
    split: Dict[str, float] = {}
    for e in events:
        split[categorise(e.key)] = split.get(categorise(e.key), 0.0) + 100 * self_us(e) / total
    return {"top": [{"name": e.key[:90], "ms_per_call": self_us(e) / 1e3 / n_calls, "pct": 100 * self_us(e) / total}
                    for e in events[:top]],
            "split_pct": dict(sorted(split.items(), key=lambda kv: -kv[1]))}


def step_setup(preset: str, batch: int, overrides: dict) -> tuple:
    """(config, model, one random micro-batch on the device, model FLOPs of one step)."""
    torch.manual_seed(0)
    cfg = mofo.get_config(preset, **overrides)
    model = mofo.MoFo(cfg).to(DEVICE)
    with torch.no_grad():
        # adaLN-Zero starts gates, modulations and heads at exactly 0: the output would ignore
        # attention (the output check would pass vacuously) and GEMMs on zeros run fast.
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    g, res = torch.Generator().manual_seed(0), cfg.res
    micro = {"rgb": torch.rand(batch, 3, res, res, generator=g) * 2 - 1,
             "text": torch.randint(1, cfg.vocab_size, (batch, cfg.text_len), generator=g),
             "depth": torch.rand(batch, res, res, generator=g) * 2,
             "valid": torch.rand(batch, res, res, generator=g) < 0.5}
    micro = {k: v.to(DEVICE) for k, v in micro.items()}
    # 3 × the forward of one sample, counted with the math SDPA backend (plain matmuls).
    kernels.set_backend("torch")
    t = torch.full((1,), 0.5, device=DEVICE)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(micro["rgb"][:1], t, micro["text"][:1], micro["depth"][:1], t)
    return cfg, model, micro, 3.0 * counter.get_total_flops() * batch


def run_step(n_iters: int, sheet_tflops: Optional[float], compile_too: bool, configs: List[tuple]) -> List[dict]:
    import copy
    import train

    variants = [("torch", False), ("triton", False)] + [("torch", True), ("triton", True)] * compile_too
    backend_before, results = kernels.BACKEND, []
    for preset, batch, overrides in configs:
        cfg, model, micro, flops = step_setup(preset, batch, overrides)
        init = {k: v.to("cpu", copy=True) for k, v in model.state_dict().items()}  # off the GPU
        args = train.parse_args(["--config", preset, "--out", "unused", "--batch-size", str(batch)])
        t_mid = torch.full((batch,), 0.5, device=DEVICE)
        tokens = cfg.text_len + 2 * (cfg.res // cfg.patch) ** 2
        row = {"config": step_label(preset, overrides), "batch": batch, "res": cfg.res, "width": cfg.width,
               "seq": tokens, "head_dim": cfg.head_dim, "params_M": model.num_params() / 1e6,
               "step_flops": flops, "sdpa_priority": list(STEP_SDPA), "variants": []}
        reference = None
        for backend, compiled in variants:
            rec = {"backend": backend, "compile": compiled, "ms": None, "out_rel_err": None, "error": None,
                   "peak_GB": None, "profile": None}
            try:
                kernels.set_backend(backend)
                model.load_state_dict(init)  # every variant starts from the same weights and batch
                ema = copy.deepcopy(model).requires_grad_(False)
                # Compiled: train.py's per-block compile, on a copy the next variant drops. Dynamo
                # caches per code object, not per module: reset it, or the next config would
                # compile with dynamic shapes, toward the recompile limit.
                torch._dynamo.reset()
                net = copy.deepcopy(model) if compiled else model
                if compiled:
                    train.compile_blocks(net)
                opt = train.make_optimizer(net, args)
                steps = itertools.count()

                def step():
                    train.train_step(args, next(steps), net, net, ema, opt, [micro])

                with sdpa_kernel([getattr(SDPBackend, name) for name in STEP_SDPA], set_priority=True):
                    with torch.no_grad(), train.autocast(torch.device(DEVICE), args.dtype):
                        outs = net(micro["rgb"], t_mid, micro["text"], micro["depth"], t_mid)
                    if (backend, compiled) == ("torch", False):
                        reference = outs
                    if reference is not None:
                        rec["out_rel_err"] = max(rel_err(o, r) for o, r in zip(outs, reference))
                    del outs
                    for _ in range(3):  # compilation and autotuning stay out of the timing
                        step()
                    if DEVICE == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    rec["ms"] = time_calls(step, n_iters)
                    if DEVICE == "cuda":
                        rec["peak_GB"] = torch.cuda.max_memory_allocated() / 2**30
                    rec["profile"] = profile_split(step)
            except Exception as e:
                rec["error"] = error_text(e)
            finally:  # free this variant's EMA, optimizer state and gradients before the next one
                model.zero_grad(set_to_none=True)
                ema = opt = net = step = None
                gc.collect()
                torch.cuda.empty_cache()
            if rec["ms"]:
                per_s = 1e3 / rec["ms"]
                rec.update(img_per_s=batch * per_s, tokens_per_s=batch * tokens * per_s, TFLOPs=flops * per_s / 1e12)
                rec["mfu_pct"] = 100 * rec["TFLOPs"] / sheet_tflops if sheet_tflops else None
            row["variants"].append(rec)
        base = {v["compile"]: v["ms"] for v in row["variants"] if v["backend"] == "torch"}
        for v in row["variants"]:
            v["speedup_vs_torch"] = base[v["compile"]] / v["ms"] if base[v["compile"]] and v["ms"] else None
        results.append(row)
        del model, init
    kernels.set_backend(backend_before)
    print_steps(results, n_iters)
    return results


def print_steps(results: List[dict], n_iters: int) -> None:
    print_table(f"Training step, median of {n_iters} (x torch = torch-backend ms / this ms at the same compile "
                "setting; MFU% of the datasheet; out err = model outputs vs the eager torch backend)",
                ["config", "batch", "seq", "backend", "compile", "step ms", "img/s", "tok/s", "TFLOP/s", "MFU%",
                 "peak GB", "x torch", "out err"],
                [[r["config"], str(r["batch"]), str(r["seq"]), v["backend"], "yes" if v["compile"] else "no",
                  fmt(v["ms"], ".1f"), fmt(v.get("img_per_s"), ".1f"), fmt(v.get("tokens_per_s"), ".0f"),
                  fmt(v.get("TFLOPs"), ".0f"), fmt(v.get("mfu_pct"), ".1f"), fmt(v["peak_GB"], ".1f"),
                  fmt(v["speedup_vs_torch"], ".2f"), fmt(v["out_rel_err"], ".1e")]
                 for r in results for v in r["variants"]])
    for r in results:
        for v in r["variants"]:
            label = f"{r['config']} {v['backend']}{' compiled' if v['compile'] else ''}"
            if v["error"]:
                print(f"  note {label}: {v['error']}")
            if v["profile"]:
                print(f"  {label}: " + ", ".join(f"{c} {pct:.0f}%" for c, pct in v["profile"]["split_pct"].items()))
                for k in v["profile"]["top"][:5]:
                    print(f"    {k['ms_per_call']:8.3f} ms {k['pct']:5.1f}%  {k['name']}")


# 6. sampler ---------------------------------------------------------------------------------
def run_sample(iters: int = 3) -> dict:
    """Seconds of the denoising loop of SAMPLE_CONFIG per backend, eager and compiled (the whole forward:
    CUDA graphs replay its ~1000 launches), with bf16 weights as sample.py loads them."""
    preset, steps, cfg_scale = SAMPLE_CONFIG
    torch.manual_seed(0)
    model = mofo.MoFo(mofo.get_config(preset)).to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.any():  # adaLN-Zero: random gates, so every block does its work
                p.normal_(std=0.02)
            if not mofo.keeps_fp32(name):
                p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(1, model.cfg.vocab_size, (1, model.cfg.text_len))
    backend_before, variants = kernels.BACKEND, []
    for backend, compiled in SAMPLE_VARIANTS:
        rec = {"backend": backend, "compile": compiled, "warmup_s": None, "denoise_s": None, "error": None}
        try:
            kernels.set_backend(backend)
            torch._dynamo.reset()
            net = torch.compile(model, mode="reduce-overhead", dynamic=False) if compiled else model

            def run_once() -> float:
                t0 = time.perf_counter()
                mofo.sample(net, ids, mode="joint", steps=steps, cfg_scale=cfg_scale, log2_alpha=5.0)
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - t0

            rec["warmup_s"] = run_once()  # compilation, autotuning, graph capture
            rec["denoise_s"] = statistics.median(run_once() for _ in range(iters))
            rec["ms_per_step"] = 1e3 * rec["denoise_s"] / steps
        except Exception as e:
            rec["error"] = error_text(e)
        variants.append(rec)
    kernels.set_backend(backend_before)
    torch._dynamo.reset()
    print_table(f"Sampler: {preset}, {model.cfg.res} px, joint, {steps} steps, CFG {cfg_scale:g} (2 forwards a "
                f"step), batch 1, bf16 weights; median of {iters} after one warm-up run",
                ["backend", "compile", "warm-up s", "denoise s", "ms/step"],
                [[v["backend"], "yes" if v["compile"] else "no", fmt(v["warmup_s"], ".2f"),
                  fmt(v["denoise_s"], ".3f"), fmt(v.get("ms_per_step"), ".2f")] for v in variants])
    for v in variants:
        if v["error"]:
            print(f"  note {v['backend']}{' compiled' if v['compile'] else ''}: {v['error']}")
    return {"preset": preset, "res": model.cfg.res, "steps": steps, "cfg_scale": cfg_scale, "batch": 1,
            "variants": variants}


# 7. targets ---------------------------------------------------------------------------------
# (section, pass, measure, bar, which shapes): measure is a baseline (its ms / ours ms) or
# pct_ceiling; the bars of BENCHMARKS.md.
TARGETS = [
    ("attention", "fwd", "sdpa_cudnn", 1.0, "D=64"),
    ("attention", "fwd", "sdpa_cudnn", 0.9, "D=128"),
    ("attention", "bwd", "sdpa_cudnn", 1.0, "all"),
    ("attention", "fwd+bwd", "sdpa_cudnn", 1.0, "all"),
    ("rmsnorm", "fwd", "pct_ceiling", 85.0, "all"),
    ("rmsnorm", "fwd+bwd", "pct_ceiling", 75.0, "all"),
    ("rmsnorm", "fwd+bwd", "compile", 1.2, "all"),
    ("qknorm", "fwd", "pct_ceiling", 80.0, "all"),
    ("qknorm", "fwd+bwd", "pct_ceiling", 65.0, "all"),
]


def judge(out: dict) -> List[dict]:
    """One verdict per (target, shape): met, missed (also when our output failed its check) or
    not measured (the baseline refused the shape or a pass was not timed)."""
    verdicts = []

    def add(section, shape, what, value, bar, ok=True, lower_is_better=False):
        good = value is not None and ok and (value <= bar if lower_is_better else value >= bar)
        verdicts.append({"section": section, "shape": shape, "target": what, "value": value,
                         "verdict": "not measured" if value is None else "met" if good else "missed"})

    for section, p, measure_, bar, which in TARGETS:
        for row in out.get(section, []):
            if row.get("cuda_graph") or (which != "all" and which != f"D={row['shape'][-1]}"):
                continue
            ours = row["impls"]["triton"]
            value = (ours.get("pct_ceiling", {}).get(p) if measure_ == "pct_ceiling"
                     else row["speedup_vs"].get(measure_, {}).get(p))
            what = f"{p} >= {bar:g}% of ceiling" if measure_ == "pct_ceiling" else f"{p} >= {bar:g} x {measure_}"
            add(section, ",".join(map(str, row["shape"])), what, value, bar, ours["ok"])
    for row in out.get("step", [])[:1]:  # config (a)
        best = next((v for v in row["variants"] if v["backend"] == "triton" and v["compile"]), None)
        if best:
            add("step", row["config"], "MFU >= 40 %", best.get("mfu_pct"), 40.0)
            add("step", row["config"], ">= 1 x compiled torch backend", best.get("speedup_vs_torch"), 1.0)
    if "sample" in out:
        times = [v["denoise_s"] for v in out["sample"]["variants"] if v["backend"] == "triton" and v["denoise_s"]]
        add("sample", out["sample"]["preset"], "denoise <= 0.5 s", min(times) if times else None, 0.5,
            lower_is_better=True)
    if verdicts:
        print_table("Targets (bf16; x<base> = base ms / ours ms)", ["section", "shape", "target", "value", "verdict"],
                    [[v["section"], v["shape"], v["target"], fmt(v["value"], ".2f"), v["verdict"]] for v in verdicts])
        tally = {k: sum(v["verdict"] == k for v in verdicts) for k in ("met", "missed", "not measured")}
        print("  " + ", ".join(f"{n} {k}" for k, n in tally.items()))
    return verdicts


# --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, timer: Callable) -> dict:
    """Every requested section, plus the metadata that makes the figures reproducible."""
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else f"{DEVICE} (plumbing dry run)"
    sheet = next((v for key, v in DATASHEET.items() if key in name), (None, None))
    meta = {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "datasheet_bf16_TFLOPs": sheet[0], "datasheet_HBM_TBps": sheet[1],
        "flop_convention": "attention fwd 4*B*H*S^2*D, bwd 2.5x fwd (includes recompute), fwd+bwd 3.5x fwd",
        "bytes_convention": "rmsnorm fwd 4MN+4M, bwd 6MN+4M+8PN (P=partial dw rows launched), bf16; same bytes for every impl",
        "timing": f"triton.testing.do_bench median, warmup {args.warmup} ms, rep {args.rep} ms, L2 flushed per run",
        "notes": "torch.compile baselines run with functorch donated_buffer=False (needed for retain_graph)",
    }
    print(f"{name} | torch {meta['torch']} (CUDA {meta['cuda']}, cuDNN {meta['cudnn']}) | Triton {meta['triton']}")
    out = {"meta": meta, "ceilings": run_ceilings(timer)}
    if args.only in (None, "attention"):
        out["attention"] = run_attention(timer, out["ceilings"], sheet[0], pick(ATTN_SHAPES, args.attn_shapes))
    if args.only in (None, "rmsnorm"):
        out["rmsnorm"] = run_rmsnorm(timer, out["ceilings"], sheet[1], pick(RMS_SHAPES, args.rms_shapes))
    if args.only in (None, "qknorm"):
        out["qknorm"] = run_qknorm(timer, out["ceilings"], sheet[1], pick(QK_SHAPES, args.qk_shapes))
    if args.only == "step":
        out["step"] = run_step(args.step_iters, sheet[0], args.step_compile, pick(STEP_CONFIGS, args.step_configs))
    if args.only == "sample":
        out["sample"] = run_sample()
    out["targets"] = judge(out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"directory of --out {args.out} does not exist")  # fail before the long run
    if args.step_iters < 1:
        raise UserError("--step-iters must be >= 1")
    if not torch.cuda.is_available():
        raise UserError("needs a CUDA GPU")
    if kernels.INTERPRET:
        raise UserError("unset TRITON_INTERPRET to benchmark compiled kernels")
    out = run(args, do_bench_timer(args.warmup, args.rep))
    if args.out:
        write_json(args.out, out)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    cli(main, "bench.py")
