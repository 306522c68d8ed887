"""Triton kernels for mofo, each beside its PyTorch reference, behind one backend switch.

Public API (both differentiable)::

    attention(q, k, v, *, scale=None)   # (B, H, S, D) -> (B, H, S, D), non-causal
    rms_norm(x, weight, eps=1e-6)       # (..., N), weight (N,) -> (..., N)
    set_backend(mode, device=None)      # "auto" | "triton" | "torch"

``BACKEND`` decides which implementation runs:

* ``"auto"``: the Triton kernels for CUDA tensors, the PyTorch reference elsewhere;
* ``"triton"``: always the Triton kernels; CPU tensors need TRITON_INTERPRET=1 (Triton's CPU
  interpreter, set before anything imports this package);
* ``"torch"``: always the PyTorch reference, so the two paths can be compared end to end.

A forced ``"triton"`` never falls back silently: where the kernels cannot run it raises.

The kernel modules (``kernels.flash_attention``, ``kernels.rmsnorm``) hold the math, the kernels,
the autograd wrappers and the references; call their functions directly to pick a path
regardless of the switch. Under ``torch.compile`` the kernels appear as opaque custom ops
(``torch.ops.mofo.*``, forward and backward), so the compiler neither traces into Triton
launches nor breaks the graph.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import flash_attention, qknorm_rope, rmsnorm
from ._common import INTERPRET
from .flash_attention import SUPPORTED_HEAD_DIMS, attention_reference
from .rmsnorm import rms_norm_reference

__all__ = ["BACKEND", "set_backend", "attention", "rms_norm", "qk_norm_rope", "attention_reference",
           "rms_norm_reference", "SUPPORTED_HEAD_DIMS", "INTERPRET"]

BACKENDS = ("auto", "triton", "torch")
BACKEND = "auto"
NO_TRITON_HERE = "the Triton kernels need a CUDA device or TRITON_INTERPRET=1 (Triton's CPU interpreter)"


def set_backend(mode: str, device: Optional[torch.device] = None) -> None:
    """Pick the implementation behind ``attention`` and ``rms_norm`` (see the module docstring).

    With ``device``, refuse "triton" where the kernels could not run, before any work is done.
    """
    global BACKEND
    if mode not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {mode!r}")
    if mode == "triton" and device is not None and not _triton_runs_on(torch.device(device)):
        raise ValueError(NO_TRITON_HERE)
    BACKEND = mode


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or INTERPRET


def _use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs the Triton kernel under the current ``BACKEND``."""
    if BACKEND == "triton" and not _triton_runs_on(x.device):
        # Running the reference instead would make a comparison of the two paths compare the
        # reference with itself.
        raise RuntimeError(NO_TRITON_HERE)
    return BACKEND == "triton" or (BACKEND == "auto" and x.is_cuda)


# One function per op: pick the module's Triton function or its reference by ``_use_triton``.
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              scale: Optional[float] = None) -> torch.Tensor:
    """Non-causal softmax attention: q (B, H, S_q, D), k and v (B, H, S_k, D), one dtype (bf16, fp16 or
    fp32) -> (B, H, S_q, D). scale defaults to 1/sqrt(D); the Triton path needs D in SUPPORTED_HEAD_DIMS."""
    return (flash_attention.flash_attention if _use_triton(q) else attention_reference)(q, k, v, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim, ``x * rsqrt(mean(x²) + eps) * weight`` in fp32 math: x (..., N) bf16, fp16 or
    fp32, weight (N,) any of those -> x's dtype."""
    return (rmsnorm.triton_rms_norm if _use_triton(x) else rms_norm_reference)(x, weight, eps)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 eps: float = 1e-6) -> torch.Tensor:
    """QK-norm then RoPE in one pass: RMSNorm over D in fp32, then pair (x_2i, x_2i+1) rotated by
    angle i. x: (B, H, S, D) any strides; weight (D,); cos, sin (S, D/2) fp32 -> x's dtype."""
    return (qknorm_rope.qk_norm_rope if _use_triton(x) else qknorm_rope.qk_norm_rope_reference)(
        x, weight, cos, sin, eps)
