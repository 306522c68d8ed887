r"""RMSNorm with a learned weight, forward and backward in Triton.

For a row x ∈ ℝᴺ (all math in fp32)::

    r = 1 / sqrt(mean(x²) + ε)          (rstd, one fp32 per row, kept for backward)
    x̂ = x · r
    y = x̂ ∘ w

Backward
--------
Let g = dy ∘ w. Since ∂r/∂x_k = −r³ x_k / N,

    dx_k = r g_k − (r³ x_k / N) Σ_j g_j x_j
         = r · (g_k − x̂_k · c),          c = (1/N) Σ_j g_j x̂_j

and the weight gradient sums over all rows::

    dw = Σ_rows dy ∘ x̂

dw is a column reduction over M rows. Instead of atomics (nondeterministic) or one partial row per
program (M·N·4 extra bytes for tall inputs), the backward kernel launches a bounded number P of
programs. Each program walks row blocks ``pid, pid + P, pid + 2P, …``, writes dx for them and
keeps its share of dw in fp32 registers; at the end it writes one fp32 partial row. A second stage
sums the P × N partials (``torch.sum``, cheap because P is small).

The backward is bandwidth-bound, so what matters is how many bytes are in flight (``_bwd_grid``):

* P is as many programs as the GPU keeps resident at once: per SM the least of what its threads,
  registers and shared memory allow, times the SM count (4 for CPU tensors under the
  interpreter, so that tests still loop). More would only queue behind the resident ones.
* The row loop is a ``tl.range(..., num_stages=S)``: the compiler issues the loads of the next
  S − 1 row blocks (cp.async into shared memory) before the current one is computed, as in
  Triton's fused-softmax tutorial. S is 3 where the two buffers fit in ``PREFETCH_BYTES``.

Tiling: every program holds a BLOCK_ROWS × BLOCK_N tile, BLOCK_N = next_pow2(N) (columns masked
beyond N). Wide rows (N > 512, so BLOCK_N ≥ 1024) use one row per program; short rows such as
QK-norm over the head dim (N = 64/128) pack many rows per program so each program still moves a
few KiB, instead of being latency-bound on 128-byte rows. The launch parameters come from that
rule (``_launch_params``), not from autotuning.

Inputs of any leading shape are viewed as (M, N); rows may be strided, the last dim must be
contiguous (a copy is made otherwise). x and y share a dtype (bf16/fp16/fp32); the weight may
have a different dtype (e.g. fp32 master weights with bf16 activations) and dw comes back in it.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import alloc, eager_or_op, kernel_op

__all__ = [
    "triton_rms_norm",
    "rms_norm_reference",
    "rms_norm_forward",
    "rms_norm_backward",
    "RMSNormFunction",
]

MAX_N = 16384  # one tile holds a whole row; beyond this registers spill, use the reference


def _launch_params(n: int) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_ROWS, num_warps) for rows of length ``n``.

    Aims at ~4096 elements per program tile and 8 elements per thread (one 128-bit bf16 access).
    """
    block_n = triton.next_power_of_2(n)
    block_rows = 1 if block_n >= 1024 else 4096 // block_n
    num_warps = max(1, min(16, block_rows * block_n // 256))
    return block_n, block_rows, num_warps


# Shared memory one backward program may fill with prefetched loads: two steps ahead while a
# step (the loads of one row block) is at most 32 KiB, one step up to 64 KiB, none beyond.
PREFETCH_BYTES = 64 * 1024
# Registers per thread of the backward kernels at the launch parameters above, as sm_90 compiles
# them (tools/aot.py --all): 64 for most row widths; N = 512, 8192 and 16384 take more (81, 116,
# 128), so fewer of their programs are resident than estimated and the rest run in a second wave.
BWD_REGS = 64


def _bwd_grid(n: int, m: int, bytes_per_element: int, device: torch.device) -> Tuple[int, int]:
    """(P, num_stages) for a grid-stride backward over ``m`` rows of length ``n`` (tiled by
    ``_launch_params``) whose loop loads ``bytes_per_element`` per element of a row.

    P programs, hence P partial dw rows: as many as fit on the GPU at once, never more than there
    are row blocks. num_stages − 1 row blocks are prefetched into shared memory.
    """
    block_n, block_rows, num_warps = _launch_params(n)
    step_bytes = block_rows * block_n * bytes_per_element
    num_stages = 1 + min(2, PREFETCH_BYTES // step_bytes)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        threads = 32 * num_warps
        smem = (num_stages - 1) * step_bytes + 1024  # + the 1 KiB the driver reserves per block
        per_sm = min(getattr(props, "max_threads_per_multi_processor", 2048) // threads,
                     getattr(props, "regs_per_multiprocessor", 65536) // (BWD_REGS * threads),
                     getattr(props, "shared_memory_per_multiprocessor", 228 * 1024) // smem)
        cap = props.multi_processor_count * max(1, per_sm)
    else:
        cap = 4  # CPU tensors (interpreter): few programs, each still gets several row blocks in tests
    return max(1, min(cap, triton.cdiv(m, block_rows))), num_stages


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,            # X, Y: (M, N) with row strides below, unit column stride; W: (N,);
                              # RSTD: fp32 (M,)
    stride_xm, stride_ym,
    M, N, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)  # M·N can exceed 2³¹ for the QK-norm shapes at larger batch

    # bf16 keeps 8 mantissa bits: squaring and summing thousands of them needs fp32.
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    # Masked columns are 0, so the sum is over the N real entries; divide by N, not BLOCK_N.
    rstd = tl.math.rsqrt(tl.sum(x * x, 1) / N + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    # 4 bytes per row that save the backward a second reduction over x.
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    X, W, DY, RSTD,           # saved input, weight, upstream grad (M, N), fp32 rstd (M,)
    DX, DW_PARTIAL,           # dx (M, N); fp32 (P, N) partial dw rows, one per program
    stride_xm, stride_dym, stride_dxm,
    M, N,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # The weight is shared by every row this program visits: load it once, outside the loop.
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    # Per-row partials are summed over rows only once, after the loop.
    dw_acc = tl.zeros([BLOCK_ROWS, BLOCK_N], dtype=tl.float32)

    n_blocks = tl.cdiv(M, BLOCK_ROWS)
    # Grid-stride over row blocks: the number of dw partial rows is fixed by the grid (P), not
    # by M, which keeps the second-stage reduction small for the 500k-row QK-norm inputs. The
    # loads of the next NUM_STAGES − 1 row blocks are in flight while this one is computed.
    for rb in tl.range(pid, n_blocks, n_progs, num_stages=NUM_STAGES):
        rows = rb * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Padded rows get rstd = 0, hence x̂ = 0 and no contribution to dw.
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        # Padded columns have g = x̂ = 0, so the mean is over the N real entries.
        c = tl.sum(g * xhat, 1) / N
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat

    # Written even if this program got no rows (then it is zeros): stage 2 sums every row.
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, 0), mask=col_ok)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View (..., N) as (M, N) with unit column stride (copies only if it has to)."""
    n = t.shape[-1]
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, n)
    except RuntimeError:  # leading dims not collapsible into one stride
        return t.reshape(-1, n)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        raise ValueError("x and weight must be tensors")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be (..., N) with N >= 1, got shape {tuple(x.shape)}")
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if x.dtype not in floats or weight.dtype not in floats:
        raise ValueError(f"unsupported dtypes x {x.dtype}, weight {weight.dtype}; use bf16, fp16 or fp32")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError("x and weight must be on the same device")
    if x.shape[-1] > MAX_N:
        raise ValueError(f"N={x.shape[-1]} > {MAX_N} is not supported by the Triton kernel")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor,
                     eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel.

    Args:
        x: (..., N); weight: (N,).
    Returns:
        y: same shape and dtype as x (contiguous); rstd: fp32 (M,) with M = x.numel() // N.
    """
    _check(x, weight)
    n = x.shape[-1]
    x2 = _as_rows(x)
    m = x2.shape[0]
    y = alloc((m, n), x.dtype, x.device)
    rstd = alloc((m,), torch.float32, x.device)
    if m > 0:
        block_n, block_rows, num_warps = _launch_params(n)
        _rms_norm_fwd_kernel[(triton.cdiv(m, block_rows),)](
            x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), m, n, eps,
            BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y.view(x.shape), rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward kernel plus the second-stage dw reduction.

    Args:
        dy, x: (..., N); weight: (N,); rstd: fp32 (M,) from ``rms_norm_forward``.
    Returns:
        dx: shape and dtype of x; dw: (N,) in the dtype of weight.
    """
    n = x.shape[-1]
    x2 = _as_rows(x)
    dy2 = _as_rows(dy)
    m = x2.shape[0]
    dx = alloc((m, n), x.dtype, x.device)
    block_n, block_rows, num_warps = _launch_params(n)
    n_prog, num_stages = _bwd_grid(n, m, x2.element_size() + dy2.element_size(), x.device)
    partial = alloc((n_prog, n), torch.float32, x.device)
    if m > 0:
        _rms_norm_bwd_kernel[(n_prog,)](
            x2, weight.contiguous(), dy2, rstd, dx, partial,
            x2.stride(0), dy2.stride(0), dx.stride(0), m, n,
            BLOCK_ROWS=block_rows, BLOCK_N=block_n, NUM_STAGES=num_stages, num_warps=num_warps,
        )
    else:
        partial.zero_()
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


# Forward and backward as opaque ops for torch.compile (see ``eager_or_op``); the fakes give
# the output shapes and dtypes without running anything.
def _fwd_fake(x, weight, eps):
    _check(x, weight)
    return x.new_empty(x.shape), x.new_empty((math.prod(x.shape[:-1]),), dtype=torch.float32)


def _bwd_fake(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


_fwd_op = kernel_op("rms_norm_fwd", "(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
                    rms_norm_forward, _fwd_fake)
_bwd_op = kernel_op("rms_norm_bwd", "(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)",
                    rms_norm_backward, _bwd_fake)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, weight and the fp32 rstd (4 bytes per row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = eager_or_op(rms_norm_forward, _fwd_op)(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = eager_or_op(rms_norm_backward, _bwd_op)(dy, x, weight, rstd)
        return dx, dw, None


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim with the Triton kernels (differentiable).

    Args:
        x: (..., N) bf16/fp16/fp32, N ≤ 16384; weight: (N,).
    Returns:
        (..., N) in the dtype of x.
    """
    return RMSNormFunction.apply(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch twin of ``triton_rms_norm``: fp32 math, result cast back to the dtype of x."""
    y = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    return y.to(x.dtype)
