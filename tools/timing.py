"""Timing and table helpers for tools/bench.py: CUDA events on a GPU, the wall clock on the CPU dry run."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, List, Optional

import torch
import triton.testing


def rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def do_bench_timer(warmup: int, rep: int) -> Callable[..., float]:
    """timer(fn, grad_to_none=None) -> median ms (the CPU dry run passes a wall-clock twin)."""
    return lambda fn, grad_to_none=None: float(triton.testing.do_bench(
        fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once as a CUDA graph; returns the replay (``fn`` itself off CUDA).

    Warm-up (lazy initialisation, autotuning and compilation must not be captured) and capture
    run on a side stream. The capture must not wait on work of another stream: an output of an
    earlier call kept alive keeps its AccumulateGrad nodes, which sit on the stream they were made
    on, so callers drop every earlier output and gradient first. Tensors ``fn`` allocates,
    gradients included, live in the graph's memory pool and are rewritten by every replay.
    """
    if not torch.cuda.is_available():
        return fn
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    side.wait_stream(main)
    graph = torch.cuda.CUDAGraph()
    try:
        torch.cuda.set_stream(side)
        for _ in range(3):
            fn()
        gc.collect()  # an earlier output caught in a reference cycle must not outlive the capture
        with torch.cuda.graph(graph, stream=side):
            fn()
    finally:
        torch.cuda.set_stream(main)
    main.wait_stream(side)
    return graph.replay


def fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def print_table(title: str, header: List[str], rows: List[List[str]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    print(f"\n{title}")
    for r in [header] + rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def error_text(e: Exception, limit: int = 160) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:limit] if str(e) else ''}"


def time_calls(fn: Callable[[], object], n: int) -> float:
    """Median ms of ``n`` back-to-back calls, stamped between calls: CUDA events on the GPU's
    timeline (host work that leaves the GPU idle counts), the wall clock on the CPU dry run."""
    cuda, stamps = torch.cuda.is_available(), []
    for i in range(n + 1):
        if i:
            fn()
        if cuda:
            stamps.append(torch.cuda.Event(enable_timing=True))
            stamps[-1].record()
        else:
            stamps.append(time.perf_counter())
    if cuda:
        torch.cuda.synchronize()
    return float(statistics.median(a.elapsed_time(b) if cuda else (b - a) * 1e3 for a, b in zip(stamps, stamps[1:])))
