"""Triton kernels for mofo: flash attention and RMSNorm.

Public API (both differentiable)::

    attention(q, k, v, *, scale=None)   # (B, H, S, D) -> (B, H, S, D), non-causal
    rms_norm(x, weight, eps=1e-6)       # (..., N), weight (N,) -> (..., N)

Dispatch: the Triton kernel runs when the input is a CUDA tensor, or when TRITON_INTERPRET=1
(CPU tensors through the Triton interpreter, slow: ~1 ms per program instance); otherwise the
PyTorch reference (``kernels.attention.attention_reference``,
``kernels.rmsnorm.rms_norm_reference``) runs. Import the reference functions directly to force
the PyTorch path.

Under ``torch.compile`` both kernels appear as opaque custom ops (``torch.ops.mofo.*``, forward
and backward), so the compiler neither traces into Triton launches nor breaks the graph.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .attention import attention_reference, flash_attention
from .rmsnorm import rms_norm_reference, triton_rms_norm

__all__ = ["attention", "rms_norm"]


def _use_triton(t: torch.Tensor) -> bool:
    """True if ``t`` should go through the Triton kernels (CUDA, or CPU under the interpreter)."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              scale: Optional[float] = None) -> torch.Tensor:
    """Non-causal softmax attention.

    Args:
        q: (B, H, S_q, D); k, v: (B, H, S_k, D); same dtype (bf16, fp16 or fp32). For the Triton
           path D must be 16, 32, 64 or 128 (ValueError otherwise).
        scale: softmax scale, default 1/sqrt(D).
    Returns:
        (B, H, S_q, D) in the input dtype.
    """
    if _use_triton(q):
        return flash_attention(q, k, v, scale)
    return attention_reference(q, k, v, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: ``x * rsqrt(mean(x²) + eps) * weight``, fp32 math.

    Args:
        x: (..., N), bf16/fp16/fp32. weight: (N,), any of those dtypes.
    Returns:
        (..., N) in the dtype of x.
    """
    if _use_triton(x):
        return triton_rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
