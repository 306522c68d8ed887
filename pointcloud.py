"""
Depth map -> coloured point cloud, written as PLY and glTF binary (GLB) with numpy only, and
shown in the sample folder's index.html (viewer.py).

Camera: a centred pinhole with focal length W / (2 tan(fov / 2)) in pixels. A pixel (u, v) at
depth d becomes X = (u + 0.5 - W/2) d / f, Y = (v + 0.5 - H/2) d / f, stored as (X, -Y, -d):
+Y up and the camera looking along -Z, as glTF expects. Pixels at depth discontinuities are
dropped (they would float between the surfaces), then the cloud is centred on its median.
"""
from __future__ import annotations

import json
import math
import os
import struct
import warnings

import numpy as np

import viewer
from common import atomic_write, save_png, write_bytes
from data import colorize_depth

MAX_POINTS = 1_200_000


def edge_mask(depth: np.ndarray, rtol: float) -> np.ndarray:
    """True where the 3x3 neighbourhood spans more than rtol * depth (a depth discontinuity).

    `rtol` is meant for 512-pixel maps; a smaller map covers more of the scene per pixel, so
    neighbouring depths differ more on a smooth surface and the tolerance grows with 512 / size.
    NaN (unknown) pixels are not edges themselves and do not make their neighbours edges."""
    if rtol <= 0:
        return np.zeros(depth.shape, bool)
    rtol = rtol * max(1.0, 512 / max(depth.shape))
    padded = np.pad(depth, 1, mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN window is no edge: NaN > x is False
        span = np.nanmax(win, (-2, -1)) - np.nanmin(win, (-2, -1)) if np.isnan(depth).any() else \
            win.max((-2, -1)) - win.min((-2, -1))
        return span > rtol * np.maximum(depth, 1e-6)


def back_project(depth: np.ndarray, rgb: np.ndarray, fov_deg: float, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Depth (H, W) -> (xyz (N, 3) float32 in the camera's frame, rgb (N, 3) uint8)."""
    H, W = depth.shape
    f = W / (2 * math.tan(math.radians(fov_deg) / 2))
    v, u = np.mgrid[0:H, 0:W]
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(depth) & (depth > 0) & ~edge_mask(depth, rtol)
    d = depth[ok]
    xyz = np.stack([(u[ok] + 0.5 - W / 2) * d / f, -(v[ok] + 0.5 - H / 2) * d / f, -d], -1)
    col = rgb[ok]
    if len(xyz) > MAX_POINTS:  # keep files manageable; seeded, so reruns match
        keep = np.random.default_rng(0).choice(len(xyz), MAX_POINTS, replace=False)
        xyz, col = xyz[keep], col[keep]
    return xyz.astype(np.float32), col.astype(np.uint8)


def centre(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(xyz minus its median, the median); the camera sits at minus the median afterwards."""
    mid = np.median(xyz, axis=0) if len(xyz) else np.zeros(3)
    return (xyz - mid).astype(np.float32), mid


def point_cloud(depth: np.ndarray, rgb: np.ndarray, fov_deg: float, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Back-project depth (H, W) -> (xyz (N, 3) float32, rgb (N, 3) uint8), median-centred."""
    xyz, col = back_project(depth, rgb, fov_deg, rtol)
    return centre(xyz)[0], col


def remove_outliers(xyz: np.ndarray, rgb: np.ndarray, k: int, std: float) -> tuple[np.ndarray, np.ndarray]:
    """Statistical outlier removal: keep points whose mean distance to their k nearest neighbours
    is at most mean + std * spread of that distance over the cloud (brute force, in chunks)."""
    n = len(xyz)
    if n <= k:
        return xyz, rgb
    sq = (xyz.astype(np.float64) ** 2).sum(1)
    mean_d = np.empty(n)
    for a in range(0, n, 1024):
        d2 = sq[a:a + 1024, None] + sq[None] - 2 * xyz[a:a + 1024].astype(np.float64) @ xyz.T.astype(np.float64)
        near = np.partition(np.maximum(d2, 0), k, axis=1)[:, 1:k + 1]  # column 0 is the point itself
        mean_d[a:a + 1024] = np.sqrt(near).mean(1)
    keep = mean_d <= mean_d.mean() + std * mean_d.std()
    return xyz[keep], rgb[keep]


def ply_bytes(xyz: np.ndarray, rgb: np.ndarray) -> bytes:
    rec = np.empty(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                    ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    rec["x"], rec["y"], rec["z"] = xyz.T
    rec["red"], rec["green"], rec["blue"] = rgb.T
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(xyz)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    return header.encode("ascii") + rec.tobytes()


def glb_bytes(xyz: np.ndarray, rgb: np.ndarray) -> bytes:
    """glTF 2.0 binary: one mesh primitive in POINTS mode, float32 positions, normalised uint8
    RGBA colours (COLOR_0; alpha 255 since glTF wants 4-byte aligned vertex attributes)."""
    n = len(xyz)
    pos = np.ascontiguousarray(xyz, dtype="<f4").tobytes()
    col = np.concatenate([rgb, np.full((n, 1), 255, np.uint8)], 1).tobytes()
    lo, hi = (xyz.min(0).tolist(), xyz.max(0).tolist()) if n else ([0.0] * 3, [0.0] * 3)
    gltf = {
        "asset": {"version": "2.0", "generator": "mofo"},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "COLOR_0": 1}, "mode": 0}]}],
        "buffers": [{"byteLength": len(pos) + len(col)}],
        "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": len(pos), "target": 34962},
                        {"buffer": 0, "byteOffset": len(pos), "byteLength": len(col), "target": 34962}],
        "accessors": [{"bufferView": 0, "componentType": 5126, "count": n, "type": "VEC3", "min": lo, "max": hi},
                      {"bufferView": 1, "componentType": 5121, "normalized": True, "count": n, "type": "VEC4"}],
    }
    js = json.dumps(gltf, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 4)
    binary = pos + col  # both lengths are multiples of 4
    return (struct.pack("<III", 0x46546C67, 2, 12 + 8 + len(js) + 8 + len(binary))
            + struct.pack("<II", len(js), 0x4E4F534A) + js + struct.pack("<II", len(binary), 0x004E4942) + binary)


def write_all(folder: str, depth: np.ndarray, rgb: np.ndarray, fov_deg: float, rtol: float,
              sor: tuple[int, float] | None = None, title: str = "mofo sample") -> tuple[dict[str, str], int, int]:
    """depth.npy, depth.png, cloud.ply, cloud.glb and the viewer page index.html into `folder`.
    Returns ({name: file name}, points in the cloud, known depth pixels)."""
    atomic_write(os.path.join(folder, "depth.npy"), lambda t: np.save(t, depth))
    depth_png = colorize_depth(depth, unknown=(128, 128, 128))
    save_png(os.path.join(folder, "depth.png"), depth_png)
    xyz, col = back_project(depth, rgb, fov_deg, rtol)
    xyz, mid = centre(xyz)
    if sor is not None:
        xyz, col = remove_outliers(xyz, col, *sor)
    write_bytes(os.path.join(folder, "cloud.ply"), ply_bytes(xyz, col))
    write_bytes(os.path.join(folder, "cloud.glb"), glb_bytes(xyz, col))
    viewer.write(os.path.join(folder, "index.html"), rgb, depth_png, xyz, col, title, eye=-mid, fov_deg=fov_deg)
    files = {"depth": "depth.npy", "depth_png": "depth.png", "cloud": "cloud.ply", "cloud_glb": "cloud.glb",
             "viewer": "index.html"}
    return files, len(xyz), int(np.isfinite(depth).sum())
