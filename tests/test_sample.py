"""sample.py: output files of every mode, the point cloud, and bad input."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import data
import pointcloud
from helpers import assert_user_error, run_cli, train_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_tiny(str(tmp_path_factory.mktemp("ckpt") / "run"), "--stage", "mofo", steps=1)


def read_ply(path: str) -> tuple[str, np.ndarray]:
    raw = open(path, "rb").read()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii")
    rec = np.frombuffer(raw[end:], dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                          ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    return header, rec


def test_joint_writes_every_output(ckpt, tmp_path):
    out = str(tmp_path / "joint")
    proc = run_cli("sample.py", "--ckpt", ckpt, "--prompt", "a red sphere", "--mode", "joint",
                   "--steps", "3", "--out", out, "--refine-depth")
    for name in ("rgb.png", "depth.npy", "depth.png", "cloud.ply", "metadata.json"):
        assert os.path.isfile(os.path.join(out, name)) and name in proc.stdout
    depth = np.load(os.path.join(out, "depth.npy"))
    assert depth.dtype == np.float32 and depth.shape == (32, 32)
    assert np.isfinite(depth).all() and (depth > 0).all()
    assert np.asarray(Image.open(os.path.join(out, "rgb.png"))).shape == (32, 32, 3)
    header, rec = read_ply(os.path.join(out, "cloud.ply"))
    assert "binary_little_endian" in header and f"element vertex {len(rec)}" in header
    meta = json.load(open(os.path.join(out, "metadata.json")))
    assert meta["seed"] == 0 and meta["args"]["mode"] == "joint" and meta["cfg_scale"] == 4.0
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_i2d_any_image_size(ckpt, tmp_path):
    img = (np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "in.jpg")
    out = str(tmp_path / "i2d")
    run_cli("sample.py", "--ckpt", ckpt, "--mode", "i2d", "--image", str(tmp_path / "in.jpg"), "--steps", "2",
            "--out", out)
    assert np.load(os.path.join(out, "depth.npy")).shape == (30, 50)
    assert np.asarray(Image.open(os.path.join(out, "rgb.png"))).shape == (30, 50, 3)


@pytest.mark.parametrize("fmt", ["npy", "png16"])
def test_d2i_inputs_with_holes(ckpt, tmp_path, fmt):
    depth = np.random.default_rng(0).uniform(1, 5, (32, 32)).astype(np.float32)
    depth[:4] = 0
    if fmt == "npy":
        depth[5, 5], depth[6, 6] = np.nan, np.inf
        path = str(tmp_path / "d.npy")
        np.save(path, depth)
    else:
        path = str(tmp_path / "d.png")
        Image.fromarray((depth * 1000).astype(np.uint16)).save(path)
    out = str(tmp_path / "d2i")
    run_cli("sample.py", "--ckpt", ckpt, "--mode", "d2i", "--depth", path, "--prompt", "a box", "--steps", "2",
            "--out", out)
    assert np.asarray(Image.open(os.path.join(out, "rgb.png"))).shape == (32, 32, 3)


def test_point_cloud_geometry():
    """A fronto-parallel plane back-projects to points at z = -d; a step edge is removed."""
    depth = np.full((8, 512), 2.0, np.float32)
    rgb = np.zeros((8, 512, 3), np.uint8)
    xyz, col = pointcloud.point_cloud(depth, rgb, 90.0, 0.04)
    assert len(xyz) == 8 * 512 and np.allclose(xyz[:, 2], 0)  # median-centred: all at the same depth
    assert np.isclose(xyz[:, 0].max() - xyz[:, 0].min(), 511 * 2 / 256)  # f = W/2 at 90 degrees
    depth[:, 256:] = 4.0
    xyz, _ = pointcloud.point_cloud(depth, rgb, 90.0, 0.04)
    assert len(xyz) == 8 * 512 - 16  # columns 255 and 256 straddle the step
    assert len(pointcloud.point_cloud(depth, rgb, 90.0, 0.0)[0]) == 8 * 512


def test_edge_filter_scales_with_resolution():
    """At 32 px a smooth ground plane keeps its points; a real step is still removed."""
    rows = np.linspace(8.0, 2.0, 32, dtype=np.float32)[:, None].repeat(32, 1)  # a floor receding upwards
    rgb = np.zeros((32, 32, 3), np.uint8)
    assert len(pointcloud.point_cloud(rows, rgb, 65.0, 0.04)[0]) == 32 * 32
    rows[:, 16:] *= 4
    assert len(pointcloud.point_cloud(rows, rgb, 65.0, 0.04)[0]) < 32 * 32


@pytest.mark.parametrize("case", ["missing_ckpt", "bad_image", "no_image", "bad_res", "out_exists",
                                  "depth_8bit", "no_prompt"])
def test_bad_input(ckpt, tmp_path, case):
    out = str(tmp_path / "out")
    args = ["--ckpt", ckpt, "--prompt", "x", "--steps", "1", "--out", out]
    if case == "missing_ckpt":
        args[1], want = str(tmp_path / "nope"), "nope"
    elif case == "bad_image":
        (tmp_path / "bad.png").write_bytes(b"not an image")
        args += ["--mode", "i2d", "--image", str(tmp_path / "bad.png")]
        want = "bad.png"
    elif case == "no_image":
        args += ["--mode", "i2d"]
        want = "--image"
    elif case == "bad_res":
        args += ["--res", "30"]
        want = "--res"
    elif case == "out_exists":
        os.makedirs(out)
        open(os.path.join(out, "keep.txt"), "w").write("mine")
        want = "not empty"
    elif case == "depth_8bit":
        Image.fromarray(np.full((8, 8), 9, np.uint8)).save(tmp_path / "d8.png")
        args += ["--mode", "d2i", "--depth", str(tmp_path / "d8.png")]
        want = "d8.png"
    else:
        args = ["--ckpt", ckpt, "--out", out]
        want = "--prompt"
    assert_user_error(run_cli("sample.py", *args, check=False), want)
    if case == "out_exists":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_colorize_is_used_for_depth_png(ckpt, tmp_path):
    out = str(tmp_path / "j")
    run_cli("sample.py", "--ckpt", ckpt, "--prompt", "a cone", "--steps", "2", "--out", out)
    depth = np.load(os.path.join(out, "depth.npy"))
    png = np.asarray(Image.open(os.path.join(out, "depth.png")))
    assert np.array_equal(png, data.colorize_depth(depth))
