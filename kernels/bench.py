"""Benchmark the Triton kernels against PyTorch baselines (CUDA GPU only).

Protocol (docs PERF.md §7):

1. Ceilings, measured on this GPU: a 2 GiB device-to-device copy (bytes = read + write = 4 GiB)
   and an 8192³ bf16 GEMM on random data. Results are reported as a percentage of these.
2. Attention, bf16, non-causal, (B, H, S, D) contiguous: forward, backward and forward+backward
   of our kernel (default deterministic dQ pass, and the fp32-atomic dQ variant) against
   ``F.scaled_dot_product_attention`` with each backend pinned through
   ``torch.nn.attention.sdpa_kernel`` (FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION).
   FLOP convention (FlashAttention style): forward 4·B·H·S²·D; backward 2.5× forward (it counts
   the recomputation of P); forward+backward 3.5× forward.
3. RMSNorm, bf16 input and weight, eps 1e-6: forward, backward and forward+backward of our kernel
   against eager ``F.rms_norm`` and ``torch.compile(dynamic=False)`` of the same call. GB/s uses
   the minimum bytes of PERF.md §5 for every implementation alike: forward 4·M·N + 4·M (x read,
   y written, fp32 rstd); backward 6·M·N + 4·M + 8·P·N (x, dy read, dx written, rstd read, fp32
   dw partials written and read back, P = 2 × SM count); forward+backward the sum.

Before timing, every implementation's outputs (and gradients) are checked against an fp32
reference (fp64 for RMSNorm) as ‖out − ref‖ / ‖ref‖; rows above the tolerance are flagged.
Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run, warmup
outside the timed region, so autotuning never lands in a measurement).

Usage::

    python kernels/bench.py --out bench.json              # everything
    python kernels/bench.py --only attention --rep 500
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from typing import Callable, Dict, List, Optional

ATTN_SHAPES = [  # (B, H, S, D): 256px and 512px DiT joint sequences, plus a published-curve tie
    (48, 16, 640, 64),
    (48, 16, 640, 128),
    (48, 16, 589, 128),
    (16, 16, 2176, 64),
    (16, 16, 2176, 128),
    (4, 16, 4096, 128),
]
RMS_SHAPES = [  # (M, N): main-stream norm rows, then QK-norm rows (B·S·H, head dim)
    (32768, 1024), (32768, 2048), (32768, 3072),
    (491520, 64), (491520, 128), (557056, 64), (557056, 128),
]
DATASHEET = {  # dense bf16 TFLOP/s, HBM TB/s (PERF.md §1)
    "H100": (989.0, 3.35),
    "H200": (989.0, 4.8),
}
DEVICE = "cuda"  # a module constant only so that the plumbing can be dry-run on CPU
ATTN_TOL = 2e-2
RMS_TOL = 2e-2
EPS = 1e-6


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark mofo's Triton kernels against PyTorch (needs a CUDA GPU).")
    p.add_argument("--only", choices=["attention", "rmsnorm", "ceilings"], default=None,
                   help="run one section only (ceilings are always measured first, since every "
                        "percentage is relative to them)")
    p.add_argument("--out", default=None, help="write the full results as JSON to this path")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup time per measurement, ms")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time per measurement, ms")
    p.add_argument("--compile-max-autotune", action="store_true",
                   help="also time torch.compile(mode='max-autotune-no-cudagraphs') for RMSNorm (slow to compile)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def rel_err(out, ref) -> float:
    out = out.detach().double()
    ref = ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class Timer:
    def __init__(self, warmup: int, rep: int):
        self.warmup, self.rep = warmup, rep

    def __call__(self, fn: Callable[[], object], grad_to_none=None) -> float:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep,
                                             grad_to_none=grad_to_none, return_mode="median"))


def fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def print_table(title: str, header: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


# ------------------------------------------------------------------------------------------
# 1. ceilings
# ------------------------------------------------------------------------------------------
def run_ceilings(timer: Timer) -> Dict[str, float]:
    import torch
    n = 1 << 30  # bf16 elements = 2 GiB
    src = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    copy_tbs = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12
    del src, dst

    m = 8192
    a = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)  # random, never zeros (PERF §6)
    b = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
    gms = timer(lambda: torch.mm(a, b))
    gemm_tflops = 2 * m ** 3 / (gms * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    res = {"copy_ms": ms, "copy_TBps": copy_tbs, "gemm_ms": gms, "gemm_TFLOPs": gemm_tflops}
    print_table("Ceilings (measured)", ["what", "ms", "rate"], [
        ["2 GiB D2D copy (read+write)", fmt(ms), f"{copy_tbs:.2f} TB/s"],
        ["8192^3 bf16 GEMM (random)", fmt(gms), f"{gemm_tflops:.0f} TFLOP/s"],
    ])
    return res


# ------------------------------------------------------------------------------------------
# 2. attention
# ------------------------------------------------------------------------------------------
def _attn_ref_fp32(q, k, v, do):
    import torch
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    s = torch.matmul(qf, kf.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    o = torch.matmul(torch.softmax(s, dim=-1), vf)
    o.backward(do.float())
    return o.detach(), qf.grad, kf.grad, vf.grad


def _attn_impls():
    """name -> (callable(q, k, v), context-manager factory or None)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    from kernels.attention import flash_attention

    def sdpa(backend):
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), lambda: sdpa_kernel([backend]))

    return {
        "triton": (lambda q, k, v: flash_attention(q, k, v), None),
        "triton_atomic_dq": (lambda q, k, v: flash_attention(q, k, v, dq_atomic=True), None),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }


def _best_configs() -> Dict[str, str]:
    """Autotuner choices of the last launch (``kernels.attention`` the attribute is the function)."""
    import importlib
    mod = importlib.import_module("kernels.attention")
    out = {}
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        cfg = getattr(getattr(mod, name), "best_config", None)
        out[name] = str(cfg) if cfg is not None else "n/a"
    return out


def run_attention(timer: Timer, ceil: Dict[str, float], sheet_tflops: Optional[float]) -> List[dict]:
    import contextlib
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference must be fp32
    impls = _attn_impls()
    results = []
    for (B, H, S, D) in ATTN_SHAPES:
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(B, H, S, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
        ref = _attn_ref_fp32(q, k, v, do)
        fwd_flops = 4.0 * B * H * S * S * D
        flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
        row = {"shape": [B, H, S, D], "flops": flops, "impls": {}}
        for name, (fn, ctx) in impls.items():
            rec = {"rel_err": None, "ok": None, "ms": {}, "error": None}
            try:
                with (ctx() if ctx else contextlib.nullcontext()):
                    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                    o = fn(qg, kg, vg)
                    o.backward(do)
                    errs = [rel_err(a, b) for a, b in zip((o, qg.grad, kg.grad, vg.grad), ref)]
                    rec["rel_err"] = max(errs)
                    rec["ok"] = rec["rel_err"] <= ATTN_TOL
                    if name == "triton":
                        rec["configs"] = _best_configs()
                    with torch.no_grad():
                        if name != "triton_atomic_dq":  # same forward as "triton"
                            rec["ms"]["fwd"] = timer(lambda: fn(q, k, v))
                    o = fn(qg, kg, vg)
                    rec["ms"]["bwd"] = timer(lambda: o.backward(do, retain_graph=True), grad_to_none=[qg, kg, vg])
                    rec["ms"]["fwd+bwd"] = timer(lambda: fn(qg, kg, vg).backward(do), grad_to_none=[qg, kg, vg])
                    del o, qg, kg, vg
            except Exception as e:  # a backend that does not support this GPU/shape: report n/a
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rec["TFLOPs"] = {p: flops[p] / (ms * 1e-3) / 1e12 for p, ms in rec["ms"].items()}
            rec["pct_gemm_ceiling"] = {p: 100 * t / ceil["gemm_TFLOPs"] for p, t in rec["TFLOPs"].items()}
            if sheet_tflops:
                rec["pct_datasheet"] = {p: 100 * t / sheet_tflops for p, t in rec["TFLOPs"].items()}
            row["impls"][name] = rec
            torch.cuda.empty_cache()
        ours = row["impls"]["triton"]["ms"]
        row["speedup_vs"] = {  # baseline time / our time: > 1 means ours is faster
            base: {p: (row["impls"][base]["ms"][p] / ours[p]
                       if p in ours and p in row["impls"][base]["ms"] else None)
                   for p in flops}
            for base in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "triton_atomic_dq")
        }
        results.append(row)
        del q, k, v, do, ref
        torch.cuda.empty_cache()

    header = ["B,H,S,D", "pass", "ours ms", "TFLOP/s", "%ceil", "relerr",
              "flash ms", "cudnn ms", "eff ms", "xflash", "xcudnn", "xeff", "atomic-dQ ms"]
    rows = []
    for r in results:
        im = r["impls"]
        for p in ("fwd", "bwd", "fwd+bwd"):
            rows.append([
                ",".join(map(str, r["shape"])), p,
                fmt(im["triton"]["ms"].get(p)), fmt(im["triton"]["TFLOPs"].get(p), ".0f"),
                fmt(im["triton"]["pct_gemm_ceiling"].get(p), ".0f"),
                fmt(im["triton"]["rel_err"], ".1e") + ("" if im["triton"]["ok"] else " FAIL"),
                fmt(im["sdpa_flash"]["ms"].get(p)), fmt(im["sdpa_cudnn"]["ms"].get(p)),
                fmt(im["sdpa_efficient"]["ms"].get(p)),
                fmt(r["speedup_vs"]["sdpa_flash"][p], ".2f"), fmt(r["speedup_vs"]["sdpa_cudnn"][p], ".2f"),
                fmt(r["speedup_vs"]["sdpa_efficient"][p], ".2f"),
                fmt(im["triton_atomic_dq"]["ms"].get(p)),
            ])
    print_table("Attention, bf16, non-causal (x<base> = base ms / ours ms; %ceil = % of measured GEMM)",
                header, rows)
    for r in results:
        for name, rec in r["impls"].items():
            if rec["error"] or rec["ok"] is False:
                print(f"  note {r['shape']} {name}: {rec['error'] or 'rel_err %.2e above %.0e' % (rec['rel_err'], ATTN_TOL)}")
    return results


# ------------------------------------------------------------------------------------------
# 3. RMSNorm
# ------------------------------------------------------------------------------------------
def run_rmsnorm(timer: Timer, ceil: Dict[str, float], sheet_tbs: Optional[float], max_autotune: bool) -> List[dict]:
    import torch
    import torch.nn.functional as F
    from kernels.rmsnorm import triton_rms_norm

    n_sm = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 2

    def eager(x, w):
        return F.rms_norm(x, (x.shape[-1],), w, EPS)

    # Separate function objects: dynamo caches compiled code per code object, so two modes must
    # not share one.
    def for_compile(x, w):
        return F.rms_norm(x, (x.shape[-1],), w, EPS)

    def for_max_autotune(x, w):
        return F.rms_norm(x, (x.shape[-1],), w, EPS)

    # Timing backward alone replays one graph with retain_graph=True, which compiled backwards
    # refuse while they donate their saved buffers; turning donation off only affects memory reuse.
    import torch._functorch.config as functorch_config
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False

    results = []
    for (M, N) in RMS_SHAPES:
        # Fresh compile per shape: with dynamic=False every shape (and grad mode) is another cache
        # entry, and past the recompile limit dynamo would silently fall back to eager.
        torch._dynamo.reset()
        impls = {
            "triton": lambda x, w: triton_rms_norm(x, w, EPS),
            "eager": eager,
            "compile": torch.compile(for_compile, dynamic=False),
        }
        if max_autotune:
            impls["compile_max_autotune"] = torch.compile(
                for_max_autotune, dynamic=False, mode="max-autotune-no-cudagraphs")
        torch.manual_seed(0)
        x = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)
        w = (1.0 + 0.5 * torch.randn(N, device=DEVICE)).to(torch.bfloat16)
        dy = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)
        xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
        y_ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS) * wd
        y_ref.backward(dy.double())
        ref = (y_ref.detach(), xd.grad, wd.grad)
        del xd, wd, y_ref
        p_rows = 2 * n_sm
        nbytes = {"fwd": 4.0 * M * N + 4 * M, "bwd": 6.0 * M * N + 4 * M + 8.0 * p_rows * N}
        nbytes["fwd+bwd"] = nbytes["fwd"] + nbytes["bwd"]
        row = {"shape": [M, N], "bytes": nbytes, "impls": {}}
        for name, fn in impls.items():
            rec = {"rel_err": None, "ok": None, "ms": {}, "error": None}
            try:
                xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
                y = fn(xg, wg)
                y.backward(dy)
                rec["rel_err"] = max(rel_err(a, b) for a, b in zip((y, xg.grad, wg.grad), ref))
                rec["ok"] = rec["rel_err"] <= RMS_TOL
                with torch.no_grad():
                    rec["ms"]["fwd"] = timer(lambda: fn(x, w))
                try:
                    y = fn(xg, wg)
                    rec["ms"]["bwd"] = timer(lambda: y.backward(dy, retain_graph=True), grad_to_none=[xg, wg])
                except Exception as e:  # e.g. a compiled graph refusing retain_graph
                    rec["error"] = f"bwd: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                rec["ms"]["fwd+bwd"] = timer(lambda: fn(xg, wg).backward(dy), grad_to_none=[xg, wg])
                del y, xg, wg
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rec["GBps"] = {p: nbytes[p] / (ms * 1e-3) / 1e9 for p, ms in rec["ms"].items()}
            rec["pct_copy_ceiling"] = {p: 100 * g / (ceil["copy_TBps"] * 1e3) for p, g in rec["GBps"].items()}
            if sheet_tbs:
                rec["pct_datasheet"] = {p: 100 * g / (sheet_tbs * 1e3) for p, g in rec["GBps"].items()}
            row["impls"][name] = rec
        ours = row["impls"]["triton"]["ms"]
        row["speedup_vs"] = {
            base: {p: (row["impls"][base]["ms"][p] / ours[p]
                       if p in ours and p in row["impls"][base]["ms"] else None)
                   for p in nbytes}
            for base in impls if base != "triton"
        }
        results.append(row)
        del x, w, dy, ref
        torch.cuda.empty_cache()

    header = ["M,N", "pass", "ours ms", "GB/s", "%copy", "relerr", "eager ms", "compile ms", "xeager", "xcompile"]
    rows = []
    for r in results:
        im = r["impls"]
        for p in ("fwd", "bwd", "fwd+bwd"):
            rows.append([
                ",".join(map(str, r["shape"])), p,
                fmt(im["triton"]["ms"].get(p)), fmt(im["triton"]["GBps"].get(p), ".0f"),
                fmt(im["triton"]["pct_copy_ceiling"].get(p), ".0f"),
                fmt(im["triton"]["rel_err"], ".1e") + ("" if im["triton"]["ok"] else " FAIL"),
                fmt(im["eager"]["ms"].get(p)), fmt(im["compile"]["ms"].get(p)),
                fmt(r["speedup_vs"]["eager"][p], ".2f"), fmt(r["speedup_vs"]["compile"][p], ".2f"),
            ])
    print_table("RMSNorm, bf16 (x<base> = base ms / ours ms; %copy = % of measured copy bandwidth)", header, rows)
    for r in results:
        for name, rec in r["impls"].items():
            if rec["error"] or rec["ok"] is False:
                print(f"  note {r['shape']} {name}: {rec['error'] or 'rel_err %.2e above %.0e' % (rec['rel_err'], RMS_TOL)}")
    return results


# ------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench.py needs a CUDA GPU")
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench.py: unset TRITON_INTERPRET to benchmark compiled kernels")
        return 2
    # Run as a script (python kernels/bench.py): make the repo root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import triton

    name = torch.cuda.get_device_name(0)
    sheet = next((v for key, v in DATASHEET.items() if key in name), (None, None))
    meta = {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "datasheet_bf16_TFLOPs": sheet[0],
        "datasheet_HBM_TBps": sheet[1],
        "flop_convention": "attention fwd 4*B*H*S^2*D, bwd 2.5x fwd (includes recompute), fwd+bwd 3.5x fwd",
        "bytes_convention": "rmsnorm fwd 4MN+4M, bwd 6MN+4M+8PN (P=2*SMs), bf16; same bytes for every impl",
        "timing": f"triton.testing.do_bench median, warmup {args.warmup} ms, rep {args.rep} ms, L2 flushed per run",
        "notes": "torch.compile baselines run with functorch donated_buffer=False (needed for retain_graph)",
    }
    print(f"{name} | torch {meta['torch']} (CUDA {meta['cuda']}, cuDNN {meta['cudnn']}) | Triton {meta['triton']}")
    timer = Timer(args.warmup, args.rep)
    out = {"meta": meta}
    out["ceilings"] = run_ceilings(timer)
    if args.only in (None, "attention"):
        out["attention"] = run_attention(timer, out["ceilings"], sheet[0])
    if args.only in (None, "rmsnorm"):
        out["rmsnorm"] = run_rmsnorm(timer, out["ceilings"], sheet[1], args.compile_max_autotune)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
