"""Tests of the readers for real data: depth encodings, jsonl manifests and tar shards (data.py)
and the evaluation sets (evalsets.py). Every fixture is a tiny file written here in the real
encoding."""
import io
import json
import math
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evalsets
import scenes
from common import save_png


def write_rgb(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return img


def depth_ramp(h, w, lo=0.5, hi=12.0):
    return np.tile(np.linspace(lo, hi, w), (h, 1)).astype(np.float64)


def write_depth_png16(path: str, depth_m: np.ndarray, scale: float) -> None:
    """Metres as a 16-bit PNG of round(depth / scale); invalid (<= 0, non-finite) pixels are 0."""
    d = np.asarray(depth_m, dtype=np.float64)
    ok = np.isfinite(d) & (d > 0)
    units = np.zeros(d.shape, dtype=np.uint16)
    units[ok] = np.clip(np.rint(d[ok] / scale), 0, 65535)
    save_png(path, units)


# -----------------------------------------------------------------------------
# Depth readers


@pytest.mark.parametrize("fmt,scale", [("kitti", 1 / 256), ("nyu", 1e-3), ("scannet", 1e-3)])
def test_png16_formats_round_trip(tmp_path, fmt, scale):
    gt = depth_ramp(6, 9)
    gt[2, 3] = 0.0                      # a hole
    path = str(tmp_path / "d.png")
    write_depth_png16(path, gt, scale)
    depth, valid = data.read_depth(path, fmt)
    assert depth.dtype == np.float32 and valid.dtype == bool and depth.shape == (6, 9)
    assert not valid[2, 3] and depth[2, 3] == 0
    assert np.abs(depth[valid] - gt[valid]).max() <= scale / 2 + 1e-6


def test_png16_with_explicit_scale(tmp_path):
    path = str(tmp_path / "d.png")
    write_depth_png16(path, np.full((4, 4), 3.0), 0.01)
    depth, valid = data.read_depth(path, "png16", scale=0.01)
    assert valid.all() and np.allclose(depth, 3.0)
    with pytest.raises(data.UserError, match="scale"):
        data.read_depth(path, "png16")


def test_npy_round_trip_and_invalid_values(tmp_path):
    gt = depth_ramp(5, 7)
    gt[0, 0], gt[1, 1], gt[2, 2] = np.nan, np.inf, -1.0
    path = str(tmp_path / "d.npy")
    np.save(path, gt[..., None].astype(np.float32))          # H x W x 1 is accepted
    depth, valid = data.read_depth(path, "npy")
    assert depth.shape == (5, 7)
    assert not valid[0, 0] and not valid[1, 1] and not valid[2, 2]
    assert (depth[~valid] == 0).all() and np.allclose(depth[valid], gt[valid])


def test_diode_uses_mask_beside_depth(tmp_path):
    gt = depth_ramp(4, 6, 1.0, 30.0)
    mask = np.ones((4, 6), dtype=np.float32)
    mask[:, :2] = 0
    np.save(tmp_path / "x_depth.npy", gt[..., None].astype(np.float32))
    np.save(tmp_path / "x_depth_mask.npy", mask)
    depth, valid = data.read_depth(str(tmp_path / "x_depth.npy"), "diode")
    assert not valid[:, :2].any() and valid[:, 2:].all()
    assert np.allclose(depth[:, 2:], gt[:, 2:]) and (depth[:, :2] == 0).all()


def test_diode_without_mask_is_rejected(tmp_path):
    np.save(tmp_path / "y_depth.npy", np.ones((4, 6), np.float32))
    with pytest.raises(data.UserError, match="y_depth_mask.npy"):
        data.read_depth(str(tmp_path / "y_depth.npy"), "diode")


def test_eth3d_raw_float32(tmp_path):
    gt = depth_ramp(6, 8).astype("<f4")
    gt[0, :3] = np.inf
    path = str(tmp_path / "DSC_0001.JPG")       # ETH3D depth files really carry a .JPG name
    gt.tofile(path)
    depth, valid = data.read_depth(path, "eth3d", shape=(6, 8))
    assert not valid[0, :3].any() and (depth[0, :3] == 0).all()
    assert np.array_equal(depth[valid], gt[valid])
    with pytest.raises(data.UserError, match=r"float32 8x5 \(160 bytes\), got 192 bytes"):
        data.read_depth(path, "eth3d", shape=(5, 8))
    with pytest.raises(data.UserError, match="6048x4032"):
        data.read_depth(path, "eth3d")


def test_8bit_png_is_rejected_as_16bit(tmp_path):
    path = str(tmp_path / "d8.png")
    Image.fromarray(np.full((4, 4), 100, np.uint8)).save(path)
    with pytest.raises(data.UserError, match="16-bit.*8-bit"):
        data.read_depth(path, "kitti")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(data.UserError, match="16-bit.*8-bit"):
        data.read_depth(path, "nyu")


def test_bad_files_are_rejected_with_clear_messages(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(data.UserError, match="junk.png: cannot decode image"):
        data.read_depth(str(junk), "kitti")
    with pytest.raises(data.UserError, match="junk.png: cannot decode image"):
        data.load_image(str(junk))
    bad_npy = tmp_path / "junk.npy"
    bad_npy.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(data.UserError, match="not a readable .npy"):
        data.read_depth(str(bad_npy), "npy")
    np.save(tmp_path / "ints.npy", np.ones((3, 3), np.int32))
    with pytest.raises(data.UserError, match="float depth array"):
        data.read_depth(str(tmp_path / "ints.npy"), "npy")
    np.save(tmp_path / "cube.npy", np.ones((3, 3, 3), np.float32))
    with pytest.raises(data.UserError, match=r"H x W.*\(3, 3, 3\)"):
        data.read_depth(str(tmp_path / "cube.npy"), "npy")
    with pytest.raises(data.UserError, match="missing.png: depth file not found"):
        data.read_depth(str(tmp_path / "missing.png"), "kitti")
    with pytest.raises(data.UserError, match="unknown depth format"):
        data.read_depth(str(junk), "tiff")
    with pytest.raises(data.UserError, match="file not found"):
        data.load_image(str(tmp_path / "nope.jpg"))


# -----------------------------------------------------------------------------
# Evaluation sets


def make_eval_tree(root, name, n=2, monkeypatch=None):
    """A tiny fake evaluation tree for `name` -> list of ground-truth depth arrays."""
    gts = []
    lines = []
    for i in range(n):
        if name == "nyu":
            h, w, rgb, dep = 480, 640, f"test/room/rgb_{i}.png", f"test/room/depth_{i}.png"
            gt = depth_ramp(h, w, 0.5, 12.0)                 # > 10 m on the right: out of range
            write_depth_png16(os.path.join(root, dep), gt, 1e-3)
            lines.append(f"{rgb} {dep} test/room/filled_{i}.png")
        elif name == "kitti":
            h, w = 375, 1242
            rgb, dep = f"2011_09_26/drive/image_02/data/{i:010d}.png", f"drive/groundtruth/{i:010d}.png"
            gt = depth_ramp(h, w, 2.0, 90.0)
            gt[::2] = 0                                       # sparse LiDAR-like holes
            write_depth_png16(os.path.join(root, dep), gt, 1 / 256)
            lines.append(f"{rgb} {dep} 721.5377")
            lines.append(f"2011_09_26/drive/image_02/data/{i + 100:010d}.png None 721.5377")
        elif name == "scannet":
            h, w, rgb, dep = 48, 64, f"scene0001_00/color/{i:06d}.jpg", f"scene0001_00/depth/{i:06d}.png"
            gt = depth_ramp(h, w, 0.5, 4.0)
            write_depth_png16(os.path.join(root, dep), gt, 1e-3)
            lines.append(f"{rgb} {dep}")
        elif name == "diode":
            h, w = 24, 32
            stem = f"indoors/scene_1/scan_1/{i:05d}"
            rgb, dep = stem + ".png", stem + "_depth.npy"
            gt = depth_ramp(h, w, 0.3, 5.0)
            mask = np.ones((h, w), np.uint8)
            mask[:4] = 0
            os.makedirs(os.path.join(root, os.path.dirname(dep)), exist_ok=True)
            np.save(os.path.join(root, dep), gt[..., None].astype(np.float32))
            np.save(os.path.join(root, stem + "_depth_mask.npy"), mask)
            lines.append(f"{rgb} {dep} {stem}_depth_mask.npy")
            gt = np.where(mask > 0, gt, 0)
        else:  # eth3d, at a small shape patched in for the test
            h, w = data.ETH3D_SHAPE
            rgb = f"rgb/office/images/dslr_images/DSC_{i:04d}.JPG"
            dep = f"depth/office/dslr_images/DSC_{i:04d}.JPG"
            gt = depth_ramp(h, w)
            gt[0] = np.inf
            os.makedirs(os.path.dirname(os.path.join(root, dep)), exist_ok=True)
            gt.astype("<f4").tofile(os.path.join(root, dep))
        write_rgb(os.path.join(root, rgb), h, w, seed=i)
        if name == "eth3d":
            lines.append(f"{rgb} {dep}")
        gts.append(gt)
    split = os.path.basename(evalsets.DATASETS[name]["split"])
    with open(os.path.join(root, split), "w") as f:
        f.write("\n".join(lines) + "\n")
    return gts


def test_eval_nyu_eigen_crop_and_range(tmp_path):
    root = str(tmp_path / "nyu")
    gts = make_eval_tree(root, "nyu")
    ds = evalsets.EvalDataset("nyu", root)
    assert len(ds) == 2
    item = ds[1]
    assert item["rgb"].shape == (480, 640, 3) and item["rgb"].dtype == np.uint8
    assert item["depth"].shape == (480, 640) and item["valid"].dtype == bool
    assert item["name"] == "test/room/rgb_1.png" and (item["min_depth"], item["max_depth"]) == (1e-3, 10.0)
    v = item["valid"]
    assert not v[:45].any() and not v[471:].any() and not v[:, :41].any() and not v[:, 601:].any()
    assert not (item["depth"][v] >= 10.0).any()
    assert v[45:471, 41:100].all()
    assert np.abs(item["depth"][v] - gts[1][v]).max() < 1e-3
    assert len(evalsets.EvalDataset("nyu", root, n=1)) == 1


def test_eval_kitti_benchmark_crop_and_eigen_mask(tmp_path):
    root = str(tmp_path / "kitti")
    make_eval_tree(root, "kitti")
    ds = evalsets.EvalDataset("kitti", root)
    assert len(ds) == 2, "rows whose depth is None are skipped"
    item = ds[0]
    assert item["rgb"].shape == (352, 1216, 3) and item["depth"].shape == (352, 1216)
    v = item["valid"]
    top, bottom = int(0.3324324 * 352), int(0.91351351 * 352)
    left, right = int(0.0359477 * 1216), int(0.96405229 * 1216)
    assert not v[:top].any() and not v[bottom:].any() and not v[:, :left].any() and not v[:, right:].any()
    assert v[top:bottom, left:right].any() and not (item["depth"][v] >= 80).any()
    # the crop is the bottom rows, centred columns: compare with the raw image
    raw = data.load_image(os.path.join(root, ds.items[0][0]))
    assert np.array_equal(item["rgb"], raw[375 - 352:, 13:13 + 1216])


def test_eval_scannet_and_split_under_data_split(tmp_path):
    root = str(tmp_path / "scannet")
    make_eval_tree(root, "scannet", n=3)
    split = evalsets.DATASETS["scannet"]["split"]
    os.makedirs(os.path.join(root, os.path.dirname(split)))
    os.rename(os.path.join(root, os.path.basename(split)), os.path.join(root, split))
    ds = evalsets.EvalDataset("scannet", root)
    assert len(ds) == 3 and ds[2]["valid"].all()


def test_eval_diode_mask(tmp_path):
    root = str(tmp_path / "diode")
    make_eval_tree(root, "diode")
    item = evalsets.EvalDataset("diode", root)[0]
    assert not item["valid"][:4].any()
    assert (item["valid"][4:] == (item["depth"][4:] > 0.6)).all()


def test_eval_eth3d(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "ETH3D_SHAPE", (12, 18))
    root = str(tmp_path / "eth3d")
    make_eval_tree(root, "eth3d")
    item = evalsets.EvalDataset("eth3d", root)[1]
    assert item["depth"].shape == (12, 18) and not item["valid"][0].any() and item["valid"][1:].all()
    assert item["max_depth"] == math.inf


def test_eval_dataset_errors(tmp_path):
    with pytest.raises(data.UserError, match="evaluation data not found"):
        evalsets.EvalDataset("nyu", str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.UserError, match="filename_list_test.txt"):
        evalsets.EvalDataset("nyu", str(empty))
    with pytest.raises(data.UserError, match="unknown evaluation dataset"):
        evalsets.EvalDataset("middlebury", str(empty))
    (empty / "list.txt").write_text("a.png b.png\n")
    with pytest.raises(data.UserError, match="2 files listed in list.txt are missing"):
        evalsets.EvalDataset("scannet", str(empty), split_file=str(empty / "list.txt"))
    (empty / "short.txt").write_text("only_one_column.png\n")
    with pytest.raises(data.UserError, match="short.txt:1: expected"):
        evalsets.EvalDataset("scannet", str(empty), split_file=str(empty / "short.txt"))
    with pytest.raises(data.UserError, match="needs the dataset root"):
        evalsets.get_eval_dataset("kitti", None, None, 32)


def test_scene_eval_dataset():
    ds = evalsets.get_eval_dataset("scenes", None, 3, 32)
    assert len(ds) == 3
    item = ds[0]
    assert item["rgb"].shape == (32, 32, 3) and item["rgb"].dtype == np.uint8
    assert item["valid"].any() and (item["depth"][item["valid"]] > 0).all()
    assert item["name"] == f"scene_{scenes.TEST_OFFSET}" and item["max_depth"] == math.inf
    assert np.array_equal(item["rgb"], scenes.render_scene(scenes.TEST_OFFSET, 32)["rgb"])


def test_manifest_eval_set(tmp_path):
    img = write_rgb(str(tmp_path / "x.png"), 16, 16)
    np.save(tmp_path / "d.npy", depth_ramp(16, 16).astype(np.float32))
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "x.png", "caption": "", "depth": "d.npy"}) + "\n")
    item = evalsets.get_eval_dataset("manifest", str(tmp_path / "m.jsonl"), None, 16)[0]
    assert np.array_equal(item["rgb"], img), "a square image at the model resolution comes back unchanged"
    assert item["valid"].all() and np.allclose(item["depth"], depth_ramp(16, 16))
    assert (item["name"], item["min_depth"], item["max_depth"]) == ("0", 1e-5, math.inf)
    with pytest.raises(data.UserError, match="needs --root"):
        evalsets.get_eval_dataset("manifest", None, None, 16)


# -----------------------------------------------------------------------------
# Manifest datasets


def test_manifest_mixed_rows(tmp_path):
    write_rgb(str(tmp_path / "imgs" / "a.jpg"), 40, 60)
    write_rgb(str(tmp_path / "imgs" / "b.png"), 30, 30)
    write_rgb(str(tmp_path / "imgs" / "c.png"), 50, 50)
    np.save(tmp_path / "imgs" / "b.npy", np.full((30, 30), 2.5, np.float32))
    write_depth_png16(str(tmp_path / "imgs" / "c.png16.png"), np.full((25, 25), 4.0), 0.001)
    rows = [{"image": "imgs/a.jpg", "caption": "image only"},
            {"image": "imgs/b.png", "caption": "npy depth", "depth": "imgs/b.npy"},
            {"image": str(tmp_path / "imgs" / "c.png"), "caption": "png depth", "depth": "imgs/c.png16.png",
             "depth_scale": 0.001}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = data.ManifestDataset(str(tmp_path / "m.jsonl"), 16, sparse="random", density=0.5)
    assert len(ds) == 3 and ds.rows[1]["caption"] == "npy depth"
    a, b, c = ds[0], ds[1], ds[2]
    assert a["rgb"].shape == (3, 16, 16) and not a["dense_valid"].any() and (a["depth"] == 0).all()
    assert b["dense_valid"].all() and torch.allclose(b["depth"], torch.tensor(2.5))
    assert 0 < b["valid"].sum() < 256 and not (b["valid"] & ~b["dense_valid"]).any()
    assert c["dense_valid"].all() and torch.allclose(c["depth"], torch.tensor(4.0))
    assert c["index"] == 2 and c["caption"] == "png depth"
    assert torch.equal(ds[1]["valid"], b["valid"]), "sparsification is seeded by the index"


@pytest.mark.parametrize("line,message", [
    ('{"image": "x.png", "caption": "ok"}\n{"image": "x.png", "caption": ', r"m.jsonl:2: not valid JSON"),
    ('{"caption": "no image"}', r"m.jsonl:1: missing \"image\""),
    ('{"image": "x.png"}', r"m.jsonl:1: missing \"caption\""),
    ('{"image": "gone.png", "caption": ""}', r"m.jsonl:1: image file not found"),
    ('{"image": "x.png", "caption": "", "depth": "d.png"}',
     r"m.jsonl:1: a 16-bit PNG depth needs \"depth_scale\""),
    ('{"image": "x.png", "caption": "", "depth": "d.png", "depth_scale": -1}', "positive number"),
    ('{"image": "x.png", "caption": "", "depth": "d.png", "depth_format": "exr"}',
     "unknown \"depth_format\""),
    ('[1, 2]', r"m.jsonl:1: expected a JSON object"),
])
def test_manifest_bad_lines(tmp_path, line, message):
    write_rgb(str(tmp_path / "x.png"), 8, 8)
    write_depth_png16(str(tmp_path / "d.png"), np.ones((8, 8)), 0.001)
    (tmp_path / "m.jsonl").write_text(line + "\n")
    with pytest.raises(data.UserError, match=message):
        data.ManifestDataset(str(tmp_path / "m.jsonl"), 16)


def test_manifest_missing_and_aspect_mismatch(tmp_path):
    with pytest.raises(data.UserError, match="manifest not found"):
        data.ManifestDataset(str(tmp_path / "none.jsonl"), 16)
    write_rgb(str(tmp_path / "x.png"), 20, 40)
    np.save(tmp_path / "d.npy", np.ones((20, 20), np.float32))
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "x.png", "caption": "", "depth": "d.npy"}) + "\n")
    ds = data.ManifestDataset(str(tmp_path / "m.jsonl"), 16)
    with pytest.raises(data.UserError, match="different aspect ratios"):
        ds[0]


# -----------------------------------------------------------------------------
# Tar shards


def add_file(tar, name, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder, n_shards=3, per_shard=4) -> list[str]:
    """Shards of samples with captions "s{shard}-{k}": image-only, npy depth and PNG depth mixed."""
    paths = []
    for s in range(n_shards):
        path = os.path.join(folder, f"shard-{s:03d}.tar")
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard):
                key = f"{s:03d}{k:03d}"
                add_file(tar, f"{key}.png", png_bytes(np.full((12, 16, 3), 10 * k, np.uint8)))
                add_file(tar, f"{key}.txt", f"s{s}-{k}".encode())
                if k % 3 == 1:
                    buf = io.BytesIO()
                    np.save(buf, np.full((12, 16), 1.5, np.float32))
                    add_file(tar, f"{key}.depth.npy", buf.getvalue())
                elif k % 3 == 2:
                    add_file(tar, f"{key}.depth.png", png_bytes(np.full((12, 16), 3000, np.uint16)))
                    add_file(tar, f"{key}.json", json.dumps({"depth_scale": 0.001}).encode())
        paths.append(path)
    return paths


def captions(ds) -> list[str]:
    return [item["caption"] for item in ds]


def test_shards_items_and_depth(tmp_path):
    paths = write_shards(str(tmp_path))
    items = list(data.ShardDataset(paths, 8, loop=False))
    assert len(items) == 12 and items[0]["caption"] == "s0-0"
    assert items[0]["rgb"].shape == (3, 8, 8) and not items[0]["dense_valid"].any()
    assert torch.allclose(items[1]["depth"], torch.tensor(1.5)) and items[1]["valid"].all()
    assert torch.allclose(items[2]["depth"], torch.tensor(3.0)) and items[2]["valid"].all()
    assert [it["index"] for it in items] == list(range(12))
    same = list(data.ShardDataset(str(tmp_path / "shard-*.tar"), 8, loop=False))
    assert captions(same) == captions(items)


@pytest.mark.parametrize("world_size", [2, 4])
def test_shards_split_across_ranks(tmp_path, world_size):
    paths = write_shards(str(tmp_path))
    everything = captions(data.ShardDataset(paths, 8, loop=False))
    per_rank = [captions(data.ShardDataset(paths, 8, rank=r, world_size=world_size, loop=False))
                for r in range(world_size)]
    assert all(per_rank), "every rank gets samples"
    flat = [c for part in per_rank for c in part]
    assert len(flat) == len(set(flat)) and set(flat) == set(everything)
    if world_size == 2:  # 3 shards >= 2 ranks: whole shards per rank (0 and 2 to rank 0)
        assert per_rank[1] == [f"s1-{k}" for k in range(4)]


def test_shards_start_and_loop(tmp_path):
    paths = write_shards(str(tmp_path))
    everything = captions(data.ShardDataset(paths, 8, loop=False))
    assert captions(data.ShardDataset(paths, 8, start=5, loop=False)) == everything[5:]
    looped = data.ShardDataset(paths, 8, start=10, loop=True)
    first = [item["caption"] for _, item in zip(range(6), looped)]
    assert first == everything[10:] + everything[:4]


def test_shards_with_dataloader_workers(tmp_path):
    paths = write_shards(str(tmp_path))
    ds = data.ShardDataset(paths, 8, loop=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = [item["caption"] for item in loader]
    assert sorted(got) == sorted(captions(data.ShardDataset(paths, 8, loop=False)))


def test_shard_errors(tmp_path):
    with pytest.raises(data.UserError, match="no tar shards found"):
        data.ShardDataset(str(tmp_path / "*.tar"), 8)
    (tmp_path / "fake.tar").write_bytes(b"not a tar")
    with pytest.raises(data.UserError, match="not a readable tar shard"):
        data.ShardDataset([str(tmp_path / "fake.tar")], 8)
    path = str(tmp_path / "nodepthscale.tar")
    with tarfile.open(path, "w") as tar:
        add_file(tar, "a.png", png_bytes(np.zeros((4, 4, 3), np.uint8)))
        add_file(tar, "a.depth.png", png_bytes(np.ones((4, 4), np.uint16)))
    with pytest.raises(data.UserError, match="depth_scale"):
        next(iter(data.ShardDataset([path], 8, loop=False)))


def test_make_dataset(tmp_path):
    assert isinstance(data.make_dataset("scenes", 16, "lidar", 0.05, None), data.SceneDataset)
    paths = write_shards(str(tmp_path))
    ds = data.make_dataset("shards", 8, "none", 0.05, str(tmp_path / "shard-*.tar"), rank=1, world_size=2)
    assert next(iter(ds))["caption"] == "s1-0" and len(paths) == 3
    with pytest.raises(data.UserError, match="needs a path"):
        data.make_dataset("manifest", 16, "none", 0.05, None)
    with pytest.raises(data.UserError, match="unknown data kind"):
        data.make_dataset("webdataset", 16, "none", 0.05, "x")
    with pytest.raises(data.UserError, match="sparse depth kind"):
        data.make_dataset("scenes", 16, "dense", 0.05, None)
