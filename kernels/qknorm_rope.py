r"""QK-norm fused with rotary embeddings (RoPE), forward and backward in Triton.

Each row is one head vector x ∈ ℝᴰ of q or k at position s (rows are the (b, h, s) triples of a
(B, H, S, D) tensor). The pairs (x_2i, x_2i+1) are rotated by the angle θ_{s,i}, given as
cos, sin of shape (S, D/2). All math in fp32::

    r = 1 / sqrt(mean(x²) + ε)          (rstd, one fp32 per row, kept for backward)
    x̂ = x · r
    n = x̂ ∘ w
    y = R n,   (y_2i, y_2i+1) = (n_2i cos θ − n_2i+1 sin θ,  n_2i sin θ + n_2i+1 cos θ)

This is ``apply_rope(rms_norm(x, w))`` in one pass, without the fp32 tensor n in between.

Backward
--------
R is orthogonal and independent of x and w, so the gradient reaching n is the upstream gradient
rotated back by −θ::

    g' = Rᵀ dy,   (g'_2i, g'_2i+1) = (dy_2i cos θ + dy_2i+1 sin θ,  −dy_2i sin θ + dy_2i+1 cos θ)

From there it is exactly the RMSNorm backward (see kernels/rmsnorm.py). With g = g' ∘ w::

    dx = r · (g − x̂ · c),       c = (1/D) Σ_j g_j x̂_j
    dw = Σ_rows g' ∘ x̂

dw is a column reduction over all B·H·S rows, done as in kernels/rmsnorm.py: a bounded grid of P
programs (as many as the GPU holds at once, ``_bwd_grid``) walks the row blocks
``pid, pid + P, …`` with the next blocks' loads prefetched, each keeps its share of dw in fp32
registers and writes one partial row; ``partial.sum(0)`` adds the P rows. Deterministic, no
atomics.

Tiling: D ∈ {16, 32, 64, 128} is short, so each program takes BLOCK_ROWS = 4096 // D rows (the
launch parameters of kernels/rmsnorm.py). Rows are loaded and stored whole (contiguous along D,
so as 128-bit vectors) and split in registers into two (BLOCK_ROWS, D/2) tiles, the even and the
odd elements, so both halves of a pair sit at the same tile position and the rotation is
elementwise.

Layout: x is read through its batch, head and sequence strides, so a permuted view of a packed
(B, S, 3, H, D) projection needs no copy (only a non-unit stride along D forces one). y and dx
are new contiguous (B, H, S, D) tensors.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import alloc, eager_or_op, kernel_op
from .rmsnorm import _bwd_grid, _launch_params

__all__ = ["qk_norm_rope", "qk_norm_rope_reference", "qk_norm_rope_forward", "qk_norm_rope_backward"]

HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _row_offsets(rows64, S, H, stride_b, stride_h, stride_s):
    """Element offset of row (b, h, s) = rows64 of a (B, H, S, D) tensor with the given strides."""
    bh = rows64 // S
    return (bh // H) * stride_b + (bh % H) * stride_h + (rows64 % S) * stride_s


@triton.jit
def _even_odd(t, ROWS: tl.constexpr, D: tl.constexpr):
    """The even and the odd columns of a (ROWS, D) tile, as two (ROWS, D/2) tiles."""
    return tl.split(tl.reshape(t, [ROWS, D // 2, 2]))


@triton.jit
def _interleave(t0, t1, ROWS: tl.constexpr, D: tl.constexpr):
    """The (ROWS, D) tile whose even columns are t0 and odd columns t1 (undoes ``_even_odd``)."""
    return tl.reshape(tl.join(t0, t1), [ROWS, D])


@triton.jit
def _qk_norm_rope_fwd_kernel(
    X, W, COS, SIN,           # X: (B, H, S, D), strides below, unit stride along D; W: (D,);
                              # COS, SIN: fp32 (S, D/2) contiguous
    Y, RSTD,                  # Y: contiguous (B, H, S, D); RSTD: fp32 (B·H·S,)
    stride_xb, stride_xh, stride_xs,
    S, H, M, eps,             # M = B·H·S rows
    D: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)  # B·H·S·D can exceed 2³¹
    cols = tl.arange(0, D)
    pairs = tl.arange(0, D // 2)
    mask = row_ok[:, None]    # broadcast over the columns, which are never out of range

    x = tl.load(X + _row_offsets(rows64, S, H, stride_xb, stride_xh, stride_xs)[:, None] + cols[None, :],
                mask=mask, other=0.0).to(tl.float32)
    x0, x1 = _even_odd(x, BLOCK_ROWS, D)
    w0, w1 = _even_odd(tl.load(W + cols).to(tl.float32)[None, :], 1, D)
    rope = (rows64 % S)[:, None] * (D // 2) + pairs[None, :]
    cs = tl.load(COS + rope, mask=mask, other=0.0)
    sn = tl.load(SIN + rope, mask=mask, other=0.0)

    rstd = tl.math.rsqrt(tl.sum(x * x, 1) / D + eps)
    n0 = x0 * rstd[:, None] * w0
    n1 = x1 * rstd[:, None] * w1
    y = _interleave(n0 * cs - n1 * sn, n0 * sn + n1 * cs, BLOCK_ROWS, D)
    tl.store(Y + rows64[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    X, W, COS, SIN, DY, RSTD,  # saved input, weight, rope tables, upstream grad, fp32 rstd
    DX, DW_PARTIAL,            # dx: contiguous (B, H, S, D); fp32 (P, D) partial dw rows
    stride_xb, stride_xh, stride_xs,
    stride_dyb, stride_dyh, stride_dys,
    S, H, M,
    D: tl.constexpr, BLOCK_ROWS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, D)
    pairs = tl.arange(0, D // 2)
    w0, w1 = _even_odd(tl.load(W + cols).to(tl.float32)[None, :], 1, D)
    dw0 = tl.zeros([BLOCK_ROWS, D // 2], dtype=tl.float32)  # summed over rows after the loop
    dw1 = tl.zeros([BLOCK_ROWS, D // 2], dtype=tl.float32)

    # Grid-stride over row blocks: P programs, hence P partial dw rows, whatever M is. The loads of
    # the next NUM_STAGES − 1 row blocks are in flight while this one is computed.
    for rb in tl.range(pid, tl.cdiv(M, BLOCK_ROWS), tl.num_programs(0), num_stages=NUM_STAGES):
        rows = rb * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        mask = row_ok[:, None]
        x_off = _row_offsets(rows64, S, H, stride_xb, stride_xh, stride_xs)
        dy_off = _row_offsets(rows64, S, H, stride_dyb, stride_dyh, stride_dys)
        x = tl.load(X + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + dy_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x0, x1 = _even_odd(x, BLOCK_ROWS, D)
        dy0, dy1 = _even_odd(dy, BLOCK_ROWS, D)
        rope = (rows64 % S)[:, None] * (D // 2) + pairs[None, :]
        cs = tl.load(COS + rope, mask=mask, other=0.0)
        sn = tl.load(SIN + rope, mask=mask, other=0.0)
        # Padded rows get rstd = 0, hence x̂ = 0 and no contribution to dw.
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)

        # Undo the rotation (rotate by −θ), then the RMSNorm backward.
        gr0 = dy0 * cs + dy1 * sn
        gr1 = dy1 * cs - dy0 * sn
        xhat0 = x0 * rstd[:, None]
        xhat1 = x1 * rstd[:, None]
        g0 = gr0 * w0
        g1 = gr1 * w1
        c = (tl.sum(g0 * xhat0, 1) + tl.sum(g1 * xhat1, 1)) / D
        dx = _interleave(g0 - xhat0 * c[:, None], g1 - xhat1 * c[:, None], BLOCK_ROWS, D) * rstd[:, None]
        tl.store(DX + rows64[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw0 += gr0 * xhat0
        dw1 += gr1 * xhat1

    # Written even if this program got no rows (then it is zeros): stage 2 sums every row.
    dw = _interleave(tl.sum(dw0, 0)[None, :], tl.sum(dw1, 0)[None, :], 1, D)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * D + cols[None, :], dw)


def _check(x, weight, cos, sin) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, cos, sin)):
        raise ValueError("x, weight, cos and sin must be tensors")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, S, D), got shape {tuple(x.shape)}")
    s, d = x.shape[2:]
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim D={d} not supported, use one of {HEAD_DIMS}")
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if x.dtype not in floats or weight.dtype not in floats:
        raise ValueError(f"unsupported dtypes x {x.dtype}, weight {weight.dtype}; use bf16, fp16 or fp32")
    if weight.shape != (d,):
        raise ValueError(f"weight must have shape ({d},), got {tuple(weight.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (s, d // 2) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32 of shape ({s}, {d // 2}), got {t.dtype} {tuple(t.shape)}")
    if not all(t.device == x.device for t in (weight, cos, sin)):
        raise ValueError("x, weight, cos and sin must be on the same device")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def qk_norm_rope_forward(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel. x: (B, H, S, D); weight: (D,); cos, sin: fp32 (S, D/2).

    Returns y: contiguous (B, H, S, D) in the dtype of x; rstd: fp32 (B·H·S,).
    """
    _check(x, weight, cos, sin)
    x = _unit_last_stride(x)
    b, h, s, d = x.shape
    m = b * h * s
    y = alloc((b, h, s, d), x.dtype, x.device)
    rstd = alloc((m,), torch.float32, x.device)
    if m > 0:
        _, block_rows, num_warps = _launch_params(d)
        _qk_norm_rope_fwd_kernel[(triton.cdiv(m, block_rows),)](
            x, weight.contiguous(), cos.contiguous(), sin.contiguous(), y, rstd,
            x.stride(0), x.stride(1), x.stride(2), s, h, m, eps,
            D=d, BLOCK_ROWS=block_rows, num_warps=num_warps,
        )
    return y, rstd


def qk_norm_rope_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward kernel plus the second-stage dw reduction.

    Returns dx: contiguous (B, H, S, D) in the dtype of x; dw: (D,) in the dtype of weight.
    """
    x, dy = _unit_last_stride(x), _unit_last_stride(dy)
    b, h, s, d = x.shape
    m = b * h * s
    dx = alloc((b, h, s, d), x.dtype, x.device)
    _, block_rows, num_warps = _launch_params(d)
    # Per element of a row the loop loads x, dy and 4 bytes of RoPE table (fp32 cos, sin: D/2 each).
    n_prog, num_stages = _bwd_grid(d, m, x.element_size() + dy.element_size() + 4, x.device)
    partial = alloc((n_prog, d), torch.float32, x.device)
    if m > 0:
        _qk_norm_rope_bwd_kernel[(n_prog,)](
            x, weight.contiguous(), cos.contiguous(), sin.contiguous(), dy, rstd, dx, partial,
            x.stride(0), x.stride(1), x.stride(2), dy.stride(0), dy.stride(1), dy.stride(2), s, h, m,
            D=d, BLOCK_ROWS=block_rows, NUM_STAGES=num_stages, num_warps=num_warps,
        )
    else:
        partial.zero_()
    return dx, partial.sum(0).to(weight.dtype)


# Forward and backward as opaque ops for torch.compile (see ``eager_or_op``).
def _fwd_fake(x, weight, cos, sin, eps):
    _check(x, weight, cos, sin)
    return x.new_empty(x.shape), x.new_empty((math.prod(x.shape[:-1]),), dtype=torch.float32)


def _bwd_fake(dy, x, weight, cos, sin, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


_fwd_op = kernel_op("qk_norm_rope_fwd",
                    "(Tensor x, Tensor weight, Tensor cos, Tensor sin, float eps) -> (Tensor, Tensor)",
                    qk_norm_rope_forward, _fwd_fake)
_bwd_op = kernel_op("qk_norm_rope_bwd",
                    "(Tensor dy, Tensor x, Tensor weight, Tensor cos, Tensor sin, Tensor rstd) -> (Tensor, Tensor)",
                    qk_norm_rope_backward, _bwd_fake)


class QKNormRoPEFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, weight, cos, sin and the fp32 rstd; no gradient for cos/sin."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps: float):
        y, rstd = eager_or_op(qk_norm_rope_forward, _fwd_op)(x, weight, cos, sin, eps)
        ctx.save_for_backward(x, weight, cos, sin, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, cos, sin, rstd = ctx.saved_tensors
        dx, dw = eager_or_op(qk_norm_rope_backward, _bwd_op)(dy, x, weight, cos, sin, rstd)
        return dx, dw, None, None, None


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the head dim, then RoPE, with the Triton kernels (differentiable in x, weight).

    Args:
        x: (B, H, S, D) bf16/fp16/fp32, any strides, D ∈ {16, 32, 64, 128}; weight: (D,);
        cos, sin: fp32 (S, D/2), the rotation angle of pair i at position s.
    Returns:
        contiguous (B, H, S, D) in the dtype of x.
    """
    return QKNormRoPEFunction.apply(x, weight, cos, sin, eps)


def qk_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           eps: float = 1e-6) -> torch.Tensor:
    """PyTorch twin of ``qk_norm_rope``: fp32 math, result cast back to the dtype of x."""
    n = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    n0, n1 = n.unflatten(-1, (-1, 2)).unbind(-1)
    y = torch.stack([n0 * cos - n1 * sin, n0 * sin + n1 * cos], dim=-1).flatten(-2)
    return y.to(x.dtype)
