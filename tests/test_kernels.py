"""Correctness tests for kernels/ (flash attention and RMSNorm).

On a CPU-only machine conftest.py sets TRITON_INTERPRET=1, so the very same Triton kernels run
through the Triton interpreter on CPU tensors; with a GPU present the tests also run on CUDA.
Every check compares against a float64 PyTorch computation with the relative error
‖out − ref‖ / ‖ref‖ (1e-4 for fp32, 2e-2 for bf16/fp16). All kernel-written buffers are pre-filled
with NaN (the ``kernels._common.POISON`` hook), so an element the kernel forgets to write shows up.
The tests call the Triton path explicitly: the kernel modules' functions, or the public
``kernels.*`` functions with the "triton" backend (the default sends CPU tensors to the reference).

Interpreter notes: it costs ~1 ms per program instance, so batch·heads stay at 2 and lengths
small. Its fp32→bf16 cast truncates instead of rounding to nearest (measured: twice the mean
rounding error of torch's cast), so bf16 errors here run larger than on a GPU; still far inside
2e-2.
"""
from __future__ import annotations

import math

import pytest
import torch

import kernels
import kernels.flash_attention as fa
from kernel_cases import DEVICES, TOL, rel_err
from kernels import INTERPRET, rmsnorm

pytestmark = pytest.mark.usefixtures("poison_and_seed")


@pytest.fixture
def full_autotune():
    """Requested by a test that wants the real CUDA autotune space (see _pin_gpu_configs)."""


@pytest.fixture(autouse=True)
def _pin_gpu_configs(request, monkeypatch):
    # On a GPU every new (S, D, dtype) would autotune ~20 configs per kernel, i.e. hundreds of
    # compilations for this file. Correctness does not depend on the tile choice, so pin one
    # config (still BLOCK_M != BLOCK_N, still ragged for S = 17/100/129); one test keeps the full
    # space. The interpreter already runs with a single config.
    if INTERPRET or not torch.cuda.is_available() or "full_autotune" in request.fixturenames:
        return
    import triton
    pins = {
        fa._attn_fwd: {"BLOCK_M": 64, "BLOCK_N": 32},
        fa._attn_bwd_dkdv: {"BLOCK_N": 64, "BLOCK_M": 32},
        fa._attn_bwd_dq: {"BLOCK_M": 64, "BLOCK_N": 32},
    }
    for kernel, blocks in pins.items():
        monkeypatch.setattr(kernel, "configs", [triton.Config(blocks, num_warps=4, num_stages=2)])


@pytest.fixture
def triton_backend():
    """The public ``kernels.*`` functions on the Triton path (by default CPU tensors take the
    PyTorch reference)."""
    kernels.set_backend("triton")
    yield
    kernels.set_backend("auto")


# ------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------
def attn_ref64(q, k, v, do, scale=None):
    """fp64 attention forward, natural-log LSE and gradients."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (qd @ kd.transpose(-1, -2)) * scale
    o = torch.softmax(s, dim=-1) @ vd
    o.backward(do.double())
    return o.detach(), torch.logsumexp(s, -1).detach(), qd.grad, kd.grad, vd.grad


def rand_qkv(b, h, s_q, s_k, d, dtype, device):
    q = torch.randn(b, h, s_q, d, device=device).to(dtype)
    k = torch.randn(b, h, s_k, d, device=device).to(dtype)
    v = torch.randn(b, h, s_k, d, device=device).to(dtype)
    do = torch.randn(b, h, s_q, d, device=device).to(dtype)
    return q, k, v, do


def check_attention(q, k, v, do, scale=None, tol=None):
    o, lse = fa.attention_forward(q, k, v, scale)
    dq, dk, dv = fa.attention_backward(do, q, k, v, o, lse, scale)
    o_r, lse_r, dq_r, dk_r, dv_r = attn_ref64(q, k, v, do, scale)
    tol = TOL[q.dtype] if tol is None else tol
    assert o.dtype == q.dtype and dq.dtype == dk.dtype == dv.dtype == q.dtype
    assert o.shape == q.shape and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    errs = {
        "o": rel_err(o, o_r),
        # The kernel keeps a base-2 LSE; it is fp32 whatever the I/O dtype.
        "lse": rel_err(lse * math.log(2.0), lse_r),
        "dq": rel_err(dq, dq_r),
        "dk": rel_err(dk, dk_r),
        "dv": rel_err(dv, dv_r),
    }
    assert errs["lse"] <= 1e-5, errs
    for name in ("o", "dq", "dk", "dv"):
        assert errs[name] <= tol, errs
    return errs


# Full cross product of (B, H) in {(1, 2), (2, 1)}, the lengths (1: tail only; 17: a tail after
# one tile, and a partial query tile; 64: a tile multiple, no masked code at all; 100 and 129:
# several full tiles + tail), head dims 16/32/64 and fp32/bf16: 60 cases, ~40 s in the
# interpreter. D=128, fp16 and S_q != S_k are covered more sparsely by the tests below.
ATTN_CASES = [
    (bh, s, d, dt)
    for bh in ((1, 2), (2, 1)) for s in (1, 17, 64, 100, 129) for d in (16, 32, 64)
    for dt in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bh,s,d,dtype", ATTN_CASES,
                         ids=[f"B{b}H{h}-S{s}-D{d}-{str(dt)[6:]}" for (b, h), s, d, dt in ATTN_CASES])
def test_attention_matches_fp64(device, bh, s, d, dtype):
    q, k, v, do = rand_qkv(*bh, s, s, d, dtype, device)
    check_attention(q, k, v, do)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("s_q,s_k", [(17, 100), (100, 17), (64, 1)])
def test_attention_different_q_kv_lengths(device, s_q, s_k):
    # Catches S_q / S_k being mixed up anywhere (loop bounds, masks, LSE indexing).
    q, k, v, do = rand_qkv(1, 2, s_q, s_k, 32, torch.float32, device)
    check_attention(q, k, v, do)


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("s,dtype", [(100, torch.float32), (33, torch.bfloat16)])
def test_attention_head_dim_128(device, s, dtype):
    q, k, v, do = rand_qkv(1, 1, s, s, 128, dtype, device)
    check_attention(q, k, v, do)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_fp16_and_custom_scale(device):
    q, k, v, do = rand_qkv(2, 1, 40, 40, 64, torch.float16, device)
    check_attention(q, k, v, do, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_large_logits_stay_finite(device):
    # Scaled scores with std ~64 (max ~200) overflow exp/exp2 in fp32 without the running max;
    # the NaN/inf check in rel_err and the fp64 comparison both catch that. (Much larger logits
    # make the fp32 gradients themselves ill-conditioned, so 8x is the useful range.)
    q, k, v, do = rand_qkv(1, 2, 50, 50, 32, torch.float32, device)
    check_attention(q * 8.0, k * 8.0, v, do)


@pytest.mark.parametrize("device", DEVICES)
# The interpreter (numpy) reports the overflow in the padded key rows of the dK/dV pass; those
# rows are never stored, which is exactly what the fp64 comparison verifies.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_attention_very_negative_scores(device):
    # Every score near -140 (q = -5u, k = 5u + noise) puts the natural LSE near -140, so a padded
    # key (k = 0, score 0) would get p = exp(140) = inf in fp32 unless the ragged tail is masked;
    # inf · 0 then turns dQ into NaN. S = 23 is ragged for every block size in use. What this
    # catches is the NaN (rel_err rejects non-finite output); the tolerance is looser because the
    # shared 5u component of k cancels in dQ = c·dS K and amplifies fp32 rounding ~15x.
    b, h, s, d = 1, 2, 23, 32
    u = torch.randn(d, device=device)
    q = (-5.0 * u + 0.3 * torch.randn(b, h, s, d, device=device))
    k = (5.0 * u + 0.3 * torch.randn(b, h, s, d, device=device))
    v = torch.randn(b, h, s, d, device=device)
    do = torch.randn(b, h, s, d, device=device)
    check_attention(q, k, v, do, tol=1e-3)
    _, lse_r, _, _, _ = attn_ref64(q, k, v, do)
    assert lse_r.max() < -90.0, "test setup: scores not negative enough to overflow exp"


@pytest.mark.parametrize("device", DEVICES)
def test_attention_strided_views_and_expanded_grad(device, triton_backend):
    # q, k, v as views into a packed (B, S, 3, H, D) projection: non-contiguous (B, H, S, D)
    # strides must be honoured without copies. loss = o.sum() hands backward a stride-0 dO.
    b, s, h, d = 2, 37, 1, 32
    qkv = torch.randn(b, s, 3, h, d, device=device, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    kernels.attention(q, k, v).sum().backward()
    grad = qkv.grad
    qkv64 = qkv.detach().double().requires_grad_()
    fa.attention_reference(*qkv64.permute(2, 0, 3, 1, 4).unbind(0)).sum().backward()
    assert rel_err(grad, qkv64.grad) <= 1e-4


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", DEVICES)
def test_attention_every_operand_its_own_layout(device):
    # Each operand gets different batch/head/sequence strides (and dO a non-unit last-dim
    # stride), with B, H >= 2 so that every stride is multiplied by a non-zero index: reading
    # one tensor with another's strides cannot pass. The model's own case is like this: q and k
    # come contiguous out of RoPE, v is a view into the packed QKV projection.
    b, h, s, d = 2, 2, 21, 16
    q = torch.randn(b, h, s, d, device=device)
    k = torch.randn(b, s, h, d, device=device).transpose(1, 2)
    v = torch.randn(h, b, s, d, device=device).transpose(0, 1)
    do = torch.randn(b, h, d, s, device=device).transpose(-1, -2)
    strides = {t.stride() for t in (q, k, v, do)}
    assert len(strides) == 4 and do.stride(-1) != 1
    check_attention(q, k, v, do)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("s,d", [(589, 128), (640, 64)])
def test_attention_autotuned_configs_cuda(full_autotune, s, d):
    # The production path: whatever config the autotuner picks must be correct too.
    q, k, v, do = rand_qkv(2, 2, s, s, d, torch.bfloat16, "cuda")
    check_attention(q, k, v, do)


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", DEVICES)
def test_attention_autograd_and_determinism(device):
    q, k, v, do = rand_qkv(1, 2, 45, 45, 16, torch.bfloat16, device)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fa.flash_attention(*leaves)
        out.backward(do)
        grads.append([t.grad for t in leaves])
    _, _, dq_r, dk_r, dv_r = attn_ref64(q, k, v, do)
    for g, r in zip(grads[0], (dq_r, dk_r, dv_r)):
        assert rel_err(g, r) <= TOL[torch.bfloat16]
    # The default backward has no atomics: two runs must agree bit for bit.
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_autotune_pruning():
    """The GPU-only pruning rule (never run by the interpreter, which has one config)."""
    import triton
    prune = fa._prune("BLOCK_M", "BLOCK_N", 1)

    def cfg(m, n, warps, stages):
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)

    # Byte counts as Triton 3.6 allocates them (tools/aot.py --all), D = 128:
    fits = cfg(128, 128, 8, 3)       # 2·128·(128 + 3·2·128) B = 224 KiB ≤ 227 KiB
    too_big = cfg(128, 128, 8, 4)    # 2·128·(128 + 4·2·128) B = 288 KiB
    small_8_warps = cfg(64, 64, 8, 2)
    narrow = cfg(64, 32, 4, 2)
    assert prune([fits, too_big, small_8_warps, narrow], {}, HEAD_DIM=128) == [fits, narrow]
    assert prune([too_big], {}, HEAD_DIM=64) == [too_big]  # 144 KiB at D = 64
    # Two resident operands (the backward kernels): 2·128·(2·128 + 3·2·128) B = 256 KiB.
    assert fa._prune("BLOCK_M", "BLOCK_N", 2)([fits, narrow], {}, HEAD_DIM=128) == [narrow]
    # Nothing left: fall back to the first config rather than give the autotuner an empty list.
    assert prune([small_8_warps], {}, HEAD_DIM=64) == [small_8_warps]


def test_attention_rejects_unsupported_inputs():
    q = torch.randn(1, 1, 8, 48)
    with pytest.raises(ValueError, match="head dim"):
        fa.attention_forward(q, q, q)
    q8 = torch.randn(1, 1, 8, 8)  # a power of two, but below the tl.dot minimum we support
    with pytest.raises(ValueError, match="head dim"):
        fa.attention_forward(q8, q8, q8)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="dtype"):
        fa.attention_forward(q, q.double(), q)
    with pytest.raises(ValueError, match="positive"):
        fa.attention_forward(q, q, q, scale=-1.0)
    with pytest.raises(ValueError):
        fa.attention_forward(q, torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    # Through the public wrapper, which reads D to resolve the default scale: still ValueErrors.
    empty_d = torch.randn(1, 1, 8, 0)
    for bad in ((empty_d, empty_d, empty_d), (torch.randn(()), q, q), (q, None, q)):
        with pytest.raises(ValueError):
            fa.flash_attention(*bad)


# ------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------
def rms_ref64(x, w, dy, eps=1e-6):
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    rstd = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    y = xd * rstd * wd
    y.backward(dy.double())
    return y.detach(), rstd.detach().reshape(-1), xd.grad, wd.grad


def check_rms_norm(x, w, eps=1e-6):
    dy = torch.randn_like(x)
    y, rstd = rmsnorm.rms_norm_forward(x, w, eps)
    dx, dw = rmsnorm.rms_norm_backward(dy, x, w, rstd)
    y_r, rstd_r, dx_r, dw_r = rms_ref64(x, w, dy, eps)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dw.shape == w.shape and dw.dtype == w.dtype
    assert rstd.dtype == torch.float32 and rstd.shape == (x.numel() // x.shape[-1],)
    tol = TOL[x.dtype]
    # rstd is computed from the (already rounded) inputs in fp32, whatever the I/O dtype.
    assert rel_err(rstd, rstd_r) <= 1e-5
    assert rel_err(y, y_r) <= tol
    assert rel_err(dx, dx_r) <= tol
    assert rel_err(dw, dw_r) <= tol


# Short rows (64/100/128: many rows per program, 100 not a power of two) and wide rows
# (1024: one row per program). Row counts 1/7/33 leave the last row block partial.
RMS_CASES = [
    ((1, 64), torch.float32), ((33, 64), torch.bfloat16),
    ((7, 100), torch.float32), ((33, 100), torch.bfloat16),
    ((7, 128), torch.bfloat16), ((33, 128), torch.float32),
    ((1, 1024), torch.bfloat16), ((7, 1024), torch.float32), ((33, 1024), torch.bfloat16),
    ((2, 5, 3, 64), torch.bfloat16), ((2, 9, 4, 128), torch.float32),  # (B, S, H, N) QK-norm
    ((3, 11, 1000), torch.bfloat16),                                   # (B, S, N), ragged N
    ((2, 4096), torch.float32),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype", RMS_CASES, ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}" for s, d in RMS_CASES])
def test_rms_norm_matches_fp64(device, shape, dtype):
    x = torch.randn(shape, device=device).to(dtype)
    w = (1.0 + 0.5 * torch.randn(shape[-1], device=device)).to(dtype)
    check_rms_norm(x, w)


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [64, 1024])
def test_rms_norm_partial_dw_loop(device, n):
    # More row blocks than partial-dw programs, so each program loops several times and the
    # second-stage sum has to combine the per-program rows correctly.
    _, block_rows, _ = rmsnorm._launch_params(n)
    fp32_x_dy = 8  # bytes the backward loads per element
    n_prog_max, _ = rmsnorm._bwd_grid(n, 10 ** 9, fp32_x_dy, torch.device(device))
    rows = (3 * n_prog_max + 1) * block_rows - 3  # and a partial last block
    if device == "cuda":
        rows = min(rows, 1 << 20)
    x = torch.randn(rows, n, device=device)
    w = 1.0 + 0.5 * torch.randn(n, device=device)
    n_prog, _ = rmsnorm._bwd_grid(n, rows, fp32_x_dy, x.device)
    assert -(-rows // block_rows) > n_prog
    check_rms_norm(x, w)


def test_rms_norm_backward_grid(monkeypatch):
    """The CUDA branch of ``_bwd_grid``, with H100 properties: P is what stays resident at once."""
    from types import SimpleNamespace
    h100 = SimpleNamespace(multi_processor_count=132, max_threads_per_multi_processor=2048,
                           regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=228 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    cuda = torch.device("cuda")
    bf16_x_dy, fp32_x_dy = 4, 8  # bytes loaded per element of a row
    # N = 2048: 8 warps of 64-register threads, 4 programs per SM; two 8 KiB steps prefetched.
    assert rmsnorm._bwd_grid(2048, 32768, bf16_x_dy, cuda) == (132 * 4, 3)
    # N = 128: 32 rows per program at 16 warps, 2 programs per SM.
    assert rmsnorm._bwd_grid(128, 491520, bf16_x_dy, cuda) == (132 * 2, 3)
    # Never more programs than row blocks.
    assert rmsnorm._bwd_grid(2048, 10, bf16_x_dy, cuda) == (10, 3)
    # Wide rows: one 64 KiB step prefetched; a 128 KiB step (fp32) is not prefetched at all.
    assert rmsnorm._bwd_grid(16384, 32768, bf16_x_dy, cuda)[1] == 2
    assert rmsnorm._bwd_grid(16384, 32768, fp32_x_dy, cuda)[1] == 1


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_bf16_input_fp32_weight_and_strided_rows(device):
    # Autocast-style mix: bf16 activations, fp32 weight; rows taken from a wider buffer so the
    # row stride differs from N.
    big = torch.randn(13, 200, device=device).to(torch.bfloat16)
    x = big[:, :128]
    w = 1.0 + 0.5 * torch.randn(128, device=device)
    assert x.stride(0) == 200
    check_rms_norm(x, w, eps=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_autograd(device, triton_backend):
    x = torch.randn(3, 5, 96, device=device, requires_grad=True)
    w = (1.0 + 0.5 * torch.randn(96, device=device)).requires_grad_()
    dy = torch.randn(3, 5, 96, device=device)
    kernels.rms_norm(x, w).backward(dy)
    _, _, dx_r, dw_r = rms_ref64(x, w, dy)
    assert rel_err(x.grad, dx_r) <= 1e-4
    assert rel_err(w.grad, dw_r) <= 1e-4


def test_rms_norm_reference_twin_matches_fp64():
    x = torch.randn(4, 7, 100).to(torch.bfloat16)
    w = torch.randn(100)
    y_r, _, _, _ = rms_ref64(x, w, torch.ones_like(x))
    y = rmsnorm.rms_norm_reference(x, w)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_r) <= 2e-2


@pytest.mark.parametrize("x,w", [
    (torch.randn(4, 64), torch.randn(32)),                    # weight of the wrong width
    (torch.randn(4, 64), None),                               # no weight
    (torch.randn(4, 64), torch.ones(64, dtype=torch.int32)),  # integer weight
    (torch.randn(()), torch.randn(1)),                        # no last dim
    (torch.randn(4, 0), torch.randn(0)),                      # empty rows
])
def test_rms_norm_rejects_bad_input(x, w):
    with pytest.raises(ValueError):
        rmsnorm.triton_rms_norm(x, w)


# ------------------------------------------------------------------------------------------
# torch.compile: the kernels are opaque custom ops to the compiler
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(device):
    """Schema, fake (shape-only) twins and real kernels agree, as torch.compile assumes."""
    q, k, v, do = rand_qkv(1, 2, 17, 9, 32, torch.float32, device)
    o, lse = fa.attention_forward(q, k, v, 0.3)
    torch.library.opcheck(fa._fwd_op, (q, k, v, 0.3))
    torch.library.opcheck(fa._bwd_op, (do, q, k, v, o, lse, 0.3))
    x = torch.randn(3, 5, 48, device=device).to(torch.bfloat16)
    w = torch.randn(48, device=device)
    y, rstd = rmsnorm.rms_norm_forward(x, w, 1e-6)
    torch.library.opcheck(rmsnorm._fwd_op, (x, w, 1e-6))
    torch.library.opcheck(rmsnorm._bwd_op, (torch.randn_like(x), x, w, rstd))


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_graph_matches_eager(device, triton_backend):
    """fullgraph=True fails on any graph break, e.g. Dynamo tracing into a Triton launch."""
    import torch._dynamo
    q, k, v, do = rand_qkv(1, 2, 17, 17, 32, torch.float32, device)
    w = torch.randn(32, device=device)

    def f(q, k, v, w):
        return kernels.attention(kernels.rms_norm(q, w), kernels.rms_norm(k, w), v, scale=0.2)

    inputs = [t.clone().requires_grad_() for t in (q, k, v, w)]
    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(*inputs)
    grads = torch.autograd.grad(out, inputs, do)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v, w)]
    ref = f(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, do)
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-6


# ------------------------------------------------------------------------------------------
# Dispatch in kernels/__init__.py
# ------------------------------------------------------------------------------------------
@pytest.fixture
def spy(monkeypatch):
    """Replace the Triton functions the dispatcher calls by recorders; returns the call list."""
    calls = []
    monkeypatch.setattr(fa, "flash_attention", lambda *a, **kw: calls.append("attn"))
    monkeypatch.setattr(rmsnorm, "triton_rms_norm", lambda *a, **kw: calls.append("rms"))
    yield calls
    kernels.set_backend("auto")


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_dispatch_runs_the_reference_on_cpu(spy, mode):
    # "auto" means the reference for CPU tensors, even with the interpreter available.
    kernels.set_backend(mode)
    x = torch.randn(2, 3, 64)
    q, k, v, _ = rand_qkv(1, 2, 9, 9, 24, torch.float32, "cpu")  # D=24 fine for the reference
    assert torch.equal(kernels.attention(q, k, v), fa.attention_reference(q, k, v))
    assert torch.equal(kernels.attention(q, k, v, scale=0.5), fa.attention_reference(q, k, v, 0.5))
    w = torch.randn(64)
    assert torch.equal(kernels.rms_norm(x, w, 1e-5), rmsnorm.rms_norm_reference(x, w, 1e-5))
    assert spy == []


def test_reference_attends_low_precision_in_fp32_when_training_on_cpu():
    # With gradients flowing, CPU bf16 inputs are attended in fp32 even under autocast (which would
    # cast them back to bf16); the result and the gradients come back in bf16.
    q, k, v, do = rand_qkv(2, 3, 37, 37, 32, torch.bfloat16, "cpu")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", torch.bfloat16):
        o = fa.attention_reference(q, k, v)
    o.backward(do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    o32 = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32)
    o32.backward(do.float())
    for out, ref in ((o, o32), (q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))
    o_r, _, dq_r, dk_r, dv_r = attn_ref64(q, k, v, do)
    for out, ref in ((o, o_r), (q.grad, dq_r), (k.grad, dk_r), (v.grad, dv_r)):
        assert rel_err(out, ref) < TOL[torch.bfloat16]
    with torch.no_grad():  # inference keeps the native bf16 kernel
        assert torch.equal(fa.attention_reference(q, k, v),
                           torch.nn.functional.scaled_dot_product_attention(q, k, v))
    # fp64 is never attended at lower precision
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    assert torch.equal(fa.attention_reference(q64, k64, v64),
                       torch.nn.functional.scaled_dot_product_attention(q64, k64, v64))


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")
def test_dispatch_forced_triton_under_interpreter(spy):
    kernels.set_backend("triton", torch.device("cpu"))
    x = torch.randn(2, 64)
    kernels.attention(x[None, None], x[None, None], x[None, None])
    kernels.rms_norm(x, torch.ones(64))
    assert spy == ["attn", "rms"]


def test_dispatch_forced_triton_where_it_cannot_run(spy, monkeypatch):
    # Without CUDA or the interpreter the reference would run quietly: refuse instead.
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.set_backend("triton", torch.device("cpu"))
    assert kernels.BACKEND == "auto"
    kernels.set_backend("triton")  # no device given: checked at the call
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8))
    assert spy == []


def test_set_backend_rejects_unknown_modes():
    with pytest.raises(ValueError, match="auto, triton, torch"):
        kernels.set_backend("cuda")
    assert kernels.BACKEND == "auto"


@pytest.mark.gpu_check
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_dispatch_auto_runs_triton_on_cuda(spy):
    x = torch.randn(2, 64, device="cuda")
    kernels.attention(x[None, None], x[None, None], x[None, None])
    kernels.rms_norm(x, torch.ones(64, device="cuda"))
    assert spy == ["attn", "rms"]
