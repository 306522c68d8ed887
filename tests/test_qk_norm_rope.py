"""Correctness tests for kernels/qknorm_rope.py (QK-RMSNorm fused with RoPE).

As in test_kernels.py: on a CPU-only machine the Triton kernels run in the Triton interpreter
(conftest.py sets TRITON_INTERPRET=1), with a GPU they also run on CUDA. Outputs and gradients
are compared with a float64 PyTorch computation by relative error ‖out − ref‖ / ‖ref‖ (1e-4 for
fp32, 2e-2 for bf16/fp16), and every kernel-written buffer starts as NaN (``POISON``).
"""
from __future__ import annotations

import pytest
import torch

from kernel_cases import DEVICES, TOL, rel_err
from kernels import qknorm_rope, rmsnorm

pytestmark = pytest.mark.usefixtures("poison_and_seed")


def rope_tables(s, d, device, theta=10000.0):
    """cos, sin (S, D/2) of real RoPE angles: position p times frequency theta^(-2i/D)."""
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * freqs[None] * 7.0  # spread the angles
    return angles.cos().float().to(device), angles.sin().float().to(device)


def ref64(x, w, cos, sin, dy, eps=1e-6):
    """fp64 y = R(x̂ ∘ w) and its gradients for x and w."""
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * wd
    n0, n1 = n[..., 0::2], n[..., 1::2]
    c, s = cos.double(), sin.double()
    y = torch.stack([n0 * c - n1 * s, n0 * s + n1 * c], dim=-1).flatten(-2)
    y.backward(dy.double())
    return y.detach(), xd.grad, wd.grad


def check(x, w, cos, sin, eps=1e-6):
    dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    y, rstd = qknorm_rope.qk_norm_rope_forward(x, w, cos, sin, eps)
    dx, dw = qknorm_rope.qk_norm_rope_backward(dy, x, w, cos, sin, rstd)
    y_r, dx_r, dw_r = ref64(x, w, cos, sin, dy, eps)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dw.shape == w.shape and dw.dtype == w.dtype
    tol = TOL[x.dtype]
    errs = {"y": rel_err(y, y_r), "dx": rel_err(dx, dx_r), "dw": rel_err(dw, dw_r)}
    assert max(errs.values()) <= tol, errs


def rand_inputs(b, h, s, d, dtype, device, w_dtype=None):
    x = torch.randn(b, h, s, d, device=device).to(dtype)
    w = (1.0 + 0.5 * torch.randn(d, device=device)).to(w_dtype or dtype)
    return (x, w, *rope_tables(s, d, device))


# Odd lengths (every row block partial), all head dims, the three I/O dtypes.
CASES = [
    ((1, 2, 1, 64), torch.float32), ((2, 1, 7, 16), torch.bfloat16), ((1, 2, 33, 32), torch.float32),
    ((2, 2, 33, 128), torch.bfloat16), ((1, 1, 7, 128), torch.float16), ((2, 1, 33, 64), torch.float16),
    ((1, 2, 7, 16), torch.float32), ((1, 1, 33, 32), torch.bfloat16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}" for s, d in CASES])
def test_matches_fp64(device, shape, dtype):
    check(*rand_inputs(*shape, dtype, device))


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_qkv_view_and_fp32_weight(device, dtype):
    # The model's layout: q is a permuted view of a packed (B, S, 3·H·D) projection.
    b, s, h, d = 2, 9, 3, 32
    qkv = torch.randn(b, s, 3 * h * d, device=device).to(dtype)
    x = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4)[0]
    assert not x.is_contiguous() and x.stride() == (s * 3 * h * d, d, 3 * h * d, 1)
    _, w, cos, sin = rand_inputs(b, h, s, d, dtype, device, w_dtype=torch.float32)
    check(x, w, cos, sin, eps=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [16, 128])
def test_partial_dw_loop(device, d):
    # More row blocks than partial-dw programs (each program loops), and a partial last block.
    _, block_rows, _ = rmsnorm._launch_params(d)
    n_prog, _ = rmsnorm._bwd_grid(d, 10 ** 9, 4 + 4 + 4, torch.device(device))  # fp32 x, dy; cos, sin
    rows = (2 * n_prog + 1) * block_rows - 3
    s = rows // 3 if device == "cpu" else rows  # B·H·S = rows with (B, H) = (1, 3) on CPU
    x, w, cos, sin = rand_inputs(1, rows // s, s, d, torch.float32, device)
    assert x.numel() // d == rows and rows % block_rows != 0
    check(x, w, cos, sin)


@pytest.mark.gpu_check
@pytest.mark.parametrize("device", DEVICES)
def test_autograd_and_expanded_grad(device):
    x, w, cos, sin = rand_inputs(2, 2, 11, 64, torch.float32, device)
    x.requires_grad_(), w.requires_grad_()
    y = qknorm_rope.qk_norm_rope(x, w, cos, sin)
    dy = torch.randn(1, 1, 11, 64, device=device)
    y.backward(dy.expand_as(y))  # stride-0 batch/head dims in the upstream grad
    _, dx_r, dw_r = ref64(x, w, cos, sin, dy.expand_as(y))
    assert rel_err(x.grad, dx_r) <= 1e-4 and rel_err(w.grad, dw_r) <= 1e-4
    assert cos.grad is None and sin.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_fp32(device):
    x, w, cos, sin = rand_inputs(2, 3, 17, 64, torch.float32, device)
    y = qknorm_rope.qk_norm_rope(x, w, cos, sin)
    assert rel_err(y, qknorm_rope.qk_norm_rope_reference(x, w, cos, sin)) <= 1e-5


def test_reference_is_model_composition():
    # qk_norm_rope_reference must equal what mofo.py computes: rms_norm in fp32, apply_rope, cast.
    x, w, cos, sin = rand_inputs(2, 3, 17, 64, torch.bfloat16, "cpu", w_dtype=torch.float32)
    n = torch.nn.functional.rms_norm(x.float(), (64,), w, 1e-6)
    x0, x1 = n.unflatten(-1, (-1, 2)).unbind(-1)
    model = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)
    assert torch.equal(qknorm_rope.qk_norm_rope_reference(x, w, cos, sin), model)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(device):
    """Schema, fake twins and kernels agree, as torch.compile assumes (strided bf16 x, fp32 w)."""
    qkv = torch.randn(2, 5, 3 * 2 * 32, device=device).to(torch.bfloat16)
    x = qkv.unflatten(-1, (3, 2, 32)).permute(2, 0, 3, 1, 4)[1]
    _, w, cos, sin = rand_inputs(2, 2, 5, 32, torch.bfloat16, device, w_dtype=torch.float32)
    _, rstd = qknorm_rope.qk_norm_rope_forward(x, w, cos, sin, 1e-6)
    torch.library.opcheck(qknorm_rope._fwd_op, (x, w, cos, sin, 1e-6))
    torch.library.opcheck(qknorm_rope._bwd_op, (torch.randn(x.shape, device=device).to(x.dtype), x, w, cos, sin, rstd))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_graph_matches_eager(device):
    """fullgraph=True fails on any graph break, e.g. Dynamo tracing into a Triton launch."""
    import torch._dynamo
    x, w, cos, sin = rand_inputs(1, 2, 9, 32, torch.float32, device)
    dy = torch.randn_like(x)

    def f(x, w):
        return qknorm_rope.qk_norm_rope(x, w, cos, sin) * 2.0

    torch._dynamo.reset()
    inputs = [t.clone().requires_grad_() for t in (x, w)]
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(*inputs)
    grads = torch.autograd.grad(out, inputs, dy)
    ref_inputs = [t.clone().requires_grad_() for t in (x, w)]
    ref = f(*ref_inputs)
    assert torch.equal(out, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, ref_inputs, dy)):
        assert torch.equal(g, r)


@pytest.mark.parametrize("args", [
    (torch.randn(2, 8, 64), torch.ones(64), torch.ones(8, 32), torch.ones(8, 32)),     # rank 3
    (torch.randn(1, 1, 8, 48), torch.ones(48), torch.ones(8, 24), torch.ones(8, 24)),  # D = 48
    (torch.randn(1, 1, 8, 64), torch.ones(32), torch.ones(8, 32), torch.ones(8, 32)),  # weight width
    (torch.randn(1, 1, 8, 64), torch.ones(64), torch.ones(8, 64), torch.ones(8, 32)),  # cos width
    (torch.randn(1, 1, 8, 64), torch.ones(64), torch.ones(8, 32), torch.ones(9, 32)),  # sin length
    (torch.randn(1, 1, 8, 64), torch.ones(64), torch.ones(8, 32).double(), torch.ones(8, 32)),
    (torch.randn(1, 1, 8, 64).double(), torch.ones(64), torch.ones(8, 32), torch.ones(8, 32)),
    (torch.randn(1, 1, 8, 64), torch.ones(64, dtype=torch.int32), torch.ones(8, 32), torch.ones(8, 32)),
    (torch.randn(1, 1, 8, 64), None, torch.ones(8, 32), torch.ones(8, 32)),
], ids=["rank3", "D48", "weight", "cos-width", "sin-len", "cos-fp64", "x-fp64", "weight-int", "no-weight"])
def test_bad_inputs_raise(args):
    with pytest.raises(ValueError):
        qknorm_rope.qk_norm_rope(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch_raises():
    x, w, cos, sin = rand_inputs(1, 1, 8, 64, torch.float32, "cuda")
    with pytest.raises(ValueError):
        qknorm_rope.qk_norm_rope(x, w, cos.cpu(), sin)
