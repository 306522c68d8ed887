"""
Data for mofo: image / depth I/O, sparse-depth masks, the caption tokenizer and the training
datasets: the built-in procedural scenes (rendered by scenes.py), or your own images listed in a
jsonl manifest or packed in tar shards.

Conventions used everywhere in this file:
- depth is z-depth in metres (distance along the optical axis), float32, 0 where invalid;
- `valid` says which depth pixels carry ground truth (bool, same H x W as the depth);
- arrays are uint8 (H, W, 3) RGB; samples handed to the model hold float32 (3, H, W) in [-1, 1];
- every failure caused by a user's file or path raises UserError with a one-line message.

`python data.py --scene N [--split test] --out DIR` writes one procedural scene as files.
"""
from __future__ import annotations

import argparse
import glob
import io
import itertools
import json
import os
import tarfile
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

# UserError, save_png and the depth colour map are also used as data.<name>
from common import (COLORMAP_LUT, HelpFormatter, UserError, atomic_write, cli, colorize_depth, disparity_range, from_uint8,  # noqa: F401
                    save_png, staged_dir, write_text)
from scenes import TEST_OFFSET, render_scene


# -----------------------------------------------------------------------------
# Image I/O helpers


def _open_image(src, name: str) -> Image.Image:
    if isinstance(src, str) and not os.path.isfile(src):
        raise UserError(f"{name}: file not found (expected an image)")
    try:
        img = Image.open(src)
        img.load()
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise UserError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return img


def _rgb_array(img: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) RGB, upright as the EXIF orientation says. Palette, gray, alpha and CMYK
    images are converted; 16-bit images keep their top 8 bits."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    return np.asarray(img.convert("RGB")).copy()


def load_image(path: str) -> np.ndarray:
    return _rgb_array(_open_image(path, path))


def _resize(arr: np.ndarray, h: int, w: int, nearest: bool) -> np.ndarray:
    """Resize an (H, W[, C]) uint8 / bool / float array to (h, w[, C]) with Pillow: uint8 images with its
    antialiased bilinear filter (area-like when shrinking), everything else channel by channel through
    32-bit float ("F") images; bool masks with nearest."""
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
    Returns the array and the box (top, left, h, w) that the image content occupies in it."""
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
        raise UserError(f"{name}: expected a 16-bit single-channel PNG depth map, got a {bits} image (mode {img.mode})")
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
    inf = missing); "npy" float array in metres. Invalid pixels get depth 0."""
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
            raise UserError(f"{path}: DIODE depth needs its validity mask {os.path.basename(mask_path)} beside it")
        depth, valid = _decode_npy_depth(path, path)
        mask = _load_npy(mask_path, mask_path)
        if mask.shape != depth.shape:
            raise UserError(f"{mask_path}: mask shape {mask.shape} does not match depth shape {depth.shape}")
        return _checked(depth.astype(np.float64), valid & (mask > 0))
    return _decode_depth(path, fmt, path, scale)


def fit_scale(rel: np.ndarray, metric: np.ndarray, known: np.ndarray) -> tuple[float, float]:
    """Least-squares scale a with a * rel ~ metric on the known pixels -> (a, RMS residual in metric units)."""
    r, m = rel[known].astype(np.float64), metric[known].astype(np.float64)
    a = float((r * m).sum() / max((r * r).sum(), 1e-12))
    return a, float(np.sqrt(np.mean((a * r - m) ** 2)))


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
    "caption": str, "index": int}."""
    if abs(depth.shape[0] * rgb.shape[1] / (depth.shape[1] * rgb.shape[0]) - 1) > 0.01:
        raise UserError(f"{name}: depth {depth.shape[1]}x{depth.shape[0]} and image "
                        f"{rgb.shape[1]}x{rgb.shape[0]} have different aspect ratios")
    rgb = resize_image(rgb, res, "crop")[0]
    dense_valid = resize_image(dense_valid, res, "crop", nearest=True)[0]
    depth = np.where(dense_valid, resize_image(depth, res, "crop", nearest=True)[0], 0.0).astype(np.float32)
    valid = sparsify(dense_valid, sparse, rng, density)
    return {"rgb": from_uint8(rgb), "depth": torch.from_numpy(depth),
            "valid": torch.from_numpy(np.ascontiguousarray(valid)),
            "dense_valid": torch.from_numpy(np.ascontiguousarray(dense_valid)),
            "caption": caption, "index": int(index)}


def _check_sparse(sparse: str, density: float) -> None:
    if sparse not in SPARSE_KINDS:
        raise UserError(f"unknown sparse depth kind {sparse!r}; expected one of {', '.join(SPARSE_KINDS)}")
    if not 0.0 < density <= 1.0:
        raise UserError(f"sparse depth density must be in (0, 1], got {density}")


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
    atomic_write(path, tok.save)


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
# Training from your own data: a jsonl manifest, or tar shards


def _depth_format(ext: str, fmt, scale, where: str) -> tuple[str, float | None]:
    """Resolve (depth_format, depth_scale) of a user depth file; `where` prefixes errors."""
    number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if scale is not None and not (number and scale > 0):
        raise UserError(f"{where}: \"depth_scale\" must be a positive number (metres per unit), got {scale!r}")
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
        raise UserError(f"{where}: unknown \"depth_format\" {fmt!r}; expected one of {', '.join(DEPTH_FORMATS)}")
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
            out = {"image": image, "caption": caption, "depth": None, "depth_format": None, "depth_scale": None}
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


def _shard_paths(pattern_or_paths) -> list[str]:
    """A glob pattern, a folder of .tar files, or a list of paths -> sorted existing shard paths."""
    if isinstance(pattern_or_paths, str):
        folder = os.path.isdir(pattern_or_paths)
        paths = sorted(glob.glob(os.path.join(pattern_or_paths, "*.tar") if folder else pattern_or_paths))
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
    repeats the shards forever. Items are the SceneDataset dict ("index" = position in the stream)."""

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
        for epoch in itertools.count() if self.loop else [0]:
            count = 0
            for shard in shards:
                with tarfile.open(shard) as tar:
                    for key, members in _tar_samples(tar):
                        if by_shard or count % self.world_size == self.rank:
                            yield tar, shard, key, members, epoch
                        count += 1
            if count == 0:
                raise UserError(f"{', '.join(shards)}: shards hold no samples")

    def _decode(self, tar: tarfile.TarFile, shard: str, key: str, members: dict, position: int, epoch: int) -> dict:
        where = f"{shard}:{key}"

        def read(ext: str) -> bytes:
            return tar.extractfile(members[ext]).read()

        image_ext = next((e for e in ("jpg", "jpeg", "png") if e in members), None)
        if image_ext is None:
            raise UserError(f"{where}: sample has no image (.jpg or .png)")
        rgb = _rgb_array(_open_image(io.BytesIO(read(image_ext)), f"{where}.{image_ext}"))
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


def main(argv: list[str] | None = None) -> None:
    """Write one procedural scene as rgb.png, depth.npy (metres, 0 = sky), depth.png, lidar.png and caption.txt."""
    p = argparse.ArgumentParser(description="Export a procedural scene (RGB, exact depth, caption, LiDAR mask).",
                                epilog="example:\n  .venv/bin/python data.py --scene 3 --split test --res 64 --out scene3",
                                formatter_class=HelpFormatter)
    p.add_argument("--scene", type=int, default=0, help="scene number within the split")
    p.add_argument("--split", default="train", choices=["train", "test"], help="test = held-out scenes")
    p.add_argument("--res", type=int, default=64, help="image size in pixels")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    args = p.parse_args(argv)
    if args.res < 8 or args.scene < 0:
        raise UserError("--res must be >= 8 and --scene >= 0")
    index = args.scene + (TEST_OFFSET if args.split == "test" else 0)
    scene = render_scene(index, args.res)
    lidar = lidar_mask(scene["valid"], _mask_rng(index))
    with staged_dir(args.out) as tmp:
        save_png(os.path.join(tmp, "rgb.png"), scene["rgb"])
        np.save(os.path.join(tmp, "depth.npy"), scene["depth"])
        save_png(os.path.join(tmp, "depth.png"), colorize_depth(scene["depth"], scene["valid"]))
        save_png(os.path.join(tmp, "lidar.png"), lidar.astype(np.uint8) * 255)
        write_text(os.path.join(tmp, "caption.txt"), scene["caption"] + "\n")
    print(f"{args.split} scene {args.scene} (index {index}): {scene['caption']}")
    for name in ("rgb.png", "depth.npy", "depth.png", "lidar.png", "caption.txt"):
        print(f"{name}: {os.path.join(args.out, name)}")


if __name__ == "__main__":
    cli(main, "data.py")
