"""Tests of the procedural scenes (scenes.py) and of data.py's sparse masks, datasets, tokenizer,
image helpers and command line."""
import hashlib
import math
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import scenes
from helpers import assert_user_error, run_cli


def scene_hash(index: int, res: int) -> str:
    s = scenes.render_scene(index, res)
    h = hashlib.sha256()
    for key in ("rgb", "depth", "valid"):
        h.update(np.ascontiguousarray(s[key]).tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Procedural scenes


def test_scene_is_deterministic_and_scenes_differ():
    a, b = scenes.render_scene(5, 32), scenes.render_scene(5, 32)
    for key in ("rgb", "depth", "valid"):
        assert np.array_equal(a[key], b[key])
    assert a["caption"] == b["caption"]
    c = scenes.render_scene(6, 32)
    assert not np.array_equal(a["rgb"], c["rgb"])


def test_scene_is_identical_in_a_fresh_process():
    code = ("import hashlib, numpy as np, scenes; s = scenes.render_scene(3, 48); h = hashlib.sha256()\n"
            "for k in ('rgb', 'depth', 'valid'): h.update(np.ascontiguousarray(s[k]).tobytes())\n"
            "print(h.hexdigest())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                         check=True)
    assert out.stdout.strip() == scene_hash(3, 48)


def test_scenes_are_pinned():
    """The renderer's output, bit for bit: changing it changes every scene of every run."""
    got = [scene_hash(i, res)[:16] for i, res in ((0, 32), (7, 48), (scenes.TEST_OFFSET + 1, 64))]
    assert got == ["1f94ff5bc29f88ce", "7d96b3be3fd54724", "a12baeca66206199"]


def test_scene_arrays_shapes_and_depth_validity():
    for index in range(12):
        s = scenes.render_scene(index, 32)
        assert s["rgb"].shape == (32, 32, 3) and s["rgb"].dtype == np.uint8
        assert s["depth"].shape == (32, 32) and s["depth"].dtype == np.float32
        assert s["valid"].dtype == bool
        d, v = s["depth"], s["valid"]
        assert np.all(np.isfinite(d)) and np.all(d[v] > 0) and np.all(d[~v] == 0)
        assert v[-1].all(), "the bottom row looks at the ground"
        assert (~v[0]).mean() > 0.5, "the top row is mostly sky (pitch < fov / 2)"
        assert 45 <= s["fov_deg"] <= 75


def test_same_geometry_at_every_resolution():
    lo, hi = scenes.render_scene(9, 32), scenes.render_scene(9, 96)
    assert lo["caption"] == hi["caption"] and lo["fov_deg"] == hi["fov_deg"]
    assert abs(lo["valid"].mean() - hi["valid"].mean()) < 0.05
    # 96 = 3 x 32: the centre of each 3x3 block of the big image is the centre of a small pixel
    assert np.allclose(lo["depth"], hi["depth"][1::3, 1::3], rtol=1e-6)


def test_ground_depth_is_exact_z_depth():
    scene = scenes.sample_scene(2)
    scene.objects = []
    res = 33
    s = scenes.render(scene, res)
    a = math.tan(math.radians(scene.fov_deg) / 2)
    yn = -(((np.arange(res) + 0.5) / res) * 2 - 1) * a
    dy = yn * math.cos(scene.pitch) - math.sin(scene.pitch)      # world up-component of each row's ray
    expect = np.where(dy < 0, -scene.cam_height / np.where(dy < 0, dy, -1), 0)
    rows = s["valid"].all(axis=1)
    assert rows.sum() > 5
    assert np.allclose(s["depth"][rows], expect[rows, None].astype(np.float32), rtol=1e-6)


def test_sphere_depth_is_exact():
    scene = scenes.sample_scene(0)
    scene.pitch, scene.cam_height = 0.0, 0.5
    scene.objects = [scenes.Primitive("sphere", "red", "medium", 0.0, 4.0, (0.5, 0.5, 0.5))]
    s = scenes.render(scene, 33)                       # odd: the centre pixel looks straight ahead
    assert s["depth"][16, 16] == pytest.approx(3.5, rel=1e-6)
    assert tuple(s["rgb"][16, 16]) != tuple(s["rgb"][16, 1])


def test_caption_matches_scene_parameters():
    for index in range(60):
        scene = scenes.sample_scene(index)
        cap = scene.caption
        assert 1 <= len(scene.objects) <= 4
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" in cap
        present = {o.colour for o in scene.objects}
        assert {c for c in scenes.COLOURS if f" {c} " in f" {cap} "} == present
        assert cap.endswith(scenes.FLOORS[scene.floor])
        if len(scene.objects) > 1:
            assert any(r in cap for r in ("left of", "right of", "in front of", "behind"))
        assert cap == cap.lower()


def test_relations_follow_positions():
    a = scenes.Primitive("sphere", "red", "medium", -2.0, 5.0, (0.4,) * 3)
    b = scenes.Primitive("box", "blue", "large", 1.0, 5.5, (0.5,) * 3)
    c = scenes.Primitive("cone", "green", "small", 1.2, 9.0, (0.3, 0.6, 0.3))
    assert scenes._relation(a, b) == "left of" and scenes._relation(b, a) == "right of"
    assert scenes._relation(c, b) == "behind" and scenes._relation(b, c) == "in front of"
    assert scenes._caption([a, b], "grassy") == "a red sphere left of a large blue box on grass"


def test_scene_captions_match_renders():
    caps = scenes.scene_captions(5)
    assert caps == [scenes.render_scene(i, 16)["caption"] for i in range(5)]


def test_render_speed(capsys):
    times = {}
    for res, n in ((32, 20), (64, 10), (256, 3)):
        scenes.render_scene(0, res)
        t = time.perf_counter()
        for i in range(n):
            scenes.render_scene(i, res)
        times[res] = (time.perf_counter() - t) / n * 1000
    with capsys.disabled():
        print("\nrender ms/scene: " + ", ".join(f"{r}^2 {ms:.1f}" for r, ms in times.items()))


# -----------------------------------------------------------------------------
# Sparse depth


@pytest.mark.parametrize("res", [32, 64, 128])
def test_lidar_mask_is_sparse_line_like_subset(res):
    for index in range(6):
        valid = scenes.render_scene(index, res)["valid"]
        mask = data.lidar_mask(valid, np.random.default_rng(index))
        assert mask.dtype == bool and mask.shape == valid.shape
        assert not (mask & ~valid).any()
        assert 0 < mask.sum() <= 0.05 * res * res
        assert len(np.unique(np.nonzero(mask)[0])) <= res // 4, "points lie on a few scan lines"


def test_lidar_mask_respects_budget_with_many_lines():
    valid = np.ones((40, 40), dtype=bool)
    mask = data.lidar_mask(valid, np.random.default_rng(0), n_lines=30)
    assert mask.sum() <= 0.05 * 40 * 40


def test_random_mask_density():
    valid = np.ones((256, 256), dtype=bool)
    valid[:50] = False
    mask = data.random_mask(valid, 0.1, np.random.default_rng(0))
    assert not (mask & ~valid).any()
    assert abs(mask[valid].mean() - 0.1) < 0.01


def test_sparsify_kinds():
    valid = scenes.render_scene(1, 32)["valid"]
    assert np.array_equal(data.sparsify(valid, "none", np.random.default_rng(0)), valid)
    with pytest.raises(data.UserError, match="sparse depth kind"):
        data.sparsify(valid, "grid", np.random.default_rng(0))


# -----------------------------------------------------------------------------
# SceneDataset


def test_scene_dataset_items():
    ds = data.SceneDataset(32, sparse="lidar", length=10)
    assert len(ds) == 10 and len(data.SceneDataset(32)) == 2 ** 30
    item = ds[3]
    assert set(item) == {"rgb", "depth", "valid", "dense_valid", "caption", "index"}
    assert item["rgb"].shape == (3, 32, 32) and item["rgb"].dtype == torch.float32
    assert item["rgb"].min() >= -1 and item["rgb"].max() <= 1
    assert item["depth"].shape == (32, 32) and item["depth"].dtype == torch.float32
    assert item["valid"].dtype == torch.bool and item["dense_valid"].dtype == torch.bool
    assert not (item["valid"] & ~item["dense_valid"]).any()
    assert item["valid"].sum() < item["dense_valid"].sum()
    assert (item["depth"][item["dense_valid"]] > 0).all() and (item["depth"][~item["dense_valid"]] == 0).all()
    assert item["index"] == 3 and isinstance(item["caption"], str)
    again = pickle.loads(pickle.dumps(ds))[3]
    for key in ("rgb", "depth", "valid", "dense_valid"):
        assert torch.equal(item[key], again[key])
    with pytest.raises(IndexError):
        ds[10]


def test_train_and_test_splits_are_disjoint():
    train, test = data.SceneDataset(32, "train"), data.SceneDataset(32, "test")
    assert test[0]["index"] == scenes.TEST_OFFSET and train[0]["index"] == 0
    assert not torch.equal(train[0]["rgb"], test[0]["rgb"])
    with pytest.raises(data.UserError):
        data.SceneDataset(32, "val")


def test_dataloader_batches():
    loader = torch.utils.data.DataLoader(data.SceneDataset(16, sparse="random", length=4), batch_size=4)
    batch = next(iter(loader))
    assert batch["rgb"].shape == (4, 3, 16, 16) and len(batch["caption"]) == 4


# -----------------------------------------------------------------------------
# Tokenizer


def test_tokenizer(tmp_path):
    texts = scenes.scene_captions(200)
    tok = data.train_tokenizer(texts, vocab_size=512)
    assert tok.token_to_id("<pad>") == 0 and tok.get_vocab_size() <= 512
    assert data.train_tokenizer(texts, vocab_size=512).get_vocab() == tok.get_vocab()
    ids = data.encode_text(tok, ["", texts[0], "A RED Sphere", "a red sphere"], 24)
    assert ids.shape == (4, 24) and ids.dtype == torch.long
    assert (ids[0] == 0).all()
    n = int((ids[1] != 0).sum())
    assert 0 < n < 24 and (ids[1, n:] == 0).all()
    assert torch.equal(ids[2], ids[3])
    short = data.encode_text(tok, [texts[0]], 3)
    assert short.shape == (1, 3) and (short != 0).all() and torch.equal(short[0], ids[1, :3])
    path = str(tmp_path / "tok.json")
    data.save_tokenizer(tok, path)
    loaded = data.load_tokenizer(path)
    assert torch.equal(data.encode_text(loaded, texts[:8], 32), data.encode_text(tok, texts[:8], 32))
    with pytest.raises(data.UserError, match="not found"):
        data.load_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(data.UserError, match="not a valid tokenizer"):
        data.load_tokenizer(str(tmp_path / "bad.json"))


# -----------------------------------------------------------------------------
# Image helpers


def test_letterbox_and_undo_round_trip():
    H, W = 40, 80
    ramp = np.tile(np.linspace(1.0, 5.0, W, dtype=np.float32), (H, 1))
    out, box = data.resize_image(ramp, 32, "letterbox")
    assert out.shape == (32, 32) and box == (8, 0, 16, 32)
    assert (out[:8] == 0).all() and (out[24:] == 0).all()
    back = data.undo_letterbox(out, box, (H, W))
    assert back.shape == (H, W) and back.dtype == np.float32
    assert np.abs(back - ramp)[:, 2:-2].max() < 0.1


def test_resize_modes_and_dtypes():
    img = np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8)
    for mode in data.RESIZE_MODES:
        out, box = data.resize_image(img, 16, mode)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert data.resize_image(img, 16, "crop")[1] == (0, 0, 16, 16)
    depth = np.full((30, 60), 2.0, np.float32)
    depth[:, 30:] = 7.0
    near = data.resize_image(depth, 16, "crop", nearest=True)[0]
    assert set(np.unique(near)) <= {2.0, 7.0}, "nearest never invents in-between depths"
    mask = data.resize_image(depth > 5, 16, "letterbox", nearest=True)[0]
    assert mask.dtype == bool and mask.any()
    with pytest.raises(data.UserError, match="resize mode"):
        data.resize_image(img, 16, "zoom")


def test_colorize_depth_near_is_brighter():
    depth = np.tile(np.linspace(1.0, 20.0, 64, dtype=np.float32), (8, 1))
    valid = np.ones_like(depth, dtype=bool)
    valid[:, :4] = False
    pic = data.colorize_depth(depth, valid)
    assert pic.shape == (8, 64, 3) and pic.dtype == np.uint8
    assert (pic[:, :4] == 0).all()
    brightness = pic.astype(int).sum(axis=2)[0]
    assert brightness[5] > brightness[30] > brightness[-1]
    assert data.COLORMAP_LUT.shape == (256, 3)
    assert (np.diff(data.COLORMAP_LUT.astype(int).sum(axis=1)) >= 0).all()
    assert (data.colorize_depth(np.zeros((4, 4))) == 0).all()


def test_save_png_is_atomic_and_loadable(tmp_path):
    img = scenes.render_scene(0, 16)["rgb"]
    path = str(tmp_path / "sub" / "x.png")
    data.save_png(path, img)
    assert np.array_equal(data.load_image(path), img)
    assert os.listdir(tmp_path / "sub") == ["x.png"]
    with pytest.raises(ValueError):
        data.save_png(path, img.astype(np.float32))


# -----------------------------------------------------------------------------
# Command line


def test_cli_exports_a_held_out_scene(tmp_path):
    out = str(tmp_path / "scene")
    proc = run_cli("data.py", "--scene", "0", "--split", "test", "--res", "16", "--out", out)
    scene = scenes.render_scene(scenes.TEST_OFFSET, 16)
    assert proc.stdout.splitlines()[0] == f"test scene 0 (index {scenes.TEST_OFFSET}): {scene['caption']}"
    assert sorted(os.listdir(out)) == ["caption.txt", "depth.npy", "depth.png", "lidar.png", "rgb.png"]
    assert np.array_equal(np.load(os.path.join(out, "depth.npy")), scene["depth"])
    assert_user_error(run_cli("data.py", "--out", out, check=False), "data.py: error:", "not empty")
