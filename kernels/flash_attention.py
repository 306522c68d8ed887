r"""Non-causal flash attention (forward and backward) in Triton.

Layout is (B, H, S, D): batch, heads, sequence, head dim. Queries may have a different length
than keys/values (S_q vs S_k); the model uses S_q == S_k.

Forward
-------
Per (batch, head), with scale ``c`` (default ``1/sqrt(D)``)::

    S = c · Q Kᵀ                      (S_q × S_k)
    P = softmax(S)  row-wise
    O = P V                           (S_q × D)

The S matrix is never materialised. A program owns a BLOCK_M slice of query rows and walks the
key/value rows in BLOCK_N tiles, keeping for every row a running maximum ``m``, a running
denominator ``l`` and an unnormalised output accumulator ``acc`` (the online softmax). We work in
base 2: with ``c₂ = c · log2(e)``, ``exp(c·s) = 2^(c₂·s)``, so every exponential is a single
``exp2``. For a new tile with raw scores ``s = q·kᵀ``::

    m'  = max(m, c₂ · rowmax(s))
    p   = 2^(c₂·s − m')               (≤ 1, no overflow)
    α   = 2^(m − m')                  (rescales what was accumulated against the old max)
    l   = α·l + rowsum(p)
    acc = α·acc + p V

After the last tile ``O = acc / l`` and we keep the base-2 log-sum-exp ``L = m + log2(l)`` per row
(fp32), so the backward pass can rebuild ``P = 2^(c₂·s − L)`` exactly without a second max pass.

Backward
--------
Given dO (S_q × D)::

    dV  = Pᵀ dO
    dP  = dO Vᵀ
    dS  = P ∘ (dP − Δ),   Δ_i = Σ_j P_ij dP_ij
    dQ  = c · dS K
    dK  = c · dSᵀ Q

The softmax Jacobian gives ``dS_ij = P_ij (dP_ij − Σ_k P_ik dP_ik)``. The row term simplifies to
something we can get without P: ``Σ_k P_ik dP_ik = Σ_k P_ik Σ_d dO_id V_kd = Σ_d dO_id O_id``,
so a cheap preprocess kernel computes ``Δ = rowsum(dO ∘ O)`` once.

Two passes then produce the gradients without atomics, so the result is deterministic. They
are one kernel, ``_attn_bwd_kernel``, launched twice with a compile-time ``PASS``:

* dK/dV pass (PASS 0): a program owns BLOCK_N key rows and loops over all query tiles,
  recomputing ``Pᵀ`` from (Q, K, L) and accumulating dK and dV in fp32 registers.
* dQ pass (PASS 1): a program owns BLOCK_M query rows and loops over all key tiles, recomputing
  P and dP and accumulating dQ.

The price is recomputing QKᵀ and dO Vᵀ in both passes (7 GEMM-sized products instead of 5).

Ragged lengths
--------------
Any S ≥ 1 works. Only the last key tile (forward, dQ pass) or the last query tile (dK/dV pass)
can be partial, so loops run over the full tiles without masks and a separate, masked tail step
runs only when the length is not a multiple of the tile (the ``EVEN_*`` constexpr flags decide at
compile time, so even lengths carry no masking cost at all). Out-of-range rows are loaded as
zeros and never stored.

Every kernel first advances its base pointers to its (batch, head) slice; loads and stores then
index only within that slice.

Precision: bf16/fp16/fp32 inputs, fp32 accumulation and softmax statistics, output in the input
dtype. fp32 inputs use IEEE fp32 dots (not TF32) so fp32 results can be checked at 1e-4.

Autotuning
----------
On a GPU each launch autotunes its block sizes, warps and stages once per (S_q, S_k, D, dtype)
(``_configs``, pruned by ``_prune``). The result is also written to Triton's cache directory
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``; ``cache_results=True``), keyed by the Triton
version, the GPU target, the kernel source and the configs, so a new process reuses it instead of
benchmarking the configs again. The interpreter runs a single config and caches nothing.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import INTERPRET, alloc, eager_or_op, kernel_op

__all__ = [
    "flash_attention",
    "attention_reference",
    "attention_forward",
    "attention_backward",
    "FlashAttentionFunction",
    "SUPPORTED_HEAD_DIMS",
]

LOG2E = 1.4426950408889634  # log2(e): converts exp(x) into exp2(x · LOG2E)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


# --------------------------------------------------------------------------------------------
# Autotune spaces
# --------------------------------------------------------------------------------------------
def _configs(block_a: str, a_vals, block_b: str, b_vals, stages, warps, interp_a: int, interp_b: int):
    """The autotune space; under the interpreter one small config instead.

    Autotuning in the interpreter would run every config at ~1 ms per program. Its one config has
    BLOCK_M != BLOCK_N (catches mixed-up block sizes) and is small enough that the test lengths
    exercise both full tiles and tails.
    """
    if INTERPRET:
        return [triton.Config({block_a: interp_a, block_b: interp_b}, num_warps=4, num_stages=1)]
    return [
        triton.Config({block_a: a, block_b: b}, num_warps=w, num_stages=s)
        for a in a_vals for b in b_vals for s in stages for w in warps
    ]


def _prune(tile_a: str, tile_b: str, n_resident: int):
    """Drop configs that cannot fit in shared memory or waste warps on small tiles.

    ``tile_a`` is the program's own tile, ``n_resident`` how many D-wide operands of it stay in
    shared memory (Q → 1; K, V or Q, dO → 2); ``tile_b`` is the streamed tile, two operands per
    step, with ``num_stages`` buffers each. The estimate (bf16 bytes) follows the allocation
    Triton 3.6 reports (``tools/aot.py --all``); configs above the 227 KiB a block may opt into
    on H100/H200 would only fail at launch.
    """
    def prune(configs, named_args, **kwargs):
        d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 128))
        kept = []
        for cfg in configs:
            a, b = cfg.kwargs[tile_a], cfg.kwargs[tile_b]
            smem = 2 * d * (n_resident * a + cfg.num_stages * 2 * b)
            # 8 warps only pay off once both tile sides are large (Hopper wgmma wants 64 rows per
            # warpgroup); otherwise they just add register pressure.
            if cfg.num_warps == 8 and (a < 128 or b < 64):
                continue
            if smem > 227 * 1024:
                continue
            kept.append(cfg)
        return kept or configs[:1]
    return prune


_FWD_CONFIGS = _configs("BLOCK_M", (64, 128), "BLOCK_N", (32, 64, 128), (2, 3, 4), (4, 8), 32, 16)
_DKDV_CONFIGS = _configs("BLOCK_N", (64, 128), "BLOCK_M", (32, 64), (2, 3), (4, 8), 32, 16)
_DQ_CONFIGS = _configs("BLOCK_M", (64, 128), "BLOCK_N", (32, 64), (2, 3), (4, 8), 32, 16)
_PRE_BLOCK_M = 32 if INTERPRET else 64


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _head(pid_bh, H, stride_b, stride_h):
    """Offset of (batch, head) number ``pid_bh`` in a (B, H, S, D) tensor, in int64: B·H·S·D can
    exceed 2³¹ elements at large batch."""
    return (pid_bh // H).to(tl.int64) * stride_b + (pid_bh % H).to(tl.int64) * stride_h


@triton.jit
def _rows(base, offs, stride_s, stride_d, HEAD_DIM: tl.constexpr):
    """Pointers to the rows ``offs`` (all HEAD_DIM columns) of one head's (S, D) slice at ``base``."""
    return base + offs[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :] * stride_d


@triton.jit
def _rows_t(base, offs, stride_s, stride_d, HEAD_DIM: tl.constexpr):
    """``_rows`` read transposed, a (D × len(offs)) tile, so that q @ kT needs no register transpose."""
    return base + offs[None, :] * stride_s + tl.arange(0, HEAD_DIM)[:, None] * stride_d


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """a @ b with fp32 accumulation.

    UPCAST exists only for the Triton interpreter, whose bf16 dot multiplies the raw uint16 bit
    patterns (garbage). Upcasting first keeps bf16 paths testable on CPU; the rounding of the
    operands to bf16 has already happened, so the result still models the GPU numerics.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, kT, v, col_ok, qk_scale,
              MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step against a BLOCK_N tile of keys (kT: D × BLOCK_N) and values."""
    s = _dot(q, kT, UPCAST, PREC)
    if MASK:
        # Padded key columns get -inf so they contribute exactly 0 after exp2. The tail tile
        # always holds at least one real key, so the row max stays finite.
        s = tl.where(col_ok[None, :], s, float("-inf"))
    # Scale folded into the max and into the exponent (one FMA per score); valid because the
    # wrapper only accepts a positive scale.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PREC)
    return acc, m_new, l_i


@triton.heuristics({"EVEN_K": lambda args: args["S_K"] % args["BLOCK_N"] == 0})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,  # Q/O: (B, H, S_q, D), K/V: (B, H, S_k, D) in any strides; LSE: fp32 (B*H, S_q)
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    H, S_Q, S_K,
    qk_scale,  # softmax scale × log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Q += _head(pid_bh, H, stride_qb, stride_qh)
    K += _head(pid_bh, H, stride_kb, stride_kh)
    V += _head(pid_bh, H, stride_vb, stride_vh)
    O += _head(pid_bh, H, stride_ob, stride_oh)
    LSE += pid_bh.to(tl.int64) * S_Q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < S_Q

    q = tl.load(_rows(Q, offs_m, stride_qs, stride_qd, HEAD_DIM), mask=row_ok[:, None], other=0.0)
    kT_ptrs = _rows_t(K, offs_n, stride_ks, stride_kd, HEAD_DIM)
    v_ptrs = _rows(V, offs_n, stride_vs, stride_vd, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    no_mask = offs_n < BLOCK_N  # all-true placeholder for the unmasked steps

    n_full = (S_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        kT = tl.load(kT_ptrs + start_n * stride_ks)
        v = tl.load(v_ptrs + start_n * stride_vs)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kT, v, no_mask, qk_scale, False, UPCAST, PREC)
    if not EVEN_K:
        col_ok = (n_full + offs_n) < S_K
        kT = tl.load(kT_ptrs + n_full * stride_ks, mask=col_ok[None, :], other=0.0)
        v = tl.load(v_ptrs + n_full * stride_vs, mask=col_ok[:, None], other=0.0)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kT, v, col_ok, qk_scale, True, UPCAST, PREC)

    # l ≥ 1 for every row (the row max contributes 2⁰), so the division is safe.
    o = acc / l_i[:, None]
    tl.store(_rows(O, offs_m, stride_os, stride_od, HEAD_DIM), o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,  # O, dO: (B, H, S_q, D) any strides; DELTA: fp32 (B*H, S_q)
    stride_ob, stride_oh, stride_os, stride_od,
    stride_db, stride_dh, stride_ds, stride_dd,
    H, S_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    O += _head(pid_bh, H, stride_ob, stride_oh)
    DO += _head(pid_bh, H, stride_db, stride_dh)
    DELTA += pid_bh.to(tl.int64) * S_Q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < S_Q
    o = tl.load(_rows(O, offs_m, stride_os, stride_od, HEAD_DIM), mask=row_ok[:, None], other=0.0)
    do = tl.load(_rows(DO, offs_m, stride_ds, stride_dd, HEAD_DIM), mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + offs_m, delta, mask=row_ok)


@triton.jit
def _bwd_kv_tile(dk, dv, k, v, q, do, lse, delta, qk_scale,
                 UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Accumulate one query tile's contribution into this program's dK, dV (BLOCK_N × D).

    Everything is computed transposed (keys along rows) so that dV += Pᵀ dO and dK += dSᵀ Q are
    plain products of the tiles as loaded. Padded query rows need no mask: they arrive with
    q = dO = 0 and L = Δ = 0, so their pT is exactly 1 and every product they enter is exactly 0.
    Padded key rows (k = v = 0) may overflow pT, but only into their own dK/dV rows, which are
    never stored.
    """
    sT = _dot(k, tl.trans(q), UPCAST, PREC)  # (BLOCK_N, BLOCK_M) raw scores
    pT = tl.math.exp2(sT * qk_scale - lse[None, :])
    dv += _dot(pT.to(do.dtype), do, UPCAST, PREC)
    dpT = _dot(v, tl.trans(do), UPCAST, PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += _dot(dsT.to(q.dtype), q, UPCAST, PREC)
    return dk, dv


@triton.jit
def _bwd_q_tile(dq, q, do, kT, vT, k, lse, delta, col_ok, qk_scale,
                MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Accumulate one key tile's contribution into this program's dQ (BLOCK_M × D, unscaled)."""
    s = _dot(q, kT, UPCAST, PREC)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if MASK:
        # Padded keys (k = v = 0) get p = 2^(−L). Their dS·K term is 0 while that is finite, but
        # when every score of a row is very negative 2^(−L) overflows and inf·0 would be NaN.
        p = tl.where(col_ok[None, :], p, 0.0)
    dp = _dot(do, vT, UPCAST, PREC)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, UPCAST, PREC)
    return dq


@triton.heuristics({"EVEN_Q": lambda args: args["S_Q"] % args["BLOCK_M"] == 0,
                    "EVEN_K": lambda args: args["S_K"] % args["BLOCK_N"] == 0})
@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA,  # inputs; LSE/DELTA fp32 (B*H, S_q)
    DQ, DK, DV,               # outputs: dQ (B, H, S_q, D), dK, dV (B, H, S_k, D), any strides
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_db, stride_dh, stride_ds, stride_dd,      # dO
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    H, S_Q, S_K,
    qk_scale, sm_scale,
    PASS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """One backward pass for one block of one (batch, head), chosen at compile time by PASS.

    PASS 0: the program owns BLOCK_N keys, streams every query tile and writes their dK, dV.
    PASS 1: the program owns BLOCK_M queries, streams every key tile and writes their dQ.
    Each pass compiles to its own kernel; the other pass's branch is not in it.
    """
    pid = tl.program_id(0)  # key block (PASS 0) or query block (PASS 1)
    pid_bh = tl.program_id(1)
    LSE += pid_bh.to(tl.int64) * S_Q
    DELTA += pid_bh.to(tl.int64) * S_Q
    Q += _head(pid_bh, H, stride_qb, stride_qh)
    K += _head(pid_bh, H, stride_kb, stride_kh)
    V += _head(pid_bh, H, stride_vb, stride_vh)
    DO += _head(pid_bh, H, stride_db, stride_dh)
    DQ += _head(pid_bh, H, stride_dqb, stride_dqh)
    DK += _head(pid_bh, H, stride_dkb, stride_dkh)
    DV += _head(pid_bh, H, stride_dvb, stride_dvh)

    if PASS == 0:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        col_ok = offs_n < S_K

        # This program's keys/values stay in registers for the whole loop; padded key rows load as 0.
        k = tl.load(_rows(K, offs_n, stride_ks, stride_kd, HEAD_DIM), mask=col_ok[:, None], other=0.0)
        v = tl.load(_rows(V, offs_n, stride_vs, stride_vd, HEAD_DIM), mask=col_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

        q_ptrs = _rows(Q, offs_m, stride_qs, stride_qd, HEAD_DIM)
        do_ptrs = _rows(DO, offs_m, stride_ds, stride_dd, HEAD_DIM)

        m_full = (S_Q // BLOCK_M) * BLOCK_M
        for start_m in range(0, m_full, BLOCK_M):
            q = tl.load(q_ptrs + start_m * stride_qs)
            do = tl.load(do_ptrs + start_m * stride_ds)
            lse = tl.load(LSE + start_m + offs_m)
            delta = tl.load(DELTA + start_m + offs_m)
            dk, dv = _bwd_kv_tile(dk, dv, k, v, q, do, lse, delta, qk_scale, UPCAST, PREC)
        if not EVEN_Q:
            row_ok = (m_full + offs_m) < S_Q
            q = tl.load(q_ptrs + m_full * stride_qs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs + m_full * stride_ds, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + m_full + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + m_full + offs_m, mask=row_ok, other=0.0)
            dk, dv = _bwd_kv_tile(dk, dv, k, v, q, do, lse, delta, qk_scale, UPCAST, PREC)

        dk *= sm_scale  # S = c·QKᵀ  ⇒  dK = c·dSᵀQ
        tl.store(_rows(DK, offs_n, stride_dks, stride_dkd, HEAD_DIM),
                 dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(_rows(DV, offs_n, stride_dvs, stride_dvd, HEAD_DIM),
                 dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
    else:
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        row_ok = offs_m < S_Q

        # Padded query rows: q = dO = 0 and L = Δ = 0 give p = 1, dS = 0, so they stay finite and
        # are simply not stored.
        q = tl.load(_rows(Q, offs_m, stride_qs, stride_qd, HEAD_DIM), mask=row_ok[:, None], other=0.0)
        do = tl.load(_rows(DO, offs_m, stride_ds, stride_dd, HEAD_DIM), mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        vT_ptrs = _rows_t(V, offs_n, stride_vs, stride_vd, HEAD_DIM)
        k_ptrs = _rows(K, offs_n, stride_ks, stride_kd, HEAD_DIM)
        no_mask = offs_n < BLOCK_N

        n_full = (S_K // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            k = tl.load(k_ptrs + start_n * stride_ks)
            vT = tl.load(vT_ptrs + start_n * stride_vs)
            dq = _bwd_q_tile(dq, q, do, tl.trans(k), vT, k, lse, delta, no_mask, qk_scale,
                             False, UPCAST, PREC)
        if not EVEN_K:
            col_ok = (n_full + offs_n) < S_K
            k = tl.load(k_ptrs + n_full * stride_ks, mask=col_ok[:, None], other=0.0)
            vT = tl.load(vT_ptrs + n_full * stride_vs, mask=col_ok[None, :], other=0.0)
            dq = _bwd_q_tile(dq, q, do, tl.trans(k), vT, k, lse, delta, col_ok, qk_scale,
                             True, UPCAST, PREC)

        dq *= sm_scale  # S = c·QKᵀ  ⇒  dQ = c·dS K
        tl.store(_rows(DQ, offs_m, stride_dqs, stride_dqd, HEAD_DIM),
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# Autotuned entry points, one per launch. Heuristics sit below the autotuner so that the EVEN_*
# flags are recomputed for whichever block sizes the config under test uses. The two backward
# passes share a kernel but want different tiles, so each has its own autotuner and config
# space; PASS is part of their key, so their results can never share an on-disk cache entry.
_attn_fwd = triton.autotune(
    _FWD_CONFIGS, key=["S_Q", "S_K", "HEAD_DIM"], cache_results=True,
    prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", 1)},
)(_attn_fwd_kernel)
_attn_bwd_dkdv = triton.autotune(
    _DKDV_CONFIGS, key=["PASS", "S_Q", "S_K", "HEAD_DIM"], cache_results=True,
    prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M", 2)},
)(_attn_bwd_kernel)
_attn_bwd_dq = triton.autotune(
    _DQ_CONFIGS, key=["PASS", "S_Q", "S_K", "HEAD_DIM"], cache_results=True,
    prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", 2)},
)(_attn_bwd_kernel)


# --------------------------------------------------------------------------------------------
# Host-side wrappers
# --------------------------------------------------------------------------------------------
def _resolve_scale(head_dim: int, scale: Optional[float]) -> float:
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else math.nan  # D < 1: _check_inputs refuses it


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> float:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected (B, H, S, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}; use bf16, fp16 or fp32")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} not supported by the Triton kernel; use one of {SUPPORTED_HEAD_DIMS}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError("sequence lengths must be >= 1")
    scale = _resolve_scale(D, scale)
    if not scale > 0.0:
        raise ValueError(f"softmax scale must be positive, got {scale}")
    return scale


def _dot_flags(dtype: torch.dtype) -> Tuple[bool, str]:
    # fp32 I/O asks for true fp32 products; TF32 would cost ~1e-3 relative error.
    prec = "ieee" if (dtype == torch.float32 or INTERPRET) else "tf32"
    return INTERPRET, prec


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    Args:
        q: (B, H, S_q, D); k, v: (B, H, S_k, D). Same dtype (bf16/fp16/fp32), any strides.
        scale: softmax scale, default 1/sqrt(D); must be > 0.
    Returns:
        o: (B, H, S_q, D) contiguous, dtype of q.
        lse: (B, H, S_q) fp32, base-2 log-sum-exp of the scaled scores
             (natural-log LSE = lse · ln 2).
    """
    scale = _check_inputs(q, k, v, scale)
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    o = alloc((B, H, S_q, D), q.dtype, q.device)
    lse = alloc((B, H, S_q), torch.float32, q.device)
    upcast, prec = _dot_flags(q.dtype)

    def grid(meta):
        return (triton.cdiv(S_q, meta["BLOCK_M"]), B * H)

    _attn_fwd[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, S_q, S_k, scale * LOG2E,
        HEAD_DIM=D, UPCAST=upcast, PREC=prec,
    )
    return o, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor,
                       scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``attention_forward`` w.r.t. q, k, v (preprocess, dK/dV pass, dQ pass).

    Args:
        do: (B, H, S_q, D) upstream gradient (any strides, e.g. expanded); q, k, v, o as in and
            out of the forward; lse: (B, H, S_q) fp32 from the forward.
    Returns:
        dq (B, H, S_q, D), dk, dv (B, H, S_k, D), contiguous, in the dtype of q.
    """
    scale = _check_inputs(q, k, v, scale)
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    upcast, prec = _dot_flags(q.dtype)
    dev = q.device

    delta = alloc((B, H, S_q), torch.float32, dev)
    _attn_bwd_preprocess_kernel[(triton.cdiv(S_q, _PRE_BLOCK_M), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, S_q,
        HEAD_DIM=D, BLOCK_M=_PRE_BLOCK_M,
    )

    dq = alloc((B, H, S_q, D), q.dtype, dev)
    dk = alloc((B, H, S_k, D), q.dtype, dev)
    dv = alloc((B, H, S_k, D), q.dtype, dev)
    args = (q, k, v, do, lse, delta, dq, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
            H, S_q, S_k, scale * LOG2E, scale)

    def grid_kv(meta):
        return (triton.cdiv(S_k, meta["BLOCK_N"]), B * H)

    def grid_q(meta):
        return (triton.cdiv(S_q, meta["BLOCK_M"]), B * H)

    _attn_bwd_dkdv[grid_kv](*args, PASS=0, HEAD_DIM=D, UPCAST=upcast, PREC=prec)
    _attn_bwd_dq[grid_q](*args, PASS=1, HEAD_DIM=D, UPCAST=upcast, PREC=prec)
    return dq, dk, dv


# Forward and backward as opaque ops for torch.compile (see ``eager_or_op``); the fakes give
# the output shapes and dtypes without running anything.
def _fwd_fake(q, k, v, scale):
    _check_inputs(q, k, v, scale)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_fake(do, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)


_fwd_op = kernel_op("flash_attention_fwd", "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)",
                    attention_forward, _fwd_fake)
_bwd_op = kernel_op("flash_attention_bwd", "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, "
                    "float scale) -> (Tensor, Tensor, Tensor)", attention_backward, _bwd_fake)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the fp32 LSE (B·H·S_q·4 bytes) for backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        o, lse = eager_or_op(attention_forward, _fwd_op)(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = eager_or_op(attention_backward, _bwd_op)(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Non-causal softmax attention with the Triton kernels (differentiable).

    Args:
        q: (B, H, S_q, D); k, v: (B, H, S_k, D); bf16, fp16 or fp32, all the same dtype;
           D in {16, 32, 64, 128}; any strides (last-dim stride 1 is the fast path).
        scale: softmax scale, default 1/sqrt(D).
    Returns:
        (B, H, S_q, D) tensor in the input dtype.
    """
    # The op schema wants a float; the inputs are checked once, by attention_forward (eager) or
    # by the fake forward (while compiling). Reading D needs a tensor of the right rank first.
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        raise ValueError("q, k, v must be (B, H, S, D) tensors")
    return FlashAttentionFunction.apply(q, k, v, _resolve_scale(q.shape[-1], scale))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: Optional[float] = None) -> torch.Tensor:
    """PyTorch twin of ``flash_attention``: non-causal SDPA, (B, H, S, D) in and out.

    On the CPU, with gradients flowing, bf16 / fp16 inputs are attended in fp32 (outside autocast,
    which would cast them back): PyTorch's CPU flash-attention backward is several times slower in
    bf16 than in fp32, and the cast costs less than the difference (results/demo.md, "Speed")."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled() \
            and q.requires_grad:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
