"""The kernels compile for Hopper (sm_90) on a CPU-only machine: Triton's own LLVM + ptxas.

The interpreter tests cover the arithmetic; this covers what the interpreter never sees: that
the compiler accepts every kernel, that the attention matmuls lower to Hopper's warpgroup
tensor-core instructions (HGMMA), not the older HMMA path, and that, with the arguments
specialised as on a GPU, the loads are vectorised and the attention tiles pipelined.
"""
import os
import subprocess
import sys

from helpers import ENV, ROOT


def test_every_kernel_compiles_for_sm90():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "aot.py"), "--arch", "90"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    kernels = [r[0] for r in rows]
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                 "_attn_bwd_preprocess_kernel", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"):
        assert kernels.count(name) == 2, (name, proc.stdout)  # two head dims / two row widths
    for r in rows:
        regs, mma, pipelined, vectorised = int(r[2]), r[5], r[6], r[7]
        assert 0 < regs <= 255
        # 128-bit loads everywhere: the unit last-dim stride reached the compiler as a constant.
        assert vectorised == "yes", r
        if r[0] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
            # K/V (or Q/dO) tiles stream through shared memory with cp.async (num_stages > 1).
            assert mma == "HGMMA" and pipelined == "yes", r


def test_refuses_to_run_under_the_interpreter():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "aot.py")], cwd=ROOT,
                          env={**ENV, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr
