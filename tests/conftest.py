"""Test setup shared by every test file.

Without a GPU the Triton kernels are exercised through the Triton interpreter. Triton decides
between interpreter and compiler when a kernel is *decorated*, so the variable must be set before
anything imports `kernels` -- a conftest runs before test modules are collected.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def poison_and_seed(monkeypatch):
    """For the kernel tests: every buffer a kernel is meant to fill starts as NaN (the
    ``kernels._common.POISON`` hook), so an element it leaves unwritten shows up; fixed seed."""
    from kernels import _common
    monkeypatch.setattr(_common, "POISON", True)
    torch.manual_seed(0)
