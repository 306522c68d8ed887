"""
What every script shares: the user-error convention, atomic writes, image <-> tensor conversion
and the choice of device.

A mistake in the user's input (a missing file, a bad flag value, an output folder that is not
empty) raises UserError; `cli` turns it into one line on stderr and exit code 2. Outputs are
written beside their final name and renamed into place, so a reader never sees half a file and a
failed run leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class UserError(Exception):
    """A mistake in the user's input; CLIs print it as one line and exit 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every default shown and the example epilog kept as written."""


def cli(main, prog: str) -> None:
    """Run main() as a command: a UserError becomes 'prog: error: ...' on stderr and exit 2."""
    try:
        code = main()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


# -----------------------------------------------------------------------------
# Atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path) on a temp file beside `path`, then rename it over `path`.

    The file gets the usual permissions (0666 minus the umask), not mkstemp's private 0600, so
    other users can read checkpoints and pictures."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after the write: a writer may replace the file (safetensors does)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str, blob: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_out_dir(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"output folder {out} exists and is not empty; choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to --out {out}: {parent} is not a writable folder")


@contextmanager
def staged_dir(out: str):
    """Yield a temp folder beside `out`; on success it becomes `out` (which must be absent or empty), on any
    failure it is removed. The user never sees a half-written output folder."""
    check_out_dir(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if os.path.isdir(out):
            os.rmdir(out)  # an empty folder the user made for us
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -----------------------------------------------------------------------------
# Pictures


def save_png(path: str, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    if not (arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3))
            or arr.dtype == np.uint16 and arr.ndim == 2):
        raise ValueError(f"save_png wants uint8 (H,W,3)/(H,W) or uint16 (H,W), got {arr.dtype} {arr.shape}")
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


# A magma-like perceptual colormap from our own control points (position, sRGB 0..255):
# near-black violet -> purple -> red-pink -> orange -> pale yellow. Luminance rises monotonically.
_COLORMAP_POINTS = [
    (0.00, (2, 1, 6)), (0.12, (26, 14, 64)), (0.25, (76, 20, 118)), (0.38, (126, 38, 128)),
    (0.50, (178, 54, 122)), (0.62, (226, 82, 98)), (0.75, (249, 136, 96)), (0.88, (253, 196, 138)),
    (1.00, (252, 250, 188)),
]


def _build_lut() -> np.ndarray:
    pos = np.array([p for p, _ in _COLORMAP_POINTS])
    rgb = np.array([c for _, c in _COLORMAP_POINTS], dtype=np.float64)
    x = np.linspace(0.0, 1.0, 256)
    return np.stack([np.rint(np.interp(x, pos, rgb[:, c])) for c in range(3)], axis=1).astype(np.uint8)


COLORMAP_LUT = _build_lut()  # (256, 3) uint8


def _usable(depth: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Depth as float64 and its pixels worth drawing: d > 0, finite, and `valid` if given."""
    d = np.asarray(depth, dtype=np.float64)
    ok = np.isfinite(d) & (d > 0)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    return d, ok


def disparity_range(depth: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float] | None:
    """5th and 95th percentiles of disparity 1/d over valid pixels (None if there are none)."""
    d, ok = _usable(depth, valid)
    if not ok.any():
        return None
    lo, hi = np.percentile(1.0 / d[ok], [5.0, 95.0])
    return float(lo), float(hi)


def colorize_depth(depth: np.ndarray, valid: np.ndarray | None = None,
                   disp_range: tuple[float, float] | None = None, unknown=(0, 0, 0)) -> np.ndarray:
    """Depth (H, W) -> uint8 (H, W, 3) picture: near is bright, far is dark, invalid is `unknown`.

    Disparity 1/d on valid pixels (d > 0, finite, and `valid` if given) is normalised between its
    5th and 95th percentiles so a few outliers don't wash out the picture; pass `disp_range`
    (e.g. disparity_range of a ground truth) to draw several maps on one colour scale."""
    d, ok = _usable(depth, valid)
    out = np.empty(d.shape + (3,), dtype=np.uint8)
    out[:] = unknown
    if not ok.any():
        return out
    disp = 1.0 / d[ok]
    lo, hi = disp_range or np.percentile(disp, [5.0, 95.0])
    x = np.clip((disp - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    out[ok] = COLORMAP_LUT[np.rint(x * 255).astype(np.int64)]
    return out


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """Model images (..., 3, H, W) in [-1, 1] -> uint8 arrays (..., H, W, 3)."""
    return ((rgb.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    """uint8 arrays (..., H, W, 3) -> float32 model images (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).movedim(-1, -3).float().div(127.5).sub(1.0).contiguous()


# -----------------------------------------------------------------------------
# Device


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this PyTorch build or machine has no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def use_kernels(choice: str, device: torch.device) -> None:
    """--kernels for a command: kernels.set_backend, with a refusal as a UserError."""
    import kernels  # here, so that the commands without a model do not import Triton

    try:
        kernels.set_backend(choice, device)
    except ValueError as e:
        raise UserError(f"--kernels {choice}: {e}") from None


def wants_bf16(choice: str, device: torch.device) -> bool:
    """--dtype: "auto" is bf16 on CUDA and fp32 elsewhere."""
    return choice == "bf16" or (choice == "auto" and device.type == "cuda")


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 is a speed-up on CUDA and on CPUs that multiply bf16 in hardware (AVX512-BF16 or AMX).
    Elsewhere PyTorch emulates bf16 matrix products, several times slower than fp32 (results/demo.md)."""
    if device.type == "cuda":
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the getattr
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def note_slow_bf16(choice: str, device: torch.device, prog: str) -> None:
    """One line on stderr when --dtype asks for bf16 on a CPU that would emulate it."""
    if wants_bf16(choice, device) and not bf16_is_fast(device):
        print(f"{prog}: note: this CPU has no native bf16 (AVX512-BF16 or AMX), so --dtype bf16 runs several "
              "times slower than fp32 here, which --dtype auto picks", file=sys.stderr)
