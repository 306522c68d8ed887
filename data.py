"""
Data for mofo: the built-in procedural RGB-D scenes, sparse-depth masks, the caption tokenizer,
image / depth I/O, the Marigold-layout evaluation sets and loaders for your own data.

Conventions used everywhere in this file:
- depth is z-depth in metres (distance along the optical axis), float32, 0 where invalid;
- `valid` says which depth pixels carry ground truth (bool, same H x W as the depth);
- arrays are uint8 (H, W, 3) RGB; samples handed to the model hold float32 (3, H, W) in [-1, 1];
- every failure caused by a user's file or path raises UserError with a one-line message.

Procedural scene i is a pure function of i: its parameters come from a PCG64 stream seeded with i
and the renderer uses only correctly rounded float64 arithmetic (+ - * / sqrt floor) per pixel,
so the same (i, res) gives the same arrays in any process and with any thread count.
"""
from __future__ import annotations

import glob
import io
import json
import math
import os
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers


class UserError(Exception):
    """A mistake in the user's input (bad file, wrong format, missing path). CLIs print it, exit 2."""


# -----------------------------------------------------------------------------
# Image I/O helpers


def _open_image(src, name: str) -> Image.Image:
    """Open and decode an image from a path or file object; `name` is used in error messages."""
    if isinstance(src, str) and not os.path.isfile(src):
        raise UserError(f"{name}: file not found (expected an image)")
    try:
        img = Image.open(src)
        img.load()
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise UserError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return img


def load_image(path: str) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB (palette, gray and alpha images are converted)."""
    return np.asarray(_open_image(path, path).convert("RGB")).copy()


def _resize(arr: np.ndarray, h: int, w: int, nearest: bool) -> np.ndarray:
    """Resize (H, W), (H, W, C) arrays of uint8 / bool / float to (h, w[, C]) with Pillow.

    uint8 images use Pillow's antialiased bilinear filter (area-like when shrinking); everything
    else goes channel by channel through 32-bit float ("F") images; bool masks use nearest.
    """
    if arr.shape[:2] == (h, w):
        return arr
    resample = Image.Resampling.NEAREST if nearest or arr.dtype == bool else Image.Resampling.BILINEAR
    if arr.dtype == np.uint8 and (arr.ndim == 2 or arr.shape[2] == 3):
        return np.asarray(Image.fromarray(arr).resize((w, h), resample)).copy()
    planes = arr[..., None] if arr.ndim == 2 else arr
    out = np.stack([np.asarray(Image.fromarray(planes[..., c].astype(np.float32)).resize((w, h), resample))
                    for c in range(planes.shape[2])], axis=-1)
    out = out[..., 0] if arr.ndim == 2 else out
    if arr.dtype == bool:
        return out > 0.5
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(arr.dtype)
    return out.astype(arr.dtype)


RESIZE_MODES = ("letterbox", "crop", "stretch")


def resize_image(img: np.ndarray, res: int, mode: str, nearest: bool = False
                 ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Fit an (H, W[, C]) array into a (res, res[, C]) square.

    mode "letterbox" keeps the aspect ratio and pads with zeros, "crop" scales the shorter side to
    res and centre-crops, "stretch" ignores the aspect ratio. Use nearest=True for depth and masks
    (interpolating depth across an edge invents points floating between the surfaces).
    Returns the array and the box (top, left, h, w) that the image content occupies in it.
    """
    H, W = img.shape[:2]
    if mode == "stretch":
        return _resize(img, res, res, nearest), (0, 0, res, res)
    if mode == "letterbox":
        s = res / max(H, W)
        h, w = max(1, min(res, round(H * s))), max(1, min(res, round(W * s)))
        top, left = (res - h) // 2, (res - w) // 2
        out = np.zeros((res, res) + img.shape[2:], dtype=img.dtype)
        out[top:top + h, left:left + w] = _resize(img, h, w, nearest)
        return out, (top, left, h, w)
    if mode == "crop":
        s = res / min(H, W)
        h, w = max(res, round(H * s)), max(res, round(W * s))
        top, left = (h - res) // 2, (w - res) // 2
        return _resize(img, h, w, nearest)[top:top + res, left:left + res], (0, 0, res, res)
    raise UserError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")


def undo_letterbox(arr: np.ndarray, box: tuple[int, int, int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Crop the content box out of a (res, res) map and resize it bilinearly to out_hw -> float32 (H, W)."""
    top, left, h, w = box
    crop = np.asarray(arr, dtype=np.float32)[top:top + h, left:left + w]
    return _resize(crop, out_hw[0], out_hw[1], nearest=False)


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


def disparity_range(depth: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float] | None:
    """5th and 95th percentiles of disparity 1/d over valid pixels (None if there are none)."""
    d = np.asarray(depth, dtype=np.float64)
    ok = np.isfinite(d) & (d > 0)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    if not ok.any():
        return None
    lo, hi = np.percentile(1.0 / d[ok], [5.0, 95.0])
    return float(lo), float(hi)


def colorize_depth(depth: np.ndarray, valid: np.ndarray | None = None,
                   disp_range: tuple[float, float] | None = None) -> np.ndarray:
    """Depth (H, W) -> uint8 (H, W, 3) picture: near is bright, far is dark, invalid is black.

    Disparity 1/d on valid pixels (d > 0, finite, and `valid` if given) is normalised between its
    5th and 95th percentiles so a few outliers don't wash out the picture; pass `disp_range`
    (e.g. disparity_range of a ground truth) to draw several maps on one colour scale.
    """
    d = np.asarray(depth, dtype=np.float64)
    ok = np.isfinite(d) & (d > 0)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    out = np.zeros(d.shape + (3,), dtype=np.uint8)
    if not ok.any():
        return out
    disp = 1.0 / d[ok]
    lo, hi = disp_range or np.percentile(disp, [5.0, 95.0])
    x = np.clip((disp - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    out[ok] = COLORMAP_LUT[np.rint(x * 255).astype(np.int64)]
    return out


def _atomic_write(path: str, write) -> None:
    """Call write(tmp_path) on a temp file beside `path`, then rename it over `path`.

    Readers (a viewer, a resuming job) never see a half-written file, even if we are killed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes the file private (0600); give it the usual permissions
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(path: str, arr: np.ndarray) -> None:
    """Write uint8 (H, W, 3) / (H, W) (or uint16 (H, W)) as a PNG, atomically."""
    arr = np.ascontiguousarray(arr)
    if not (arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3))
            or arr.dtype == np.uint16 and arr.ndim == 2):
        raise ValueError(f"save_png wants uint8 (H,W,3)/(H,W) or uint16 (H,W), got {arr.dtype} {arr.shape}")
    _atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


# -----------------------------------------------------------------------------
# Depth readers: the encodings of the common depth datasets


DEPTH_FORMATS = ("kitti", "nyu", "scannet", "diode", "eth3d", "npy", "png16")
PNG16_SCALES = {"kitti": 1.0 / 256.0, "nyu": 1e-3, "scannet": 1e-3}  # metres per PNG unit
ETH3D_SHAPE = (4032, 6048)  # (rows, cols) of ETH3D's DSLR depth maps


def _checked(depth: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Final form of every reader: valid = given & finite & > 0; depth float32 and 0 where invalid."""
    with np.errstate(invalid="ignore"):
        valid = valid & np.isfinite(depth) & (depth > 0)
    return np.where(valid, depth, 0.0).astype(np.float32), valid


def _decode_png16(src, scale: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit single-channel PNG whose value * scale is metres; 0 marks missing depth."""
    img = _open_image(src, name)
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        bits = "8-bit" if img.mode in ("1", "L", "P", "LA", "RGB", "RGBA", "CMYK", "YCbCr") else "non-16-bit"
        raise UserError(f"{name}: expected a 16-bit single-channel PNG depth map, got a {bits} image "
                        f"(mode {img.mode})")
    raw = np.asarray(img).astype(np.float64)
    return _checked(raw * scale, raw > 0)


def _load_npy(src, name: str) -> np.ndarray:
    """np.load with user-facing errors; squeezes a trailing channel of size 1."""
    try:
        arr = np.load(src, allow_pickle=False)
    except Exception as e:  # ValueError (bad header / pickled), OSError, EOFError
        raise UserError(f"{name}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):
        raise UserError(f"{name}: expected a single .npy array, got an .npz archive")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise UserError(f"{name}: expected an H x W or H x W x 1 array, got shape {arr.shape}")
    return arr


def _decode_npy_depth(src, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Float array of metres; non-finite or <= 0 is invalid."""
    arr = _load_npy(src, name)
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(f"{name}: expected a float depth array in metres, got dtype {arr.dtype}")
    return _checked(arr.astype(np.float64), np.ones(arr.shape, dtype=bool))


def _decode_depth(src, fmt: str, name: str, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode the file-object-friendly formats (16-bit PNGs and .npy); see read_depth."""
    if fmt == "npy":
        return _decode_npy_depth(src, name)
    if fmt == "png16" and scale is None:
        raise UserError(f"{name}: depth format png16 needs a scale (metres per unit)")
    if fmt in PNG16_SCALES or fmt == "png16":
        return _decode_png16(src, scale if scale is not None else PNG16_SCALES[fmt], name)
    raise UserError(f"{name}: depth format {fmt!r} can't be read from an archive; use npy or a 16-bit PNG")


def read_depth(path: str, fmt: str, shape: tuple[int, int] | None = None, scale: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Read a ground-truth depth file -> (depth float32 (H, W) metres, valid bool (H, W)).

    fmt: "kitti" 16-bit PNG / 256; "nyu", "scannet" 16-bit PNG in mm; "png16" 16-bit PNG times
    `scale` (also overrides the scale of the PNG formats); "diode" *_depth.npy with the
    *_depth_mask.npy beside it; "eth3d" raw little-endian float32 of `shape` (default 4032 x 6048,
    inf = missing); "npy" float array in metres. Invalid pixels get depth 0.
    """
    if fmt not in DEPTH_FORMATS:
        raise UserError(f"{path}: unknown depth format {fmt!r}; expected one of {', '.join(DEPTH_FORMATS)}")
    if not os.path.isfile(path):
        raise UserError(f"{path}: depth file not found (format {fmt})")
    if fmt == "eth3d":
        rows, cols = shape or ETH3D_SHAPE
        size, want = os.path.getsize(path), rows * cols * 4
        if size != want:
            raise UserError(f"{path}: ETH3D depth must be raw little-endian float32 {cols}x{rows} "
                            f"({want} bytes), got {size} bytes")
        raw = np.fromfile(path, dtype="<f4").reshape(rows, cols).astype(np.float64)
        return _checked(raw, np.ones(raw.shape, dtype=bool))
    if fmt == "diode":
        if not path.endswith("_depth.npy"):
            raise UserError(f"{path}: DIODE depth files are named *_depth.npy")
        mask_path = path[:-len(".npy")] + "_mask.npy"
        if not os.path.isfile(mask_path):
            raise UserError(f"{path}: DIODE depth needs its validity mask "
                            f"{os.path.basename(mask_path)} beside it")
        depth, valid = _decode_npy_depth(path, path)
        mask = _load_npy(mask_path, mask_path)
        if mask.shape != depth.shape:
            raise UserError(f"{mask_path}: mask shape {mask.shape} does not match depth shape {depth.shape}")
        return _checked(depth.astype(np.float64), valid & (mask > 0))
    return _decode_depth(path, fmt, path, scale)


def write_depth_png16(path: str, depth_m: np.ndarray, scale: float) -> None:
    """Store metres as a 16-bit PNG of round(depth / scale) (scale = metres per unit, e.g. 1/256
    for KITTI, 0.001 for millimetres). Invalid (<= 0, non-finite) pixels become 0; values beyond
    65535 units are clipped."""
    d = np.asarray(depth_m, dtype=np.float64)
    ok = np.isfinite(d) & (d > 0)
    units = np.zeros(d.shape, dtype=np.uint16)
    units[ok] = np.clip(np.rint(d[ok] / scale), 0, 65535)
    save_png(path, units)


# -----------------------------------------------------------------------------
# Procedural scenes: what can be in a scene
# A ground plane with a texture, a sky gradient, 1-4 primitives lit by a sun. World frame: x right,
# y up, z forward; the camera sits at (0, height, 0) looking along +z, pitched down.

# Object colours (sRGB, 0..1). Names are what the captions say, so each must read as that colour.
COLOURS = {
    "red": (0.82, 0.10, 0.08), "orange": (0.96, 0.48, 0.06), "yellow": (0.96, 0.84, 0.12),
    "green": (0.14, 0.64, 0.18), "blue": (0.10, 0.28, 0.88), "purple": (0.48, 0.18, 0.70),
    "pink": (0.96, 0.52, 0.72), "white": (0.93, 0.93, 0.91), "black": (0.07, 0.07, 0.08),
    "cyan": (0.08, 0.76, 0.82), "brown": (0.46, 0.27, 0.11), "gray": (0.50, 0.50, 0.52),
}
SHAPES = ("sphere", "box", "cylinder", "cone")
SIZES = {"small": (0.35, 0.55), "medium": (0.6, 0.9), "large": (1.0, 1.5)}  # overall size, metres
FLOORS = {  # texture -> how the caption says it
    "checkered": "on a checkered floor", "striped": "on a striped floor", "tiled": "on a tiled floor",
    "wooden": "on a wooden floor", "grassy": "on grass", "sandy": "on sand",
}
# Two colours per floor: (base, pattern). For tiles the second is the grout.
FLOOR_PALETTES = {
    "checkered": [((0.90, 0.90, 0.88), (0.10, 0.10, 0.10)), ((0.86, 0.86, 0.86), (0.45, 0.45, 0.48)),
                  ((0.86, 0.76, 0.60), (0.44, 0.30, 0.18)), ((0.90, 0.90, 0.86), (0.66, 0.16, 0.12)),
                  ((0.80, 0.85, 0.90), (0.20, 0.30, 0.50))],
    "striped": [((0.92, 0.90, 0.85), (0.25, 0.45, 0.70)), ((0.95, 0.85, 0.30), (0.20, 0.20, 0.20)),
                ((0.90, 0.90, 0.90), (0.70, 0.25, 0.25)), ((0.60, 0.80, 0.60), (0.30, 0.50, 0.30))],
    "tiled": [((0.90, 0.90, 0.86), (0.35, 0.35, 0.35)), ((0.74, 0.42, 0.30), (0.82, 0.80, 0.74)),
              ((0.60, 0.74, 0.86), (0.95, 0.95, 0.95)), ((0.55, 0.55, 0.55), (0.20, 0.20, 0.20))],
    "wooden": [((0.70, 0.50, 0.30), (0.45, 0.28, 0.15)), ((0.86, 0.70, 0.50), (0.60, 0.45, 0.30)),
               ((0.45, 0.30, 0.20), (0.25, 0.15, 0.08))],
    "grassy": [((0.36, 0.60, 0.20), (0.17, 0.38, 0.10)), ((0.50, 0.66, 0.25), (0.30, 0.45, 0.15))],
    "sandy": [((0.92, 0.82, 0.62), (0.74, 0.62, 0.42)), ((0.86, 0.76, 0.60), (0.70, 0.60, 0.46))],
}
FLOOR_SCALES = {"checkered": (0.5, 1.5), "striped": (0.3, 1.0), "tiled": (0.4, 1.0),
                "wooden": (0.15, 0.3), "grassy": (0.3, 0.8), "sandy": (0.6, 1.5)}  # metres
# Skies: (horizon, zenith, sun colour * intensity), sRGB-ish.
SKIES = [
    ((0.78, 0.86, 0.95), (0.22, 0.45, 0.85), (1.00, 0.96, 0.88)),   # clear
    ((0.86, 0.88, 0.89), (0.50, 0.62, 0.80), (0.95, 0.92, 0.85)),   # hazy
    ((0.98, 0.74, 0.52), (0.30, 0.35, 0.65), (1.00, 0.84, 0.66)),   # sunset
    ((0.78, 0.79, 0.80), (0.58, 0.60, 0.64), (0.60, 0.60, 0.62)),   # overcast
]


@dataclass
class Primitive:
    """One object standing on the ground. dims: sphere (r, r, r); box half extents (ex, ey, ez);
    cylinder / cone (radius, height, radius). (x, z) is the centre of its footprint."""
    shape: str
    colour: str
    size: str
    x: float
    z: float
    dims: tuple[float, float, float]
    yaw: float = 0.0  # radians, boxes only

    @property
    def radius(self) -> float:
        """Radius of the footprint's bounding circle on the ground (metres)."""
        return math.hypot(self.dims[0], self.dims[2]) if self.shape == "box" else self.dims[0]

    @property
    def height(self) -> float:
        return {"sphere": 2 * self.dims[0], "box": 2 * self.dims[1]}.get(self.shape, self.dims[1])

    def phrase(self, article: str = "a") -> str:
        """'a large red box'; with article 'the' the size is dropped (colours are unique)."""
        size = "" if self.size == "medium" or article == "the" else self.size + " "
        words = f"{size}{self.colour} {self.shape}"
        if article == "a" and words[0] in "aeiou":
            article = "an"
        return f"{article} {words}"


@dataclass
class Scene:
    """All parameters of procedural scene `index` (no pixels): enough to render at any resolution."""
    index: int
    fov_deg: float
    cam_height: float
    pitch: float                                  # radians, camera looks down by this much
    sun: tuple[float, float, float]               # unit vector towards the sun
    sky: tuple                                    # (horizon, zenith, sun colour)
    floor: str
    floor_colours: tuple
    floor_scale: float
    floor_angle: float                            # pattern rotation (radians)
    floor_offset: tuple[float, float]
    ground_radius: float                          # the ground ends here; beyond is sky
    objects: list[Primitive] = field(default_factory=list)
    caption: str = ""


# -----------------------------------------------------------------------------
# Procedural scenes: sampling parameters and captions


def _jitter(rng: np.random.Generator, rgb, amount: float = 0.04) -> tuple[float, float, float]:
    """A slightly different shade of a palette colour, so colours don't come from a tiny set."""
    return tuple(float(min(1.0, max(0.0, c + rng.uniform(-amount, amount)))) for c in rgb)


def _camera_basis(pitch: float) -> tuple[tuple, tuple, tuple]:
    """(right, up, forward) unit vectors of a camera pitched down by `pitch` radians."""
    c, s = math.cos(pitch), math.sin(pitch)
    return (1.0, 0.0, 0.0), (0.0, c, s), (0.0, -s, c)


def _make_primitive(rng: np.random.Generator, colour: str) -> Primitive:
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    s = float(rng.uniform(*SIZES[size]))
    if shape == "sphere":
        dims = (s / 2, s / 2, s / 2)
    elif shape == "box":
        dims = (s / 2 * rng.uniform(0.7, 1.3), s / 2 * rng.uniform(0.7, 1.3), s / 2 * rng.uniform(0.7, 1.3))
    elif shape == "cylinder":
        r, height = s * rng.uniform(0.3, 0.45), s * rng.uniform(0.8, 1.5)
        dims = (r, height, r)
    else:  # cone: a bit taller than wide so it reads as a cone from a low camera
        r, height = s * rng.uniform(0.35, 0.5), s * rng.uniform(1.0, 1.5)
        dims = (r, height, r)
    yaw = float(rng.uniform(0, math.pi / 2)) if shape == "box" else 0.0
    return Primitive(shape, colour, size, 0.0, 0.0, tuple(float(v) for v in dims), yaw)


def _view_coords(obj: Primitive, scene: Scene) -> tuple[float, float]:
    """(depth along the optical axis, height in the camera frame) of obj's centre, metres."""
    _, up, fwd = _camera_basis(scene.pitch)
    rel = (obj.x, obj.height / 2 - scene.cam_height, obj.z)
    return sum(r * f for r, f in zip(rel, fwd)), sum(r * u for r, u in zip(rel, up))


def _fits(obj: Primitive, placed: list[Primitive], scene: Scene) -> bool:
    """Is obj (already positioned) inside the view, in front of the camera, clear of the others and
    not hidden behind them? Keeps every object the caption mentions visible in the picture."""
    a = math.tan(math.radians(scene.fov_deg) / 2)
    zc, yc = _view_coords(obj, scene)
    if zc < obj.radius + 1.0 or abs(obj.x) + 0.5 * obj.radius > 0.9 * a * zc or abs(yc) > 0.8 * a * zc:
        return False
    if obj.radius / zc < 0.08 * a:  # narrower than 8% of the picture: a speck at 32 x 32
        return False
    lo, hi = (obj.x - obj.radius) / zc, (obj.x + obj.radius) / zc   # horizontal extent in the image
    for q in placed:
        if math.hypot(obj.x - q.x, obj.z - q.z) < obj.radius + q.radius + 0.25:
            return False
        qz = _view_coords(q, scene)[0]
        qlo, qhi = (q.x - q.radius) / qz, (q.x + q.radius) / qz
        if min(hi, qhi) - max(lo, qlo) > 0.5 * min(hi - lo, qhi - qlo):
            return False
    return True


def _relation(a: Primitive, b: Primitive) -> str:
    """Where a is relative to b, as seen from the camera (lateral offsets look bigger than depth
    offsets in a perspective picture, hence the 0.6)."""
    dx, dz = a.x - b.x, a.z - b.z
    if abs(dx) >= 0.6 * abs(dz):
        return "left of" if dx < 0 else "right of"
    return "in front of" if dz < 0 else "behind"


def _caption(objects: list[Primitive], floor: str) -> str:
    """e.g. 'a red sphere left of a large blue box, and a cone behind the blue box on grass'.
    Each object after the second is related to the one before it; colours are unique per scene,
    so 'the <colour> <shape>' is unambiguous."""
    first = objects[0].phrase()
    if len(objects) == 1:
        return f"{first} {FLOORS[floor]}"
    parts = [f"{first} {_relation(objects[0], objects[1])} {objects[1].phrase()}"]
    for prev, obj in zip(objects[1:], objects[2:]):
        link = "and " if obj is objects[-1] else ""
        parts.append(f"{link}{obj.phrase()} {_relation(obj, prev)} {prev.phrase('the')}")
    return ", ".join(parts) + " " + FLOORS[floor]


def _place(obj: Primitive, scene: Scene, rng: np.random.Generator, tries: int = 60) -> None:
    """Rejection-sample a position for obj and add it to the scene; leave it out if none fits."""
    a = math.tan(math.radians(scene.fov_deg) / 2)
    for _ in range(tries):
        obj.z = float(rng.uniform(2.0, 11.0))
        obj.x = float(rng.uniform(-0.85, 0.85) * a * obj.z)
        if _fits(obj, scene.objects, scene):
            scene.objects.append(obj)
            return


def sample_scene(index: int) -> Scene:
    """The parameters of scene `index` (deterministic: a PCG64 stream seeded with the index)."""
    rng = np.random.Generator(np.random.PCG64(index))
    floor = list(FLOORS)[rng.integers(len(FLOORS))]
    palette = FLOOR_PALETTES[floor]
    c0, c1 = palette[rng.integers(len(palette))]
    sky = SKIES[rng.integers(len(SKIES))]
    elev, azim = math.radians(rng.uniform(25, 65)), rng.uniform(-math.pi, math.pi)
    scene = Scene(
        index=index,
        fov_deg=float(rng.uniform(45, 75)),
        cam_height=float(rng.uniform(0.8, 2.2)),
        pitch=math.radians(rng.uniform(4, 22)),
        sun=(math.cos(elev) * math.sin(azim), math.sin(elev), math.cos(elev) * math.cos(azim)),
        sky=(_jitter(rng, sky[0]), _jitter(rng, sky[1]), sky[2]),
        floor=floor,
        floor_colours=(_jitter(rng, c0), _jitter(rng, c1)),
        floor_scale=float(rng.uniform(*FLOOR_SCALES[floor])),
        floor_angle=float(rng.uniform(0, math.pi)),
        floor_offset=(float(rng.uniform(0, 10)), float(rng.uniform(0, 10))),
        ground_radius=float(rng.uniform(30, 60)),
    )
    n_objects = int(rng.integers(1, 5))
    colours = [list(COLOURS)[k] for k in rng.permutation(len(COLOURS))[:n_objects]]
    for colour in colours:
        _place(_make_primitive(rng, colour), scene, rng)
    while not scene.objects:  # rare (0.2%): nothing fitted, e.g. a small object under a high camera
        _place(_make_primitive(rng, colours[0]), scene, rng)
    scene.caption = _caption(scene.objects, floor)
    return scene


def scene_captions(n: int, res: int = 32) -> list[str]:
    """Captions of training scenes 0..n-1 (from parameters only; no rendering). `res` is unused:
    the caption is the same at every resolution."""
    return [sample_scene(i).caption for i in range(n)]


# -----------------------------------------------------------------------------
# Procedural scenes: ray casting
# Rays are (3, P) arrays of directions whose component along the camera's optical axis is 1, so
# the ray parameter t of a hit *is* its z-depth. Dot products are written out component-wise (no
# BLAS) to keep results bit-identical across machines and thread counts.

_EPS = 1e-6


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _box_local(obj: Primitive, v, is_point: bool):
    """World vector/point -> the box's frame (centre at origin, axes along its edges)."""
    c, s = math.cos(obj.yaw), math.sin(obj.yaw)
    x, y, z = (v[0] - obj.x, v[1] - obj.dims[1], v[2] - obj.z) if is_point else (v[0], v[1], v[2])
    return c * x - s * z, y, s * x + c * z


def _hit(obj: Primitive, o, d) -> np.ndarray:
    """Nearest hit distance t > 0 of rays o + t d with obj -> (P,) float64, inf for a miss.

    o, d: (3, P) or (3, 1) arrays. Objects cover a small part of the picture, so a cheap test
    against the object's bounding sphere picks the rays that get the exact (costlier) test.
    """
    P = max(o.shape[1], d.shape[1])
    t = np.full(P, np.inf)
    ox, oy, oz = o[0] - obj.x, o[1] - obj.height / 2, o[2] - obj.z
    b = d[0] * ox + d[1] * oy + d[2] * oz
    c = ox * ox + oy * oy + oz * oz - (obj.radius ** 2 + obj.height ** 2 / 4)
    a = _dot(d, d)
    disc = b * b - a * c
    # the sphere is hit ahead of the origin iff disc >= 0 and the far root -b + sqrt(disc) > 0
    near = np.flatnonzero((disc >= 0) & ((b < 0) | (c < 0)))
    if near.size:
        o_near = o if o.shape[1] == 1 else o[:, near]
        t[near] = _hit_exact(obj, o_near, d if d.shape[1] == 1 else d[:, near])
    return t


def _hit_exact(obj: Primitive, o, d) -> np.ndarray:
    """_hit without the bounding-sphere shortcut. Every ray origin is outside every object (the
    camera is, and shadow rays start just off a surface), so only entry points matter."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if obj.shape == "sphere":
            r = obj.dims[0]
            ox, oy, oz = o[0] - obj.x, o[1] - r, o[2] - obj.z
            b = d[0] * ox + d[1] * oy + d[2] * oz
            c = ox * ox + oy * oy + oz * oz - r * r
            a = _dot(d, d)
            disc = b * b - a * c
            t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
            return np.where((disc >= 0) & (t > _EPS), t, np.inf)
        if obj.shape == "box":  # slab test in the box's frame
            lo, ld = _box_local(obj, o, True), _box_local(obj, d, False)
            t_near, t_far = -np.inf, np.inf
            for k in range(3):
                inv = 1.0 / ld[k]
                t1, t2 = (-obj.dims[k] - lo[k]) * inv, (obj.dims[k] - lo[k]) * inv
                t_near, t_far = np.fmax(t_near, np.fmin(t1, t2)), np.fmin(t_far, np.fmax(t1, t2))
            return np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf)
        # Cylinder and cone are both surfaces of revolution about a vertical axis with radius
        # r(y) = r - k y (k = 0 for a cylinder, r / height for a cone): x'^2 + z'^2 = r(y)^2.
        r, height = obj.dims[0], obj.dims[1]
        k = r / height if obj.shape == "cone" else 0.0
        ox, oz, q = o[0] - obj.x, o[2] - obj.z, r - k * o[1]
        a = d[0] * d[0] + d[2] * d[2] - k * k * d[1] * d[1]
        half_b = ox * d[0] + oz * d[2] + k * q * d[1]
        c = ox * ox + oz * oz - q * q
        disc = half_b * half_b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        best = np.full(np.broadcast(a, c).shape, np.inf)
        for t in ((-half_b - root) / a, (-half_b + root) / a):
            y = o[1] + t * d[1]
            best = np.where((disc >= 0) & (t > _EPS) & (y >= 0) & (y <= height), np.fmin(best, t), best)
        if obj.shape == "cylinder":  # flat top cap (the bottom one rests on the ground)
            t = (height - o[1]) / d[1]
            x, z = ox + t * d[0], oz + t * d[2]
            best = np.where((t > _EPS) & (x * x + z * z <= r * r), np.fmin(best, t), best)
        return best


def _normal(obj: Primitive, p) -> np.ndarray:
    """Unit outward normals (3, P) of obj at surface points p (3, P)."""
    if obj.shape == "sphere":
        r = obj.dims[0]
        return np.stack([(p[0] - obj.x) / r, (p[1] - r) / r, (p[2] - obj.z) / r])
    if obj.shape == "box":  # the face is the axis where the point is furthest out, relative to size
        q = _box_local(obj, p, True)
        fx, fy, fz = (np.abs(q[k]) / obj.dims[k] for k in range(3))
        on_x = (fx >= fy) & (fx >= fz)
        on_y = ~on_x & (fy >= fz)
        on_z = ~on_x & ~on_y
        nx, ny, nz = np.sign(q[0]) * on_x, np.sign(q[1]) * on_y, np.sign(q[2]) * on_z
        c, s = math.cos(obj.yaw), math.sin(obj.yaw)
        return np.stack([c * nx + s * nz, ny, -s * nx + c * nz])
    r, height = obj.dims[0], obj.dims[1]
    k = r / height if obj.shape == "cone" else 0.0
    x, z = p[0] - obj.x, p[2] - obj.z
    n = np.stack([x, k * (r - k * p[1]), z])  # gradient of x'^2 + z'^2 - r(y)^2
    if obj.shape == "cylinder":
        cap = p[1] >= height - 1e-6
        n = np.where(cap, np.array([[0.0], [1.0], [0.0]]), n)
    return n / np.sqrt(_dot(n, n))


def _hash01(ix: np.ndarray, iz: np.ndarray, salt: int) -> np.ndarray:
    """A uniform [0, 1) value per integer lattice point (an integer hash, so exact everywhere)."""
    with np.errstate(over="ignore"):
        h = ix.astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= iz.astype(np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F) + np.uint64(salt)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2.0 ** 53)


def _value_noise(u: np.ndarray, v: np.ndarray, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1): lattice values blended with a smoothstep."""
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    su, sv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    n00, n10 = _hash01(iu, iv, salt), _hash01(iu + 1, iv, salt)
    n01, n11 = _hash01(iu, iv + 1, salt), _hash01(iu + 1, iv + 1, salt)
    near, far = n00 + (n10 - n00) * su, n01 + (n11 - n01) * su
    return near + (far - near) * sv


def _fade(footprint: np.ndarray, feature: float) -> np.ndarray:
    """How much of a pattern with features of this size survives in a pixel of this footprint:
    1 when features are much bigger than a pixel, 0 when many fall into one. Replacing detail by
    its average this way (a poor man's mip-map) keeps far floors from aliasing into moire."""
    return np.clip(1.5 - footprint / feature, 0.0, 1.0)


def _floor_mix(scene: Scene, gx: np.ndarray, gz: np.ndarray, footprint: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Floor pattern at ground points: (weight of the second colour in [0, 1], brightness factor)."""
    s = scene.floor_scale
    c, sn = math.cos(scene.floor_angle), math.sin(scene.floor_angle)
    u = (c * gx + sn * gz) / s + scene.floor_offset[0]   # pattern coordinates, in units of s
    v = (-sn * gx + c * gz) / s + scene.floor_offset[1]
    salt = scene.index & 0xFFFFFFFF
    shade = np.ones_like(u)
    if scene.floor == "checkered":
        w = 0.5 + ((np.floor(u) + np.floor(v)) % 2 - 0.5) * _fade(footprint, s)
    elif scene.floor == "striped":
        w = 0.5 + (np.floor(u) % 2 - 0.5) * _fade(footprint, s)
    elif scene.floor == "tiled":  # grout lines of 6% width around tiles whose shade varies a bit
        grout = 1.0 - 0.94 ** 2
        line = ((u - np.floor(u)) < 0.06) | ((v - np.floor(v)) < 0.06)
        w = grout + (line - grout) * _fade(footprint, 0.15 * s)
        shade = 1.0 + (_hash01(np.floor(u), np.floor(v), salt) - 0.5) * 0.2 * _fade(footprint, s)
    elif scene.floor == "wooden":  # planks along v with their own shade, grain, dark seams
        grain = _value_noise(u * 6.0, v * 0.25, salt)
        seam = (u - np.floor(u)) < 0.05
        w = 0.5 + (0.7 * grain + 0.3 * seam - 0.5) * _fade(footprint, 0.2 * s)
        shade = 1.0 + (_hash01(np.floor(u), np.zeros_like(u), salt) - 0.5) * 0.3 * _fade(footprint, s)
    else:  # grassy / sandy: two octaves of noise, the fine one fading out first
        fine = 0.2 if scene.floor == "grassy" else 0.08
        coarse = _value_noise(u, v, salt) - 0.5
        detail = _value_noise(u / fine, v / fine, salt + 1) - 0.5
        w = 0.5 + 0.6 * coarse * _fade(footprint, s) + 0.6 * detail * _fade(footprint, fine * s)
    return w, shade


def _trace(scene: Scene, d: np.ndarray, pixel_angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shade rays d (3, P) from the camera -> (linear RGB (3, P), z-depth (P,), valid (P,))."""
    h = scene.cam_height
    o = np.array([[0.0], [h], [0.0]])
    with np.errstate(divide="ignore", invalid="ignore"):   # inf * 0 for rays that miss the ground
        t_ground = np.where(d[1] < 0, -h / d[1], np.inf)
        gx, gz = t_ground * d[0], t_ground * d[2]
        t_ground = np.where(gx * gx + gz * gz <= scene.ground_radius ** 2, t_ground, np.inf)
    ts = np.stack([t_ground] + [_hit(obj, o, d) for obj in scene.objects])   # (1 + n_obj, P)
    which = np.argmin(ts, axis=0)        # 0 = ground, k = object k - 1
    t = np.min(ts, axis=0)
    valid = np.isfinite(t)
    horizon, zenith, sun_rgb = (np.array(c, dtype=np.float64)[:, None] ** 2 for c in scene.sky)
    sun = np.array(scene.sun)[:, None]
    rgb = np.empty(d.shape)

    # Sky: gradient by elevation, plus a sun disc with a soft rim.
    sky = np.flatnonzero(~valid)
    if sky.size:
        view = d[:, sky] / np.sqrt(_dot(d[:, sky], d[:, sky]))
        glow = np.clip((_dot(view, sun) - 0.9985) / 0.001, 0.0, 1.0)
        rgb[:, sky] = horizon + (zenith - horizon) * np.sqrt(np.clip(view[1], 0.0, 1.0)) + sun_rgb * glow

    idx = np.flatnonzero(valid)
    if idx.size:
        th, dh, wh = t[idx], d[:, idx], which[idx]
        p = o + th * dh
        ray_len = np.sqrt(_dot(dh, dh))
        view = dh / ray_len
        normal = np.zeros_like(p)
        normal[1] = 1.0
        albedo = np.empty_like(p)
        spec = np.zeros_like(th)
        on_ground = wh == 0
        if on_ground.any():  # footprint of a pixel on the floor grows with distance and obliquity
            g = np.flatnonzero(on_ground)
            cos_in = np.maximum(-view[1, g], 0.02)
            footprint = th[g] * ray_len[g] * pixel_angle / cos_in
            w, shade = _floor_mix(scene, p[0, g], p[2, g], footprint)
            c0, c1 = (np.array(c)[:, None] for c in scene.floor_colours)
            albedo[:, g] = ((c0 + (c1 - c0) * w) * shade) ** 2
        for k, obj in enumerate(scene.objects, start=1):
            m = np.flatnonzero(wh == k)
            if m.size:
                normal[:, m] = _normal(obj, p[:, m])
                albedo[:, m] = (np.array(COLOURS[obj.colour])[:, None]) ** 2
                half = sun - view[:, m]       # Blinn-Phong highlight, exponent 32 = 5 squarings
                cos_h = np.maximum(_dot(normal[:, m], half) / np.sqrt(_dot(half, half)), 0.0)
                for _ in range(5):
                    cos_h = cos_h * cos_h
                spec[m] = 0.4 * cos_h
        # Direct sun only where the surface faces it and no object blocks the way (shadow rays).
        lambert = np.maximum(_dot(normal, sun), 0.0)
        lit = lambert > 0
        facing = np.flatnonzero(lit)
        if facing.size:
            origin = p[:, facing] + 1e-4 * normal[:, facing]
            blocked = np.zeros(facing.size, dtype=bool)
            for obj in scene.objects:
                blocked |= np.isfinite(_hit(obj, origin, sun))
            lit[facing] = ~blocked
        ambient = 0.5 * (horizon + zenith) * 0.55
        colour = albedo * (ambient + sun_rgb * (lambert * lit)) + sun_rgb * (spec * lit)
        # Aerial perspective: far surfaces fade into the horizon colour, hiding the ground's edge.
        dist = th * ray_len
        fog = np.clip((dist - 0.3 * scene.ground_radius) / (0.7 * scene.ground_radius), 0.0, 1.0) ** 2
        rgb[:, idx] = colour + (horizon - colour) * fog
    depth = np.where(valid, t, 0.0)
    return rgb, depth, valid


def _supersampling(res: int) -> int:
    """Rays per pixel side. Odd, so the centre ray of each pixel exists: depth comes from it (a depth
    averaged across an edge would be a point floating in mid-air), colour from the average."""
    return 3 if res <= 64 else 1


def render(scene: Scene, res: int) -> dict:
    """Render scene parameters at res x res; see render_scene for the returned dict."""
    ss = _supersampling(res)
    n = res * ss
    a = math.tan(math.radians(scene.fov_deg) / 2)
    coords = ((np.arange(n) + 0.5) * (2.0 / n) - 1.0) * a        # image plane at unit depth
    xn, yn = np.tile(coords, n), np.repeat(-coords, n)           # row 0 is the top of the image
    right, up, fwd = _camera_basis(scene.pitch)
    d = np.stack([xn * right[0] + yn * up[0] + fwd[0],
                  xn * right[1] + yn * up[1] + fwd[1],
                  xn * right[2] + yn * up[2] + fwd[2]])
    rgb, depth, valid = _trace(scene, d, pixel_angle=2 * a / n)
    rgb = rgb.reshape(3, res, ss, res, ss)
    acc = np.zeros((3, res, res))
    for i in range(ss):          # fixed summation order: deterministic, unlike a reduction
        for j in range(ss):
            acc += rgb[:, :, i, :, j]
    srgb = np.sqrt(np.clip(acc / (ss * ss), 0.0, 1.0))            # gamma 2 (linear was albedo^2)
    centre = ss // 2
    return {
        "rgb": np.floor(srgb * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0).copy(),
        "depth": depth.reshape(res, ss, res, ss)[:, centre, :, centre].astype(np.float32),
        "valid": valid.reshape(res, ss, res, ss)[:, centre, :, centre].copy(),
        "caption": scene.caption,
        "fov_deg": scene.fov_deg,
    }


def render_scene(index: int, res: int) -> dict:
    """Procedural scene `index` at res x res. Returns {"rgb": uint8 (res, res, 3), "depth": float32
    (res, res) z-depth in metres (0 on sky), "valid": bool (res, res) (False on sky), "caption": str,
    "fov_deg": float (horizontal = vertical field of view)}. Same geometry at every res."""
    return render(sample_scene(index), res)


# -----------------------------------------------------------------------------
# Sparse depth: which pixels of a dense map keep their ground truth


SPARSE_KINDS = ("none", "lidar", "random")
MAX_LIDAR_FRACTION = 0.05


def lidar_mask(valid: np.ndarray, rng: np.random.Generator, n_lines: int | None = None) -> np.ndarray:
    """A LiDAR-like subset of `valid` (H, W): a few gently curved, slightly tilted scan lines,
    spread over the rows that have depth, with random dropouts along each line. At most 5% of
    all pixels (fewer lines at low resolution), always a subset of valid."""
    H, W = valid.shape
    mask = np.zeros((H, W), dtype=bool)
    rows = np.flatnonzero(valid.any(axis=1))
    budget = int(MAX_LIDAR_FRACTION * H * W)
    if rows.size == 0 or budget == 0:
        return mask
    keep = rng.uniform(0.6, 0.95)
    n_lines = int(rng.integers(4, 9)) if n_lines is None else n_lines
    n_lines = max(1, min(n_lines, int(budget / (W * keep))))
    lo, hi = rows[0], rows[-1]
    centres = lo + (hi - lo) * (np.arange(n_lines) + rng.uniform(0.2, 0.8, n_lines)) / n_lines
    cols = np.arange(W)
    x = (cols - (W - 1) / 2) / W                                   # -0.5 .. 0.5 across the image
    for centre in centres:
        tilt, bend = rng.uniform(-0.04, 0.04) * H, rng.uniform(-0.15, 0.15) * H
        r = np.clip(np.rint(centre + tilt * x + bend * x * x), 0, H - 1).astype(np.int64)
        hit = rng.random(W) < keep
        mask[r[hit], cols[hit]] = True
    mask &= valid
    extra = int(mask.sum()) - budget
    if extra > 0:  # rare (lines crossing into each other's budget): drop random points
        mask.flat[rng.permutation(np.flatnonzero(mask))[:extra]] = False
    return mask


def random_mask(valid: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Keep each valid pixel independently with probability `density`."""
    if not 0.0 <= density <= 1.0:
        raise UserError(f"sparse depth density must be in [0, 1], got {density}")
    return valid & (rng.random(valid.shape) < density)


def sparsify(valid: np.ndarray, kind: str, rng: np.random.Generator, density: float = 0.05) -> np.ndarray:
    """Supervised pixels for sparse-depth training: kind "none" (all valid), "lidar" or "random"."""
    if kind == "none":
        return valid.copy()
    if kind == "lidar":
        return lidar_mask(valid, rng)
    if kind == "random":
        return random_mask(valid, density, rng)
    raise UserError(f"unknown sparse depth kind {kind!r}; expected one of {', '.join(SPARSE_KINDS)}")


def _mask_rng(*keys: int) -> np.random.Generator:
    """The sparsification stream of one sample: its own seed, independent of the scene's stream."""
    return np.random.Generator(np.random.PCG64([*keys, 0x5A4D]))


# -----------------------------------------------------------------------------
# Training samples: the dict every training dataset yields


def _to_sample(rgb: np.ndarray, depth: np.ndarray, dense_valid: np.ndarray, caption: str, index: int,
               res: int, sparse: str, density: float, rng: np.random.Generator, name: str = "") -> dict:
    """Full-size uint8 rgb (H, W, 3) + depth/valid (H', W') of the same aspect -> training sample.

    RGB is centre-cropped to res x res (bilinear); depth and its mask take the same crop with
    nearest resampling. Returns {"rgb": float32 (3, res, res) in [-1, 1], "depth": float32
    (res, res) metres, dense (0 where not dense_valid), "valid": bool (res, res) supervised pixels
    (after sparsification: train on these only), "dense_valid": bool (res, res) before it,
    "caption": str, "index": int}.
    """
    if abs(depth.shape[0] * rgb.shape[1] / (depth.shape[1] * rgb.shape[0]) - 1) > 0.01:
        raise UserError(f"{name}: depth {depth.shape[1]}x{depth.shape[0]} and image "
                        f"{rgb.shape[1]}x{rgb.shape[0]} have different aspect ratios")
    rgb = resize_image(rgb, res, "crop")[0]
    dense_valid = resize_image(dense_valid, res, "crop", nearest=True)[0]
    depth = np.where(dense_valid, resize_image(depth, res, "crop", nearest=True)[0], 0.0).astype(np.float32)
    valid = sparsify(dense_valid, sparse, rng, density)
    return {
        "rgb": torch.from_numpy(rgb).permute(2, 0, 1).float().div(127.5).sub(1.0).contiguous(),
        "depth": torch.from_numpy(depth),
        "valid": torch.from_numpy(np.ascontiguousarray(valid)),
        "dense_valid": torch.from_numpy(np.ascontiguousarray(dense_valid)),
        "caption": caption,
        "index": int(index),
    }


def _check_sparse(sparse: str, density: float) -> None:
    if sparse not in SPARSE_KINDS:
        raise UserError(f"unknown sparse depth kind {sparse!r}; expected one of {', '.join(SPARSE_KINDS)}")
    if not 0.0 < density <= 1.0:
        raise UserError(f"sparse depth density must be in (0, 1], got {density}")


TEST_OFFSET = 1_000_000_000  # scene index of the first held-out ("test") scene


class SceneDataset(torch.utils.data.Dataset):
    """Procedural scenes rendered on the fly. split "train" is scene i, "test" is TEST_OFFSET + i.
    Holds only a few numbers, so it pickles into DataLoader workers for free."""

    def __init__(self, res: int, split: str = "train", sparse: str = "none", density: float = 0.05,
                 length: int | None = None):
        if split not in ("train", "test"):
            raise UserError(f"unknown scene split {split!r}; expected train or test")
        _check_sparse(sparse, density)
        self.res, self.split, self.sparse, self.density = res, split, sparse, density
        self.length = 2 ** 30 if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        index = i + (TEST_OFFSET if self.split == "test" else 0)
        s = render_scene(index, self.res)
        return _to_sample(s["rgb"], s["depth"], s["valid"], s["caption"], index, self.res,
                          self.sparse, self.density, _mask_rng(index))


# -----------------------------------------------------------------------------
# Tokenizer for the text stream


PAD, UNK = "<pad>", "<unk>"


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> Tokenizer:
    """A word-level-split BPE on lowercased text; "<pad>" is id 0, "<unk>" id 1 (for characters
    never seen in training). Deterministic for the same texts."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def encode_text(tok: Tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """Token ids (B, length) int64: truncated to `length`, right-padded with 0. "" -> all zeros,
    the unconditional caption of classifier-free guidance."""
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    for row, text in enumerate(texts):  # one at a time: encode_batch's thread pool and fork() don't mix
        seq = tok.encode(text).ids[:length]
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids


def save_tokenizer(tok: Tokenizer, path: str) -> None:
    _atomic_write(path, tok.save)


def load_tokenizer(path: str) -> Tokenizer:
    if not os.path.isfile(path):
        raise UserError(f"{path}: tokenizer file not found (expected a tokenizer.json written by train.py)")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a plain Exception
        raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None
    if tok.token_to_id(PAD) != 0:
        raise UserError(f"{path}: tokenizer has no {PAD} token with id 0")
    return tok


# -----------------------------------------------------------------------------
# Evaluation datasets (the Marigold evaluation layout)
# A split file lists "rgb_rel_path depth_rel_path [extra...]" per line, relative to the dataset
# root (the extracted tar of Marigold's evaluation set). "split" is the file's path in the Marigold
# repository; we look for it in the root under that path or just its base name.

DATASETS: dict[str, dict] = {
    "nyu": dict(min_depth=1e-3, max_depth=10.0, fmt="nyu", crop="nyu_eigen",
                split="data_split/nyu_depth/labeled/filename_list_test.txt"),
    "kitti": dict(min_depth=1e-5, max_depth=80.0, fmt="kitti", crop="kitti_eigen",
                  split="data_split/kitti_depth/eigen_test_files_with_gt.txt"),
    "eth3d": dict(min_depth=1e-5, max_depth=math.inf, fmt="eth3d", crop=None,
                  split="data_split/eth3d_depth/eth3d_filename_list.txt"),
    "scannet": dict(min_depth=1e-3, max_depth=10.0, fmt="scannet", crop=None,
                    split="data_split/scannet_depth/scannet_val_sampled_list_800_1.txt"),
    "diode": dict(min_depth=0.6, max_depth=350.0, fmt="diode", crop=None,
                  split="data_split/diode_depth/diode_val_all_filename_list.txt"),
    "scenes": dict(min_depth=1e-5, max_depth=math.inf, fmt=None, crop=None, split=None),
}
KITTI_BENCHMARK_HW = (352, 1216)


def _kitti_benchmark_crop(arr: np.ndarray, name: str) -> np.ndarray:
    """KITTI's benchmark crop: the bottom 352 rows, the central 1216 columns."""
    H, W = arr.shape[:2]
    ch, cw = KITTI_BENCHMARK_HW
    if H < ch or W < cw:
        raise UserError(f"{name}: KITTI image is {W}x{H}, smaller than the {cw}x{ch} benchmark crop")
    top, left = H - ch, (W - cw) // 2
    return arr[top:top + ch, left:left + cw]


def _eval_region(crop: str | None, shape: tuple[int, int]) -> np.ndarray:
    """The part of the image a dataset's protocol evaluates (bool (H, W))."""
    H, W = shape
    region = np.zeros((H, W), dtype=bool)
    if crop == "nyu_eigen":
        region[45:471, 41:601] = True
    elif crop == "kitti_eigen":
        region[int(0.3324324 * H):int(0.91351351 * H), int(0.0359477 * W):int(0.96405229 * W)] = True
    else:
        region[:] = True
    return region


class EvalDataset(torch.utils.data.Dataset):
    """A real evaluation set in the Marigold layout. Items: {"rgb": uint8 (H, W, 3) at native
    resolution, "depth": float32 (H, W) metres, "valid": bool (H, W) (min < gt < max and the
    dataset's crop / mask), "name": rgb path relative to root, "min_depth", "max_depth"}."""

    def __init__(self, name: str, root: str, split_file: str | None = None, n: int | None = None):
        if name not in DATASETS or name == "scenes":
            raise UserError(f"unknown evaluation dataset {name!r}; expected one of "
                            f"{', '.join(k for k in DATASETS if k != 'scenes')}")
        self.name, self.root, self.cfg = name, root, DATASETS[name]
        if root is None or not os.path.isdir(root):
            raise UserError(f"{root}: {name} evaluation data not found (expected the extracted Marigold "
                            f"evaluation set for {name} in this folder)")
        if split_file is None:
            candidates = [os.path.join(root, self.cfg["split"]),
                          os.path.join(root, os.path.basename(self.cfg["split"]))]
            split_file = next((c for c in candidates if os.path.isfile(c)), candidates[-1])
            if not os.path.isfile(split_file):
                raise UserError(f"{root}: no split file {os.path.basename(self.cfg['split'])} found (copy "
                                f"Marigold's {self.cfg['split']} into the root or pass the split file)")
        elif not os.path.isfile(split_file):
            raise UserError(f"{split_file}: split file not found")
        self.items = []
        with open(split_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields or fields[0].startswith("#"):
                    continue
                if len(fields) < 2:
                    raise UserError(f"{split_file}:{lineno}: expected 'rgb_path depth_path [...]', "
                                    f"got {line.strip()!r}")
                if fields[1] == "None":  # KITTI lists frames without ground truth this way
                    continue
                self.items.append((fields[0], fields[1]))
        self.items = self.items[:n] if n is not None else self.items
        if not self.items:
            raise UserError(f"{split_file}: no samples listed")
        missing = [p for pair in self.items for p in pair if not os.path.isfile(os.path.join(root, p))]
        if missing:
            raise UserError(f"{root}: {len(missing)} files listed in {os.path.basename(split_file)} are "
                            f"missing, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        rgb_rel, depth_rel = self.items[i]
        rgb = load_image(os.path.join(self.root, rgb_rel))
        depth_path = os.path.join(self.root, depth_rel)
        depth, valid = read_depth(depth_path, self.cfg["fmt"])
        if self.name == "kitti":
            rgb, depth, valid = (_kitti_benchmark_crop(a, depth_path) for a in (rgb, depth, valid))
        if rgb.shape[:2] != depth.shape:
            raise UserError(f"{depth_path}: depth is {depth.shape[1]}x{depth.shape[0]} but its image is "
                            f"{rgb.shape[1]}x{rgb.shape[0]}")
        lo, hi = self.cfg["min_depth"], self.cfg["max_depth"]
        valid = valid & (depth > lo) & (depth < hi) & _eval_region(self.cfg["crop"], depth.shape)
        return {"rgb": np.ascontiguousarray(rgb), "depth": np.ascontiguousarray(depth),
                "valid": np.ascontiguousarray(valid), "name": rgb_rel, "min_depth": lo, "max_depth": hi}


class SceneEvalDataset(torch.utils.data.Dataset):
    """Held-out procedural scenes (the "test" split) with the EvalDataset item interface (plus
    "caption"); valid = every non-sky pixel. Needs no download."""

    def __init__(self, res: int, n: int = 100):
        self.res, self.n = res, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = render_scene(TEST_OFFSET + i, self.res)
        cfg = DATASETS["scenes"]
        return {"rgb": s["rgb"], "depth": s["depth"], "valid": s["valid"], "name": f"scene_{TEST_OFFSET + i}",
                "caption": s["caption"], "min_depth": cfg["min_depth"], "max_depth": cfg["max_depth"]}


def get_eval_dataset(name: str, root: str | None, n: int | None, res: int) -> torch.utils.data.Dataset:
    """"scenes" (n held-out procedural scenes at res, default 100) or a real set read from root at
    its native resolution (res is then unused)."""
    if name == "scenes":
        return SceneEvalDataset(res, 100 if n is None else n)
    if name in DATASETS and root is None:
        raise UserError(f"evaluation on {name} needs the dataset root "
                        f"(the extracted Marigold evaluation set)")
    return EvalDataset(name, root, None, n)


# -----------------------------------------------------------------------------
# Training from your own data: a jsonl manifest, or tar shards


def _depth_format(ext: str, fmt, scale, where: str) -> tuple[str, float | None]:
    """Resolve (depth_format, depth_scale) of a user depth file; `where` prefixes errors."""
    number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if scale is not None and not (number and scale > 0):
        raise UserError(f"{where}: \"depth_scale\" must be a positive number (metres per unit), "
                        f"got {scale!r}")
    if fmt is None:
        if ext == ".npy":
            fmt = "npy"
        elif ext == ".png" and scale is not None:
            fmt = "png16"
        elif ext == ".png":
            raise UserError(f"{where}: a 16-bit PNG depth needs \"depth_scale\" (metres per unit, e.g. 0.001 "
                            f"for millimetres) or a \"depth_format\" (kitti, nyu, scannet)")
        else:
            raise UserError(f"{where}: can't tell the depth format of a {ext or 'extension-less'} file; "
                            f"give \"depth_format\" ({', '.join(DEPTH_FORMATS)})")
    if fmt not in DEPTH_FORMATS:
        raise UserError(f"{where}: unknown \"depth_format\" {fmt!r}; "
                        f"expected one of {', '.join(DEPTH_FORMATS)}")
    if fmt == "png16" and scale is None:
        raise UserError(f"{where}: \"depth_format\" png16 needs \"depth_scale\" (metres per unit)")
    return fmt, None if scale is None else float(scale)


def _parse_manifest(path: str) -> list[dict]:
    """Read and check every line of a jsonl manifest -> rows with absolute paths."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: manifest not found (expected a .jsonl file, one JSON object per line)")
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object like {{\"image\": ..., \"caption\": ...}}")
            image, caption = row.get("image"), row.get("caption")
            if not isinstance(image, str) or not image:
                raise UserError(f"{where}: missing \"image\" (path to an RGB image)")
            if not isinstance(caption, str):
                raise UserError(f"{where}: missing \"caption\" (a string, may be empty)")
            image = os.path.join(base, image)  # join keeps absolute paths as they are
            if not os.path.isfile(image):
                raise UserError(f"{where}: image file not found: {image}")
            out = {"image": image, "caption": caption,
                   "depth": None, "depth_format": None, "depth_scale": None}
            if row.get("depth") is not None:
                if not isinstance(row["depth"], str):
                    raise UserError(f"{where}: \"depth\" must be a path")
                depth = os.path.join(base, row["depth"])
                if not os.path.isfile(depth):
                    raise UserError(f"{where}: depth file not found: {depth}")
                fmt, scale = _depth_format(os.path.splitext(depth)[1].lower(), row.get("depth_format"),
                                           row.get("depth_scale"), where)
                out.update(depth=depth, depth_format=fmt, depth_scale=scale)
            rows.append(out)
    if not rows:
        raise UserError(f"{path}: manifest has no rows")
    return rows


def _no_depth(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Depth of an image-only sample (text-to-image pre-training): nothing is valid."""
    return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=bool)


class ManifestDataset(torch.utils.data.Dataset):
    """Your images (and optional depth) listed in a jsonl manifest, one object per line:
    {"image": path, "caption": str, "depth": optional path, "depth_format": optional read_depth
    format, "depth_scale": optional metres per unit of a 16-bit PNG}. Relative paths are relative
    to the manifest's folder. Every line is checked when the dataset is built. Items are the
    SceneDataset dict; image-only rows have zero depth and no valid pixel."""

    def __init__(self, path: str, res: int, sparse: str = "none", density: float = 0.05):
        _check_sparse(sparse, density)
        self.rows = _parse_manifest(path)
        self.res, self.sparse, self.density = res, sparse, density

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        rgb = load_image(row["image"])
        if row["depth"] is None:
            depth, valid = _no_depth(rgb.shape[:2])
        else:
            depth, valid = read_depth(row["depth"], row["depth_format"], scale=row["depth_scale"])
        return _to_sample(rgb, depth, valid, row["caption"], i, self.res, self.sparse, self.density,
                          _mask_rng(i), row["depth"] or row["image"])


IMAGE_EXTS = ("jpg", "jpeg", "png")


def _shard_paths(pattern_or_paths) -> list[str]:
    """A glob pattern, a folder of .tar files, or a list of paths -> sorted existing shard paths."""
    if isinstance(pattern_or_paths, str):
        if os.path.isdir(pattern_or_paths):
            paths = sorted(glob.glob(os.path.join(pattern_or_paths, "*.tar")))
        else:
            paths = sorted(glob.glob(pattern_or_paths))
        if not paths:
            raise UserError(f"{pattern_or_paths}: no tar shards found "
                            f"(expected a folder or a glob like data/shard-*.tar)")
    else:
        paths = [str(p) for p in pattern_or_paths]
        if not paths:
            raise UserError("no tar shards given")
    for p in paths:
        if not os.path.isfile(p) or not tarfile.is_tarfile(p):
            raise UserError(f"{p}: not a readable tar shard")
    return paths


def _tar_samples(tar: tarfile.TarFile):
    """Yield (key, {extension: TarInfo}) for runs of members sharing a key ("dir/000001" for
    dir/000001.jpg, dir/000001.depth.png, ...), reading headers only, not file contents."""
    key, group = None, {}
    for info in tar:
        if not info.isfile():
            continue
        folder, base = os.path.split(info.name)
        stem, _, ext = base.partition(".")
        k = f"{folder}/{stem}" if folder else stem
        if k != key and group:
            yield key, group
            group = {}
        key = k
        group[ext.lower()] = info
    if group:
        yield key, group


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples streamed from tar shards (webdataset-style: files sharing a key form one sample:
    key.jpg|png image, key.txt caption, optional key.depth.png|key.depth.npy, optional key.json
    {"depth_scale": metres per unit, "depth_format": ...}).

    Shard i goes to rank i % world_size; with fewer shards than ranks, samples are dealt out
    round-robin instead. Within a rank, DataLoader workers take turns sample by sample. The order
    is fixed; `start` skips that many samples of this rank's stream (to resume), and loop=True
    repeats the shards forever. Items are the SceneDataset dict ("index" = position in the stream).
    """

    def __init__(self, pattern_or_paths, res: int, rank: int = 0, world_size: int = 1, sparse: str = "none",
                 density: float = 0.05, start: int = 0, loop: bool = True):
        _check_sparse(sparse, density)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.shards = _shard_paths(pattern_or_paths)
        self.res, self.rank, self.world_size = res, rank, world_size
        self.sparse, self.density, self.start, self.loop = sparse, density, start, loop

    def _rank_stream(self):
        """This rank's samples in order (forever if looping): (open tar, shard, key, members, epoch)."""
        by_shard = len(self.shards) >= self.world_size
        shards = self.shards[self.rank::self.world_size] if by_shard else self.shards
        epoch = 0
        while True:
            count = 0
            for shard in shards:
                with tarfile.open(shard) as tar:
                    for key, members in _tar_samples(tar):
                        if by_shard or count % self.world_size == self.rank:
                            yield tar, shard, key, members, epoch
                        count += 1
            if count == 0:
                raise UserError(f"{', '.join(shards)}: shards hold no samples")
            epoch += 1
            if not self.loop:
                return

    def _decode(self, tar: tarfile.TarFile, shard: str, key: str, members: dict, position: int,
                epoch: int) -> dict:
        """One sample's files -> the training dict."""
        where = f"{shard}:{key}"

        def read(ext: str) -> bytes:
            return tar.extractfile(members[ext]).read()

        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if image_ext is None:
            raise UserError(f"{where}: sample has no image (.jpg or .png)")
        rgb = np.asarray(_open_image(io.BytesIO(read(image_ext)), f"{where}.{image_ext}").convert("RGB"))
        caption = read("txt").decode("utf-8", errors="replace").strip() if "txt" in members else ""
        meta = {}
        if "json" in members:
            try:
                meta = json.loads(read("json"))
            except json.JSONDecodeError as e:
                raise UserError(f"{where}.json: not valid JSON ({e.msg})") from None
        depth_ext = next((e for e in ("depth.png", "depth.npy") if e in members), None)
        if depth_ext is None:
            depth, valid = _no_depth(rgb.shape[:2])
        else:
            fmt, scale = _depth_format("." + depth_ext.split(".")[-1], meta.get("depth_format"),
                                       meta.get("depth_scale"), f"{where}.json")
            depth, valid = _decode_depth(io.BytesIO(read(depth_ext)), fmt, f"{where}.{depth_ext}", scale)
        # The sparse mask depends on the sample and the epoch, not on how samples are dealt to ranks.
        seed = zlib.crc32(f"{os.path.basename(shard)}/{key}".encode())
        return _to_sample(rgb, depth, valid, caption, position, self.res, self.sparse, self.density,
                          _mask_rng(seed, epoch), where)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position, (tar, shard, key, members, epoch) in enumerate(self._rank_stream()):
            if position >= self.start and (position - self.start) % n_workers == worker:
                yield self._decode(tar, shard, key, members, position, epoch)


DATA_KINDS = ("scenes", "manifest", "shards")


def make_dataset(kind: str, res: int, sparse: str, density: float, path: str | None, *,
                 rank: int = 0, world_size: int = 1, start: int = 0) -> torch.utils.data.Dataset:
    """The training dataset for --data kind: "scenes" (built in), "manifest" (jsonl) or "shards"."""
    if kind not in DATA_KINDS:
        raise UserError(f"unknown data kind {kind!r}; expected one of {', '.join(DATA_KINDS)}")
    if kind == "scenes":
        return SceneDataset(res, "train", sparse, density)
    if path is None:
        what = "a .jsonl manifest" if kind == "manifest" else "tar shards"
        raise UserError(f"--data {kind} needs a path ({what})")
    if kind == "manifest":
        return ManifestDataset(path, res, sparse, density)
    return ShardDataset(path, res, rank, world_size, sparse, density, start)


# -----------------------------------------------------------------------------
# Command line: look at the built-in data
# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Write one procedural scene as files: rgb.png, depth.npy (metres, 0 = sky), depth.png,
    lidar.png (the sparse LiDAR-like mask) and caption.txt."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Export a procedural scene (RGB, exact depth, caption, LiDAR mask).")
    p.add_argument("--scene", type=int, default=0, help="scene number within the split")
    p.add_argument("--split", default="train", choices=["train", "test"], help="test = held-out scenes")
    p.add_argument("--res", type=int, default=64, help="image size in pixels")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    args = p.parse_args(argv)
    try:
        if args.res < 8 or args.scene < 0:
            raise UserError("--res must be >= 8 and --scene >= 0")
        if os.path.isdir(args.out) and os.listdir(args.out):
            raise UserError(f"output directory {args.out} exists and is not empty")
    except UserError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    index = args.scene + (TEST_OFFSET if args.split == "test" else 0)
    scene = render_scene(index, args.res)
    lidar = lidar_mask(scene["valid"], _mask_rng(index))
    os.makedirs(args.out, exist_ok=True)
    save_png(os.path.join(args.out, "rgb.png"), scene["rgb"])
    _atomic_write(os.path.join(args.out, "depth.npy"), lambda tmp: np.save(tmp, scene["depth"]))
    save_png(os.path.join(args.out, "depth.png"), colorize_depth(scene["depth"], scene["valid"]))
    save_png(os.path.join(args.out, "lidar.png"), lidar.astype(np.uint8) * 255)
    with open(os.path.join(args.out, "caption.txt"), "w") as fh:
        fh.write(scene["caption"] + "\n")
    print(f"scene {index}: {scene['caption']}")
    for name in ("rgb.png", "depth.npy", "depth.png", "lidar.png", "caption.txt"):
        print(f"{name}: {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
