"""Compile every Triton kernel for a GPU architecture on a machine *without* a GPU.

The interpreter tests check the kernels' arithmetic, but not that they compile: a construct the
interpreter accepts can still fail in the compiler, or compile into slow code. Triton ships its
own LLVM, ptxas and cuobjdump, so the whole pipeline down to a cubin runs on a CPU. For each
kernel and launch configuration this reports what costs no GPU time to read: registers per
thread, spilled bytes (local memory), shared memory, whether the attention matmuls use Hopper's
warpgroup tensor-core instructions (HGMMA in the SASS) or the older HMMA path, whether global
loads are pipelined through shared memory (cp.async), go through the Tensor Memory Accelerator
(TMA: cp.async.bulk.tensor) and are vectorised (128-bit: ld.global.v4 or 16-byte cp.async).

The arguments are specialised exactly as Triton's launcher does on a GPU, from representative
values: 16-byte aligned pointers and integers divisible by 16 carry a divisibility hint, and an
integer equal to 1 (the unit stride of the last dim) becomes a compile-time constant. Without
that the compiler cannot prove contiguity and emits scalar, unpipelined loads: a different
kernel from the one the GPU runs.

    python tools/aot.py                  # sm_90 (H100/H200), one config per kernel
    python tools/aot.py --all --arch 90  # every autotune config that survives pruning, and RMSNorm
                                         # rows of 64 to 16384

Must run without TRITON_INTERPRET=1 (under the interpreter the kernels are not compiled).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
import kernels.flash_attention as fa  # noqa: E402
from kernels import INTERPRET, qknorm_rope, rmsnorm  # noqa: E402

# Pointer arguments by name: fp32 buffers (statistics, partial sums, RoPE tables); every other
# pointer bf16.
FP32_POINTERS = {"LSE", "DELTA", "RSTD", "DW_PARTIAL", "COS", "SIN"}
POINTERS = FP32_POINTERS | {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ", "X", "W", "Y", "DY", "DX"}
FLOATS = {"qk_scale", "sm_scale", "eps"}
# Bytes a backward kernel loads per element of a row (bf16 x and dy; QK-norm adds fp32 cos, sin
# of D/2 each), which sets its prefetch depth; any device gives the same depth, cpu avoids CUDA.
RMS_BWD_BYTES, QK_BWD_BYTES, HOST = 2 + 2, 2 + 2 + 4, torch.device("cpu")
# Representative launch: contiguous (B, H, S, D) attention and QK-norm tensors with a ragged S
# (no divisibility hint on the length), and (M, N) RMSNorm rows.
ATTN_DIMS = {"B": 2, "H": 2, "S": 589, "M": 2 * 2 * 589}  # M: the B·H·S rows QK-norm sees
RMS_ROWS = 1000


def jit_fn(obj) -> triton.runtime.jit.JITFunction:
    """The JITFunction under an autotuner / heuristics wrapper."""
    while not isinstance(obj, triton.runtime.jit.JITFunction):
        obj = obj.fn
    return obj


def example_value(name: str, dims: dict):
    """The value the wrappers would pass for argument ``name`` (a tiny stand-in for pointers)."""
    if name in POINTERS:  # only dtype and alignment matter; torch allocations are 64-byte aligned
        return torch.empty(8, dtype=torch.float32 if name in FP32_POINTERS else torch.bfloat16)
    if name.startswith("stride"):
        n, s = dims.get("D", dims.get("N")), dims.get("S", 1)
        return {"d": 1, "s": n, "h": s * n, "b": dims.get("H", 1) * s * n, "m": n}[name[-1]]
    return {"H": dims.get("H"), "S": dims.get("S"), "S_Q": dims.get("S"), "S_K": dims.get("S"),
            "M": dims.get("M"), "N": dims.get("N")}[name]


def specialize(fn, constexprs: dict, dims: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, as the JIT launcher derives them."""
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], consts[(i,)] = "constexpr", constexprs[name]
        elif name in FLOATS:
            sig[name] = "fp32"  # floats are never specialised
        else:
            ty, spec = native_specialize_impl(CUDABackend, example_value(name, dims), False, True, True)
            sig[name] = ty
            if ty == "constexpr":
                consts[(i,)] = spec
            elif spec:
                attrs[(i,)] = CUDABackend.parse_attr(spec)
    return sig, consts, attrs


def resources(cubin: bytes) -> dict[str, int | bool]:
    """Registers and local (spill) bytes from cuobjdump, and HGMMA/HMMA in the SASS."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "--dump-sass", fh.name], capture_output=True, text=True).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    return {"regs": field("REG"), "local": field("LOCAL"), "hgmma": "HGMMA" in sass, "hmma": "HMMA" in sass}


def load_facts(ptx: str) -> dict[str, bool]:
    """From the PTX: loads pipelined through shared memory (cp.async), TMA tensor copies
    (cp.async.bulk.tensor) and 128-bit global loads (ld.global.v4, or cp.async of 16 bytes)."""
    v4 = re.search(r"ld\.global[\w.]*\.v4|cp\.async\.c[ag]\.shared\.global[^;]*, (?:16|0x10)\b", ptx)
    return {"cp_async": re.search(r"cp\.async\.c[ag]\.", ptx) is not None,
            "tma": "cp.async.bulk.tensor" in ptx, "v4": v4 is not None}


def compile_one(obj, constexprs: dict, dims: dict, arch: int, num_warps: int, num_stages: int) -> dict:
    fn = jit_fn(obj)
    sig, consts, attrs = specialize(fn, constexprs, dims)
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    t0 = time.time()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return {"kernel": fn.__name__, **constexprs, "warps": num_warps, "stages": num_stages,
            "compile_s": round(time.time() - t0, 1), "shared": kernel.metadata.shared,  # dynamic smem bytes
            **resources(kernel.asm["cubin"]), **load_facts(kernel.asm["ptx"])}


def cases(all_configs: bool, head_dims=(64, 128)):
    """(kernel object, constexprs, dims, num_warps, num_stages) as the wrappers launch them on a GPU.

    RMSNorm: two row widths, or with ``all_configs`` one per tiling class of ``_launch_params``.
    """
    rms_widths = (64, 128, 512, 1024, 2048, 4096, 8192, 16384) if all_configs else (128, 2048)
    common = {"UPCAST": False, "PREC": "tf32"}  # bf16 operands, as _dot_flags gives on a GPU
    ragged = {"EVEN_K": False, "EVEN_Q": False}  # the heuristics' flags for the S of ATTN_DIMS
    for d in head_dims:
        dims = {**ATTN_DIMS, "D": d}
        for tuner, flags in ((fa._attn_fwd, {"EVEN_K": False}),
                             (fa._attn_bwd_dkdv, {"PASS": 0, **ragged}),
                             (fa._attn_bwd_dq, {"PASS": 1, **ragged})):
            configs = tuner.early_config_prune(tuner.configs, {"HEAD_DIM": d}) if tuner.early_config_prune \
                else tuner.configs
            for cfg in configs if all_configs else configs[:1]:
                const = {"HEAD_DIM": d, **cfg.kwargs, **flags, **common}
                yield tuner, const, dims, cfg.num_warps, cfg.num_stages
        yield fa._attn_bwd_preprocess_kernel, {"HEAD_DIM": d, "BLOCK_M": 64}, dims, 4, 3
        _, rows, warps = rmsnorm._launch_params(d)
        _, stages = rmsnorm._bwd_grid(d, dims["M"], QK_BWD_BYTES, HOST)
        yield qknorm_rope._qk_norm_rope_fwd_kernel, {"D": d, "BLOCK_ROWS": rows}, dims, warps, 3
        yield (qknorm_rope._qk_norm_rope_bwd_kernel, {"D": d, "BLOCK_ROWS": rows, "NUM_STAGES": stages},
               dims, warps, 3)
    for n in rms_widths:
        block_n, rows, warps = rmsnorm._launch_params(n)
        _, stages = rmsnorm._bwd_grid(n, RMS_ROWS, RMS_BWD_BYTES, HOST)
        dims = {"M": RMS_ROWS, "N": n}
        yield rmsnorm._rms_norm_fwd_kernel, {"BLOCK_ROWS": rows, "BLOCK_N": block_n}, dims, warps, 3
        yield (rmsnorm._rms_norm_bwd_kernel, {"BLOCK_ROWS": rows, "BLOCK_N": block_n, "NUM_STAGES": stages},
               dims, warps, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compile the Triton kernels for a GPU target without a GPU.")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200, 80 = A100)")
    p.add_argument("--all", action="store_true",
                   help="every autotune config, not just the first, and every RMSNorm row-width class")
    args = p.parse_args(argv)
    if INTERPRET:
        print("aot.py: unset TRITON_INTERPRET (the interpreter does not compile kernels)", file=sys.stderr)
        return 2
    print(f"{'kernel':<30} {'config':<70} {'regs':>4} {'spill':>5} {'smem':>6} {'mma':>5} "
          f"{'async':>5} {'tma':>3} {'v4':>3} {'s':>5}")
    yes = {True: "yes", False: "no"}
    for obj, const, dims, warps, stages in cases(args.all):
        r = compile_one(obj, const, dims, args.arch, warps, stages)
        shown = ",".join(f"{k}={v}" for k, v in const.items() if k not in ("UPCAST", "PREC"))
        mma = "HGMMA" if r["hgmma"] else "HMMA" if r["hmma"] else "-"
        print(f"{r['kernel']:<30} {shown + f',w{warps},s{stages}':<70} {r['regs']:>4} {r['local']:>5} "
              f"{r['shared']:>6} {mma:>5} {yes[r['cp_async']]:>5} {yes[r['tma']]:>3} {yes[r['v4']]:>3} "
              f"{r['compile_s']:>5}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
