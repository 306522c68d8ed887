"""Small helpers shared by the kernel files."""
import os

import torch

# Test hook: when True every buffer the kernels are meant to fill is pre-filled with NaN, so a
# test fails if any element is left unwritten.
POISON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel: uninitialised, or NaN-poisoned under the test hook."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
