"""sample.py: output files of every mode, batch work, the point cloud, the viewer page and bad input."""
import base64
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import data
import pointcloud
import viewer
from helpers import assert_user_error, run_cli, train_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_tiny(str(tmp_path_factory.mktemp("ckpt") / "run"), "--stage", "mofo", steps=1)


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like uint8 (h, w, 3) picture: colour gradients, a brighter block, sensor noise."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([200 * x, 180 * y, 120 + 100 * x * y], -1)
    img[h // 4:h // 2, w // 3:w // 2] += 50
    return (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)


def page_cloud(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The points a viewer page embeds: (xyz (N, 3) float32, rgb (N, 3) uint8)."""
    xyz, rgb = re.findall(r'bytes\("([A-Za-z0-9+/=]*)"\)', open(path).read())
    return (np.frombuffer(base64.b64decode(xyz), "<f4").reshape(-1, 3),
            np.frombuffer(base64.b64decode(rgb), np.uint8).reshape(-1, 3))


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
    assert np.asarray(Image.open(os.path.join(out, "rgb.png"))).shape == (32, 32, 3)
    header, rec = read_ply(os.path.join(out, "cloud.ply"))
    assert "binary_little_endian" in header and f"element vertex {len(rec)}" in header
    meta = json.load(open(os.path.join(out, "metadata.json")))
    # depth the model cannot place is marked (inf / NaN) and counted, the rest is positive
    placed = np.isfinite(depth)
    assert (depth[placed] > 0).all() and (~placed).sum() == sum(meta["marked_pixels"].values())
    assert meta["seed"] == 0 and meta["args"]["mode"] == "joint" and meta["cfg_scale"] == 3.0
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
    # The holes are completed (never the injected noise) and the given pixels kept; pixels the model
    # cannot place are marked (inf / NaN, grey in depth.png), never clamped.
    known = np.isfinite(depth) & (depth > 0)
    got = np.load(os.path.join(out, "depth.npy"))
    meta = json.load(open(os.path.join(out, "metadata.json")))
    given = (depth * 1000).astype(np.uint16) * 1e-3 if fmt == "png16" else depth  # the PNG holds millimetres
    assert np.allclose(got[known], given[known], rtol=1e-5)
    marked = ~np.isfinite(got)
    assert marked.sum() == sum(meta["marked_pixels"].values()) and not (marked & known).any()
    assert (got[~known & ~marked] > 0).all()
    assert (np.asarray(Image.open(os.path.join(out, "depth.png")))[marked] == 128).all()  # grey


def test_batch_over_a_folder(ckpt, tmp_path):
    """Photo-like inputs of every kind and size in one folder, one of them unreadable: each other one
    gets its own subfolder at its own size and a viewer page; the bad one is reported and skipped."""
    src, rng = tmp_path / "photos", np.random.default_rng(0)
    src.mkdir()
    Image.fromarray(photo(rng, 40, 40)).save(src / "square.png")
    Image.fromarray(photo(rng, 48, 30)).save(src / "portrait.jpg", quality=90)
    Image.fromarray(photo(rng, 24, 64)).save(src / "landscape.bmp")
    Image.fromarray(photo(rng, 36, 36)[..., 1]).save(src / "gray.png")
    Image.fromarray(np.dstack([photo(rng, 30, 45), np.full((30, 45), 200, np.uint8)])).save(src / "rgba.png")
    Image.fromarray(photo(rng, 20, 28)[..., 0].astype(np.uint16) * 257).save(src / "deep16.png")  # 16-bit
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned 90 degrees clockwise, so 20 x 50 stored is 50 x 20 upright
    Image.fromarray(photo(rng, 20, 50)).save(src / "exif.jpg", exif=exif)
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "notes.txt").write_text("not an image: left alone")
    out = str(tmp_path / "out")
    proc = run_cli("sample.py", "--ckpt", ckpt, "--mode", "i2d", "--image", str(src), "--steps", "2",
                   "--batch-size", "3", "--seed", "5", "--out", out, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "broken.jpg" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    shapes = {"deep16": (20, 28), "exif": (50, 20), "gray": (36, 36), "landscape": (24, 64),
              "portrait": (48, 30), "rgba": (30, 45), "square": (40, 40)}
    assert sorted(os.listdir(out)) == sorted(shapes)
    assert len(re.findall(r"^\[\d/8\] \w+\.\w+ -> .+: [\d.]+ s", proc.stdout, re.M)) == 7
    assert "done: 7 of 8" in proc.stdout and "1 failed: broken.jpg" in proc.stdout
    for index, name in enumerate(["broken"] + sorted(shapes)):  # items in file-name order
        if name == "broken":
            continue
        folder = os.path.join(out, name)
        assert np.load(os.path.join(folder, "depth.npy")).shape == shapes[name]
        assert np.asarray(Image.open(os.path.join(folder, "rgb.png"))).shape == shapes[name] + (3,)
        meta = json.load(open(os.path.join(folder, "metadata.json")))
        assert meta["index"] == index and meta["seed"] == 5 + index
        xyz, rgb = page_cloud(os.path.join(folder, "index.html"))
        assert len(xyz) == len(rgb) == meta["cloud_points"] > 0 and np.isfinite(xyz).all()


def test_prompts_file_and_item_seeds(ckpt, tmp_path):
    """--prompts: one subfolder per prompt (index_slug); item i of a batch is the single run with seed + i."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red sphere\n\nA blue box, on grass!\na green cone\n")
    out = str(tmp_path / "out")
    proc = run_cli("sample.py", "--ckpt", ckpt, "--prompts", str(prompts), "--steps", "2", "--seed", "3",
                   "--batch-size", "2", "--out", out)
    assert sorted(os.listdir(out)) == ["000_a_red_sphere", "001_a_blue_box_on_grass", "002_a_green_cone"]
    assert "done: 3 of 3" in proc.stdout
    one = str(tmp_path / "one")
    run_cli("sample.py", "--ckpt", ckpt, "--prompt", "A blue box, on grass!", "--steps", "2", "--seed", "4",
            "--out", one)
    meta = json.load(open(os.path.join(out, "001_a_blue_box_on_grass", "metadata.json")))
    assert meta["seed"] == 4 and meta["prompt"] == "A blue box, on grass!" and meta["batch_size"] == 2
    batched, alone = (np.asarray(Image.open(os.path.join(d, "rgb.png"))).astype(int)
                      for d in (os.path.join(out, "001_a_blue_box_on_grass"), one))
    assert np.abs(batched - alone).max() <= 1


def test_i2d_completion_pairs_files_by_stem(ckpt, tmp_path):
    """Sparse metric depth beside each image (paired by stem): the known pixels are kept and the model's
    relative depth is scaled to them; an image without a depth file is reported and skipped. (The
    untrained model's depth elsewhere is meaningless, so only the fit is checked there.)"""
    images, depths, rng = tmp_path / "images", tmp_path / "depths", np.random.default_rng(1)
    images.mkdir(), depths.mkdir()
    sparse = {}
    for name, (h, w) in {"a": (32, 32), "b": (24, 40), "c": (40, 30)}.items():
        Image.fromarray(photo(rng, h, w)).save(images / f"{name}.png")
        floor = np.linspace(9.0, 2.0, h, dtype=np.float32)[:, None].repeat(w, 1)  # 9 m away at the top
        sparse[name] = np.where(np.arange(h)[:, None] % 4 == 0, floor, 0)  # LiDAR-like scan lines
    np.save(depths / "a.npy", sparse["a"])
    Image.fromarray((sparse["b"] * 1000).astype(np.uint16)).save(depths / "b.png")  # millimetres
    out = str(tmp_path / "out")
    proc = run_cli("sample.py", "--ckpt", ckpt, "--mode", "i2d", "--image", str(images), "--depth", str(depths),
                   "--steps", "2", "--out", out, check=False)
    assert proc.returncode == 1 and "c.png" in proc.stderr and "no depth file" in proc.stderr
    assert sorted(os.listdir(out)) == ["a", "b"]
    for name in ("a", "b"):
        depth, given = np.load(os.path.join(out, name, "depth.npy")), sparse[name]
        known = given > 0
        ratio = depth[known] / given[known]  # b.png holds whole millimetres
        assert np.isclose(np.median(ratio), 1.0, rtol=1e-3) and np.allclose(ratio, 1.0, rtol=1e-3)
        assert (depth[np.isfinite(depth)] > 0).all()  # an untrained model leaves much unplaced (NaN)
        meta = json.load(open(os.path.join(out, name, "metadata.json")))
        assert meta["known_pixels"] == known.sum() and meta["depth"].startswith("metric")
    # At the model's resolution the sampler keeps the known pixels exactly (in relative units, mean 1),
    # so the least-squares scale is their mean and the fit is exact.
    meta = json.load(open(os.path.join(out, "a", "metadata.json")))
    assert np.isclose(meta["depth_scale"], sparse["a"][sparse["a"] > 0].mean(), rtol=1e-3)
    assert meta["depth_fit_rms"] < 1e-3


def test_viewer_page_is_self_contained(tmp_path):
    """Pictures and points inline, nothing fetched, at most MAX_POINTS points."""
    rng = np.random.default_rng(0)
    n = viewer.MAX_POINTS + 1000
    xyz, col = rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 256, (n, 3), dtype=np.uint8)
    path = str(tmp_path / "index.html")
    viewer.write(path, photo(rng, 30, 40), photo(rng, 30, 40), xyz, col, title="<b>")
    page = open(path).read()
    assert not re.search(r"https?:", page) and page.count("data:image/png;base64,") == 2
    assert "<b>" not in page  # the title is escaped
    got_xyz, got_col = page_cloud(path)
    assert len(got_xyz) == len(got_col) == viewer.MAX_POINTS
    assert np.isin(got_xyz[:, 0], xyz[:, 0]).all()  # a subsample of the given points


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_viewer_draws_the_cloud_in_chromium(tmp_path):
    """Headless Chromium with software WebGL: the canvas shows the cloud. The points are magenta and the
    pictures grey, so magenta pixels in the screenshot can only be the cloud."""
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(20000, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)  # a sphere
    grey = np.full((16, 16, 3), 90, np.uint8)
    page, shot = tmp_path / "index.html", tmp_path / "shot.png"
    viewer.write(str(page), grey, grey, xyz.astype(np.float32), np.full((20000, 3), (255, 0, 255), np.uint8))
    subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--enable-unsafe-swiftshader",
                    "--use-angle=swiftshader", f"--screenshot={shot}", "--window-size=800,500", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    canvas = img[:, 260:]  # the side panel takes 28 % of the width, the canvas the rest
    magenta = (canvas[..., 0] > 200) & (canvas[..., 1] < 60) & (canvas[..., 2] > 200)
    background = (np.abs(canvas - 22) < 4).all(-1)
    assert 0.05 < magenta.mean() < 0.9 and background.mean() > 0.05, (magenta.mean(), background.mean())


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
                                  "depth_8bit", "no_prompt", "empty_folder", "prompt_and_prompts"])
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
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args += ["--mode", "i2d", "--image", str(tmp_path / "empty")]
        want = "no input files"
    elif case == "prompt_and_prompts":
        (tmp_path / "p.txt").write_text("a cone\n")
        args += ["--prompts", str(tmp_path / "p.txt")]
        want = "--prompts"
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
    assert np.array_equal(png, data.colorize_depth(depth, unknown=(128, 128, 128)))


@pytest.mark.slow
def test_compiled_sampler_matches_eager(ckpt, tmp_path):
    """--compile (reduce-overhead on a GPU) warms up on the first batch, then gives the eager image
    (opt-in: compiling the model takes about a CPU-minute)."""
    outs = {}
    for flag in ([], ["--compile"]):
        out = str(tmp_path / ("c" if flag else "e"))
        run_cli("sample.py", "--ckpt", ckpt, "--prompt", "a cone", "--steps", "2", "--out", out, *flag)
        outs[bool(flag)] = (np.asarray(Image.open(os.path.join(out, "rgb.png"))),
                            json.load(open(os.path.join(out, "metadata.json")))["timings_s"])
    assert np.abs(outs[True][0].astype(int) - outs[False][0].astype(int)).max() <= 1
    assert outs[True][1]["warmup"] > 0 and outs[False][1]["warmup"] == 0
    assert set(outs[True][1]) == {"checkpoint", "load", "warmup", "denoise", "write"}
