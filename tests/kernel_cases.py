"""What the kernel test files share: the devices they run on, the tolerances, the error measure.

Every kernel test module also applies conftest.py's ``poison_and_seed`` fixture (NaN-filled
output buffers, fixed seed) with ``pytestmark = pytest.mark.usefixtures("poison_and_seed")``.
"""
import pytest
import torch

from kernels import INTERPRET

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
]
# Relative error allowed against a float64 reference, by I/O dtype.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error; plain L2 error when the reference is exactly zero."""
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite values (unwritten NaN-poisoned element?)"
    denom = ref.norm().item()
    err = (out - ref).norm().item()
    return err / denom if denom > 0 else err
