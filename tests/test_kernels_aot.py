"""The kernels compile for Hopper (sm_90) on a CPU-only machine: Triton's own LLVM + ptxas.

The interpreter tests cover the arithmetic; this covers what the interpreter never sees: that
the compiler accepts every kernel, that the attention matmuls lower to Hopper's warpgroup
tensor-core instructions (HGMMA), not the older HMMA path, and that, with the arguments
specialised as on a GPU, the loads are vectorised, nothing spills, and the attention tiles and
the norm backward's next rows are pipelined.
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
    names = [r[0] for r in rows]
    for name in ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_qk_norm_rope_fwd_kernel",
                 "_qk_norm_rope_bwd_kernel", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"):
        assert names.count(name) == 2, (name, proc.stdout)  # two head dims / two row widths
    bwd = [r[1] for r in rows if r[0] == "_attn_bwd_kernel"]  # two passes × two head dims
    assert sum("PASS=0" in c for c in bwd) == sum("PASS=1" in c for c in bwd) == 2, proc.stdout
    matmul = {"_attn_fwd_kernel", "_attn_bwd_kernel"}
    for r in rows:
        regs, spills, mma, pipelined, vectorised = int(r[2]), int(r[3]), r[5], r[6], r[8]
        assert 0 < regs <= 255 and spills == 0, r
        # 128-bit loads everywhere: the unit last-dim stride reached the compiler as a constant.
        assert vectorised == "yes", r
        if r[0] in matmul:
            assert mma == "HGMMA", r
        if r[0] in matmul | {"_rms_norm_bwd_kernel", "_qk_norm_rope_bwd_kernel"}:
            # Attention: K/V (or Q/dO) tiles stream through shared memory with cp.async
            # (num_stages > 1). Norm backward: the next row blocks are prefetched the same way.
            assert pipelined == "yes", r


def test_refuses_to_run_under_the_interpreter():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "aot.py")], cwd=ROOT,
                          env={**ENV, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr
