"""Small helpers shared by the kernel files."""
import torch
import triton

# Triton decides between its CPU interpreter and the compiler when a kernel is decorated, i.e.
# when the kernel's module is imported, from TRITON_INTERPRET. Read once, at the same moment, this
# is the one answer to "are the kernels interpreted?" (setting the variable later changes nothing).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

# Test hook: when True every buffer the kernels are meant to fill is pre-filled with NaN, so a
# test fails if any element is left unwritten.
POISON = False


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel: uninitialised, or NaN-poisoned under the test hook."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def eager_or_op(eager, op):
    """``op`` (a ``torch.library`` custom op) while torch.compile traces, ``eager`` otherwise.

    Dynamo cannot trace into Triton launches made by the interpreter, and tracing the autotuner and
    heuristics stack on CUDA is fragile; an opaque custom op with a fake (shape-only) twin is what
    the compiler handles reliably. Eager calls skip the op layer because its per-call dispatch
    overhead is several times an autograd.Function's, comparable to a small RMSNorm on a GPU.
    """
    return op if torch.compiler.is_compiling() else eager


def kernel_op(name: str, schema: str, impl, fake):
    """Register ``impl`` as the custom op ``torch.ops.mofo.<name>`` with a shape-only ``fake``.

    The op allocates its outputs (``mutates_args=()``), which is what lets the compiler treat
    it as a pure function of its inputs.
    """
    op = torch.library.custom_op(f"mofo::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op
