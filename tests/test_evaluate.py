"""Tests for evaluate.py: alignment, metrics, ensembling, baselines, and the CLI end to end."""
import argparse
import json
import math
import os

import numpy as np
import pytest

import adherence
import evaluate as ev
import scenes
from common import UserError
from evalsets import get_eval_dataset
from helpers import assert_user_error, run_cli, train_tiny


def _gt(h=6, w=5, seed=0):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.5, 10.0, size=(h, w))
    valid = np.ones((h, w), bool)
    valid[0, 0] = False
    return gt, valid


# -----------------------------------------------------------------------------
# alignment


def test_least_squares_recovers_scale_and_shift():
    gt, valid = _gt()
    a, b = 2.5, -0.7
    pred = (gt - b) / a
    pred[0, 0] = 1e3  # invalid pixel: must not influence the fit
    aligned = ev.align_depth(pred, gt, valid, "least_squares")
    np.testing.assert_allclose(aligned[valid], gt[valid], atol=1e-6)


def test_disparity_alignment_is_affine_in_inverse_depth():
    gt, valid = _gt()
    # a prediction whose *disparity* is an affine map of the GT disparity is recovered exactly...
    pred = 1.0 / (0.3 / gt + 0.05)
    aligned = ev.align_depth(pred, gt, valid, "least_squares_disparity")
    np.testing.assert_allclose(aligned[valid], gt[valid], rtol=1e-9)
    # ...while a depth-space affine map is not (it is not affine in disparity)
    aligned = ev.align_depth(gt * 2.0 + 3.0, gt, valid, "least_squares_disparity")
    assert np.abs(aligned[valid] - gt[valid]).max() > 1e-3


def _brute_abs_rel_cost(x, y):
    """The least sum |a x + b - y| / y over a >= 0: a weighted L1 fit is optimal at a line through two of
    the points, or, on the boundary a = 0, at a horizontal line through one."""
    best = min(np.sum(np.abs(yi - y) / y) for yi in y)
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            if x[i] != x[j]:
                a = (y[j] - y[i]) / (x[j] - x[i])
                if a >= 0:
                    best = min(best, np.sum(np.abs(a * x + y[i] - a * x[i] - y) / y))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_abs_rel_fit_matches_a_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.5, 20.0, 13)
    x = 0.3 * y + rng.normal(0, 1.0, 13) + 2.0
    a, b = ev._fit_abs_rel(x, y)
    assert a >= 0
    cost = np.sum(np.abs(a * x + b - y) / y)
    np.testing.assert_allclose(cost, _brute_abs_rel_cost(x, y), rtol=1e-7)
    # it minimises AbsRel, so least squares cannot do better on that measure
    a2, b2 = ev._fit_scale_shift(x, y)
    assert cost <= np.sum(np.abs(a2 * x + b2 - y) / y) + 1e-12


def test_abs_rel_fit_of_an_anticorrelated_prediction_is_a_shift_only():
    """The optimum on the boundary a = 0: the best the fit can do is the 1/y-weighted median of y."""
    y = np.random.default_rng(3).uniform(0.5, 10.0, 11)
    a, b = ev._fit_abs_rel(-y, y)
    assert a < 1e-9 * y.max()
    np.testing.assert_allclose(np.sum(np.abs(a * -y + b - y) / y), _brute_abs_rel_cost(-y, y), rtol=1e-9)


def test_abs_rel_alignment_recovers_affine_maps_despite_far_outliers():
    gt, valid = _gt()
    pred = (gt + 0.7) / 2.5
    far = gt > np.percentile(gt[valid], 95)
    pred[far] *= 3.0  # the farthest 5 %: least squares bends towards them, the AbsRel fit does not
    aligned = ev.align_depth(pred, gt, valid, "abs_rel")
    np.testing.assert_allclose(aligned[valid & ~far], gt[valid & ~far], rtol=1e-6)
    ls = ev.align_depth(pred, gt, valid, "least_squares")
    assert np.abs(ls[valid & ~far] / gt[valid & ~far] - 1).max() > 0.05
    # a constant prediction leaves only the shift: the 1/gt-weighted median of the GT
    const = ev.align_depth(np.ones_like(gt), gt, valid, "abs_rel")
    assert np.ptp(const) == 0 and np.isclose(const[0, 1], ev._weighted_median(gt[valid], 1 / gt[valid]))


def test_median_alignment_is_scale_invariant_only():
    gt, valid = _gt()
    aligned = ev.align_depth(gt * 0.13, gt, valid, "median")
    np.testing.assert_allclose(aligned[valid], gt[valid], rtol=1e-12)
    # a shift survives median alignment, so the result is not the GT
    aligned = ev.align_depth(gt + 1.0, gt, valid, "median")
    assert np.abs(aligned[valid] - gt[valid]).max() > 1e-3


def test_none_alignment_and_unknown_alignment():
    gt, valid = _gt()
    pred = gt * 3.0
    np.testing.assert_array_equal(ev.align_depth(pred, gt, valid, "none"), pred)
    with pytest.raises(ValueError, match="unknown alignment"):
        ev.align_depth(pred, gt, valid, "affine")
    with pytest.raises(ValueError, match="unknown alignment"):
        ev.depth_metrics(pred, gt, valid, alignment="least_square")


def test_empty_mask_is_a_clear_error():
    gt, _ = _gt()
    with pytest.raises(ValueError, match="empty valid mask"):
        ev.depth_metrics(gt, gt, np.zeros(gt.shape, bool))


# -----------------------------------------------------------------------------
# metrics


def test_metrics_hand_computed_2x2():
    gt = np.array([[1.0, 2.0], [4.0, 8.0]])
    pred = np.array([[1.0, 2.5], [3.0, 8.0]])
    m = ev.depth_metrics(pred, gt, np.ones((2, 2), bool), alignment="none")
    # errors 0, 0.5, -1, 0; ratios 1, 1.25, 4/3, 1
    assert m["abs_rel"] == pytest.approx((0 + 0.5 / 2 + 1 / 4 + 0) / 4)         # 0.125
    assert m["delta1"] == pytest.approx(0.5)  # 1.25 itself does not pass (strict <)
    assert m["delta2"] == pytest.approx(1.0) and m["delta3"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(math.sqrt((0.25 + 1.0) / 4))              # 0.5590
    assert m["sq_rel"] == pytest.approx((0.25 / 2 + 1.0 / 4) / 4)               # 0.09375
    assert m["log10"] == pytest.approx((math.log10(1.25) + math.log10(4 / 3)) / 4)
    assert set(m) == set(ev.METRIC_KEYS)


def test_metrics_clip_to_depth_range_and_ignore_invalid():
    gt = np.array([[1.0, 2.0], [4.0, 100.0]])
    pred = np.array([[1.0, 2.0], [9.0, -5.0]])
    valid = np.array([[True, True], [True, False]])
    m = ev.depth_metrics(pred, gt, valid, alignment="none", min_depth=0.5, max_depth=5.0)
    # 9 is clipped to 5 -> error 1 on gt 4; the invalid pixel (-5 vs 100) is ignored
    assert m["abs_rel"] == pytest.approx(0.25 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(1.0 / 3))
    assert m["delta1"] == pytest.approx(2 / 3)


def test_mean_metrics_is_per_image_not_pooled():
    # image A: 1x2, abs_rel 0.5 ; image B: 2x2, abs_rel 0  -> mean 0.25 (pooled would be 1/6)
    a = ev.depth_metrics(np.array([[1.5, 3.0]]), np.array([[1.0, 2.0]]),
                         np.ones((1, 2), bool), alignment="none")
    b = ev.depth_metrics(np.full((2, 2), 2.0), np.full((2, 2), 2.0),
                         np.ones((2, 2), bool), alignment="none")
    assert a["abs_rel"] == pytest.approx(0.5) and b["abs_rel"] == pytest.approx(0.0)
    mean = ev.mean_metrics([a, b])
    assert mean["abs_rel"] == pytest.approx(0.25)
    assert mean["delta1"] == pytest.approx((0.0 + 1.0) / 2)
    with pytest.raises(ValueError):
        ev.mean_metrics([])


def test_metrics_split_into_object_and_floor_pixels():
    gt = np.array([[1.0, 2.0], [4.0, 8.0]])
    pred = np.array([[1.0, 3.0], [4.0, 8.0]])          # error 0.5 on the object pixel only
    valid = np.array([[True, True], [True, False]])
    objects = np.array([[False, True], [False, True]])   # the invalid object pixel does not count
    m = ev.depth_metrics(pred, gt, valid, alignment="none", objects=objects)
    assert m["abs_rel_objects"] == pytest.approx(0.5) and m["abs_rel_floor"] == pytest.approx(0.0)
    assert m["abs_rel"] == pytest.approx(0.5 / 3)
    none = ev.depth_metrics(pred, gt, valid, alignment="none", objects=np.zeros((2, 2), bool))
    assert math.isnan(none["abs_rel_objects"]) and none["abs_rel_floor"] == pytest.approx(0.5 / 3)
    # an image without object pixels is left out of the objects' mean, not counted as 0 or NaN
    mean = ev.mean_metrics([m, none])
    assert mean["abs_rel_objects"] == pytest.approx(0.5) and mean["abs_rel_floor"] == pytest.approx(0.5 / 6)


def test_scene_object_mask_marks_what_stands_on_the_floor():
    res, index = 32, scenes.TEST_OFFSET + 3
    gt = scenes.render_scene(index, res)
    empty = ev.empty_scene_depth(index, res)
    objects = ev.scene_object_mask(gt["depth"], empty)
    valid = gt["valid"]
    assert 0 < objects[valid].mean() < 0.5
    # off the objects the scene is its empty floor; on them it is nearer than the floor behind
    np.testing.assert_allclose(gt["depth"][valid & ~objects], empty[valid & ~objects], rtol=1e-4)
    behind = valid & objects & (empty > 0)
    assert behind.any() and np.all(gt["depth"][behind] < empty[behind])


# -----------------------------------------------------------------------------
# ensembling


def test_paired_difference_hand_computed():
    # differences -0.1, +0.2, -0.4: mean -0.1, sample std sqrt(0.09) = 0.3, SE 0.3 / sqrt(3)
    d = ev.paired_difference([0.1, 0.5, 0.2], [0.2, 0.3, 0.6])
    assert d["mean"] == pytest.approx(-0.1) and d["se"] == pytest.approx(0.3 / math.sqrt(3))
    assert d["model_lower"] == pytest.approx(2 / 3)
    one = ev.paired_difference([0.3], [0.1])
    assert one == {"mean": pytest.approx(0.2), "se": 0.0, "model_lower": 0.0}


def test_ensemble_median_and_spread():
    rng = np.random.default_rng(1)
    base = rng.uniform(1.0, 5.0, size=(8, 9))
    # five members, each its own affine copy of the same map; one has a corrupted patch
    scales, shifts = [1.0, 2.0, 0.5, 3.0, 1.5], [0.0, 1.0, -0.2, 4.0, 0.3]
    preds = np.stack([s * base + t for s, t in zip(scales, shifts)])
    preds[3, :2, :2] += 50.0
    median, spread = ev.ensemble_depth(preds)
    # 4 of 5 members agree exactly in member 0's frame, so the median is member 0 itself
    np.testing.assert_allclose(median, preds[0], atol=1e-9)
    np.testing.assert_allclose(spread, 0.0, atol=1e-9)

    # members that disagree on a bump: the spread is large there and zero elsewhere
    bumps = np.zeros((4, 8, 9))
    bumps[:, 3:5, 3:5] = np.array([-1.0, 0.0, 1.0, 2.0])[:, None, None]
    mask = np.ones((8, 9), bool)
    mask[3:5, 3:5] = False  # fit the alignments only away from the bump
    median, spread = ev.ensemble_depth(base[None] + bumps, fit_mask=mask)
    np.testing.assert_allclose(median[mask], base[mask], atol=1e-9)
    np.testing.assert_allclose(spread[mask], 0.0, atol=1e-9)
    np.testing.assert_allclose(spread[3:5, 3:5], 1.0, atol=1e-9)  # MAD of (-1, 0, 1, 2) about 0.5

    # K = 1 is a no-op with zero spread
    median, spread = ev.ensemble_depth(base[None])
    np.testing.assert_allclose(median, base)
    assert spread.shape == base.shape and not spread.any()


# -----------------------------------------------------------------------------
# baselines


def test_mean_baseline_is_best_constant():
    gt, valid = _gt()
    const = ev.mean_baseline(gt)
    aligned = ev.align_depth(const, gt, valid, "least_squares")
    np.testing.assert_allclose(aligned, gt[valid].mean())
    aligned = ev.align_depth(const, gt, valid, "median")
    np.testing.assert_allclose(aligned, np.median(gt[valid]))
    aligned = ev.align_depth(const, gt, valid, "least_squares_disparity")
    np.testing.assert_allclose(aligned, 1.0 / np.mean(1.0 / gt[valid]))
    m = ev.depth_metrics(const, gt, valid)
    assert all(np.isfinite(v) for v in m.values()) and m["abs_rel"] > 0.1


def test_scene_plane_baseline_is_the_ground_behind_the_objects():
    res, index = 32, scenes.TEST_OFFSET + 3
    gt = scenes.render_scene(index, res)
    plane = ev.scene_plane_baseline(index, res)
    assert plane.shape == (res, res) and np.all(np.isfinite(plane)) and np.all(plane > 0)
    # pinhole camera without roll over flat ground: inverse depth is linear in the row and
    # constant along it (checked on full rows of ground, i.e. below the horizon)
    ground_rows = np.flatnonzero((plane < plane.max()).all(axis=1))
    assert ground_rows.size > res // 4
    inv = 1.0 / plane[ground_rows]
    np.testing.assert_allclose(inv, inv[:, :1] * np.ones((1, res)), rtol=1e-5)
    slope = np.polyfit(ground_rows, inv[:, 0], 1)
    np.testing.assert_allclose(np.polyval(slope, ground_rows), inv[:, 0], rtol=1e-4)
    # objects stand in front of the ground: the GT is never farther, and equal on floor pixels
    sees_ground = plane < plane.max()
    d, v = gt["depth"], gt["valid"] & sees_ground
    assert np.all(d[v] <= plane[v] * (1 + 1e-5))
    floor = v & np.isclose(d, plane, rtol=1e-5)
    assert 0.2 < floor.mean() < v.mean()  # mostly floor, but some object occludes it


def test_nearest_fill():
    depth = np.arange(12.0).reshape(3, 4)
    known = np.zeros((3, 4), bool)
    known[0, 0] = known[2, 3] = True
    filled = ev.nearest_fill(depth, known)
    assert filled[0, 1] == 0.0 and filled[2, 2] == 11.0 and filled[known].tolist() == [0.0, 11.0]


# -----------------------------------------------------------------------------
# prompt adherence


def _blob_image(blobs, res=32, floor=(200, 190, 160)):
    """A sandy picture with square blobs {colour name: column of its centre} in one row."""
    img = np.zeros((res, res, 3), np.uint8) + np.array(floor, np.uint8)
    for name, col in blobs.items():
        img[14:18, col - 2:col + 2] = np.round(255 * np.array(scenes.COLOURS[name]) * 0.8)
    return img


def _prim(colour, x, z=5.0):
    return scenes.Primitive("sphere", colour, "medium", x, z, (0.4, 0.4, 0.4))


def test_completion_panel_is_metric_on_the_ground_truth_colour_scale(monkeypatch):
    # a completion is relative depth; its picture shows it scaled to the known points and drawn on
    # the ground truth's colour scale, so an exact completion draws the ground truth's picture
    items = [get_eval_dataset("scenes", None, 2, 16, offset=3)[i] for i in range(2)]

    def exact_relative(model, tok, chunk, *, steps, seed, device):
        known = [it["valid"] & (np.arange(16)[:, None] % 3 == 0) for it in chunk]
        return [np.where(it["valid"], it["depth"] / 5.0, 0.0) for it in chunk], known

    monkeypatch.setattr(ev, "complete_batch", exact_relative)
    args = argparse.Namespace(batch_size=2, steps=1, seed=0, alignment="least_squares")
    panels = [[], []]
    out = ev.run_complete(args, None, None, items, "cpu", {}, None, panels)
    assert out["metric"]["abs_rel"] < 1e-5
    for it, (panel,) in zip(items, panels):
        assert np.array_equal(panel, ev.colorize_depth(it["depth"], it["valid"]))


def test_adherence_colours_and_relations():
    objects = [_prim("red", -1.0), _prim("blue", 1.0)]  # caption: a red sphere left of a blue sphere
    assert adherence.caption_tests(objects) == (["red", "blue"], [("red", "left of", "blue")])
    ok = {"colours": 2, "colours_ok": 2, "relations": 1, "relations_ok": 1}
    assert adherence.score_image(_blob_image({"red": 8, "blue": 24}), objects) == ok
    swapped = adherence.score_image(_blob_image({"red": 24, "blue": 8}), objects)
    assert swapped == dict(ok, relations_ok=0)
    assert adherence.score_image(_blob_image({}), objects) == dict(ok, colours_ok=0, relations_ok=0)
    # unchecked colours (the floor can be white, gray, pink or brown) make no test
    assert adherence.caption_tests([_prim("white", 0.0), _prim("gray", 1.0)]) == ([], [])
    r = adherence.rates([ok, dict(ok, relations_ok=0)])
    assert r == {"colour": 1.0, "relation": 0.5, "adherence": 5 / 6, "n_colour_tests": 4, "n_relation_tests": 2}


def test_adherence_scorer_on_ground_truth_renders():
    # the scorer's ceiling: renders of held-out scenes pass; the same renders scored against the
    # next scene's caption (the random-caption baseline) mostly fail
    o = adherence.oracle([scenes.TEST_OFFSET + 500 + i for i in range(40)], res=32)
    assert o["matched"]["n_colour_tests"] > 40 and o["matched"]["n_relation_tests"] > 10
    assert o["matched"]["colour"] > 0.85 and o["matched"]["relation"] > 0.75 and o["matched"]["adherence"] > 0.85
    assert o["mismatched"]["adherence"] < 0.35 and o["mismatched"]["relation"] < 0.2


# -----------------------------------------------------------------------------
# CLI end to end on a tiny checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A 2-step tiny MoFo checkpoint on the scenes, trained once for the CLI tests below."""
    return train_tiny(str(tmp_path_factory.mktemp("ckpt") / "tiny"), "--stage", "mofo",
                      "--data", "scenes", steps=2)


def _finite(d):
    return all(isinstance(v, float) and math.isfinite(v) for v in d.values())


def test_cli_scenes_end_to_end(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "eval"
    ev.main(["--ckpt", tiny_ckpt, "--data", "scenes", "--n", "2", "--steps", "2", "--gen-steps", "2",
             "--out", str(out), "--device", "cpu", "--batch-size", "2"])
    assert sorted(os.listdir(out)) == ["per_image.csv", "samples.png", "summary.json", "worst.png"]
    s = json.loads((out / "summary.json").read_text())
    assert s["tasks"] == ["i2d", "joint", "d2i", "complete"]
    for key in ("model", "baselines", "n", "args", "checkpoint", "alignment", "ensemble",
                "steps", "date"):
        assert key in s
    assert s["n"] == 2 and s["steps"] == 2 and s["ensemble"] == 1
    assert set(s["model"]) == set(ev.METRIC_KEYS + ev.PIXEL_KIND_KEYS) and _finite(s["model"])
    assert set(s["baselines"]) == {"mean", "plane"}
    assert all(_finite(m) for m in s["baselines"].values())
    # the plane has the floor's depth, not the objects': far better on floor pixels than on object ones
    plane = s["baselines"]["plane"]
    assert plane["abs_rel_floor"] < plane["abs_rel_objects"]
    assert set(s["abs_rel_minus_baseline"]) == {"mean", "plane"}
    for b, d in s["abs_rel_minus_baseline"].items():  # the paired mean is the difference of the means
        assert d["mean"] == pytest.approx(s["model"]["abs_rel"] - s["baselines"][b]["abs_rel"])
    lines = (out / "per_image.csv").read_text().strip().splitlines()
    assert len(lines) == 3 and "abs_rel" in lines[0] and "plane_delta1" in lines[0]
    printed = capsys.readouterr().out
    assert "[2/2]" in printed and "plane baseline" in printed
    # the other modes, each beside its reference
    rate_keys = {"colour", "relation", "adherence", "n_colour_tests", "n_relation_tests"}
    assert set(s["adherence_oracle"]) == {"matched", "mismatched"}
    for mode in ("joint", "d2i"):
        assert set(s[mode]["adherence"]) == rate_keys and set(s[mode]["adherence_random_caption"]) == rate_keys
        assert s[mode]["steps"] == 2 and s[mode]["cfg"] > 1
    for key in ("self_consistency", "self_consistency_mismatched"):
        assert set(s["joint"][key]) == set(ev.METRIC_KEYS) and _finite(s["joint"][key])
    for key in ("depth_faithfulness", "depth_faithfulness_mismatched"):
        assert set(s["d2i"][key]) == set(ev.METRIC_KEYS) and _finite(s["d2i"][key])
    c = s["complete"]
    assert 0 < c["known_fraction"] <= 0.06 and _finite(c["metric"]) and _finite(c["affine"])
    assert set(c["baselines"]) == {"nearest", "i2d_scaled"}
    for col in ("joint_adherence", "joint_self_abs_rel", "d2i_adherence", "d2i_faithful_abs_rel",
                "complete_abs_rel"):
        assert col in lines[0]
    assert "random caption" in printed and "completion" in printed


def test_cli_tasks_offset_and_data_path_alias(tiny_ckpt, tmp_path):
    out = tmp_path / "eval"
    ev.main(["--ckpt", tiny_ckpt, "--data", "scenes", "--n", "1", "--offset", "64", "--tasks", "complete",
             "--steps", "1", "--out", str(out), "--device", "cpu"])
    s = json.loads((out / "summary.json").read_text())
    assert s["tasks"] == ["complete"] and "model" not in s and "joint" not in s
    assert "i2d_scaled" not in s["complete"]["baselines"]  # needs the i2d task
    assert f"scene_{scenes.TEST_OFFSET + 64}" in (out / "per_image.csv").read_text()
    for flag in ("--data-path", "--root"):
        assert ev.parse_args(["--ckpt", "c", "--data", "nyu", flag, "/d"]).data_path == "/d"


def test_cli_train_split_scores_training_scenes(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "eval"
    ev.main(["--ckpt", tiny_ckpt, "--data", "scenes", "--split", "train", "--n", "1", "--offset", "5",
             "--tasks", "i2d", "--steps", "1", "--out", str(out), "--device", "cpu"])
    assert "on scenes (training scenes): 1 images" in capsys.readouterr().out
    assert "scene_5," in (out / "per_image.csv").read_text()
    item = get_eval_dataset("scenes", None, 1, 16, offset=5, split="train")[0]
    np.testing.assert_array_equal(item["depth"], scenes.render_scene(5, 16)["depth"])
    with pytest.raises(UserError, match="--split train is for --data scenes"):
        ev.check_args(ev.parse_args(["--ckpt", tiny_ckpt, "--data", "nyu", "--root", "/d", "--split", "train"]))


def test_cli_bf16_weights_score_as_fp32(tiny_ckpt, tmp_path):
    """--dtype bf16 (the default on CUDA, as in sample.py) evaluates the same model within bf16's
    rounding, and summary.json says which dtype ran."""
    summaries = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        ev.main(["--ckpt", tiny_ckpt, "--data", "scenes", "--n", "4", "--steps", "1", "--tasks", "i2d",
                 "--dtype", dtype, "--out", str(out), "--device", "cpu"])
        summaries[dtype] = json.loads((out / "summary.json").read_text())
    assert [s["dtype"] for s in summaries.values()] == ["fp32", "bf16"]
    a, b = (s["model"]["abs_rel"] for s in summaries.values())
    assert abs(a - b) < 0.02 * a, (a, b)


def test_cli_ensemble_writes_uncertainty(tiny_ckpt, tmp_path):
    out = tmp_path / "eval"
    ev.main(["--ckpt", tiny_ckpt, "--data", "scenes", "--n", "2", "--steps", "1", "--tasks", "i2d",
             "--ensemble", "2", "--out", str(out), "--device", "cpu", "--batch-size", "1"])
    names = sorted(os.listdir(out / "uncertainty"))
    assert names == ["00000.npy", "00000.png", "00001.npy", "00001.png"]
    spread = np.load(out / "uncertainty" / "00000.npy")
    assert spread.ndim == 2 and np.all(np.isfinite(spread)) and np.all(spread >= 0)
    assert json.loads((out / "summary.json").read_text())["ensemble"] == 2


def test_cli_missing_checkpoint_is_one_line_exit_2(tmp_path):
    out = tmp_path / "never"
    proc = run_cli("evaluate.py", "--ckpt", str(tmp_path / "nope"), "--data", "scenes",
                   "--n", "2", "--out", str(out), check=False)
    assert_user_error(proc, "evaluate.py: error:", "nope")
    assert list(tmp_path.iterdir()) == []  # neither the out dir nor a staging dir


def test_cli_triton_without_a_gpu_is_one_line_exit_2(tiny_ckpt, tmp_path):
    out = tmp_path / "never"  # run_cli's environment has no TRITON_INTERPRET
    proc = run_cli("evaluate.py", "--ckpt", tiny_ckpt, "--data", "scenes", "--n", "1", "--kernels", "triton",
                   "--device", "cpu", "--out", str(out), check=False)
    assert_user_error(proc, "--kernels triton", "TRITON_INTERPRET=1")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [["--n", "0"], ["--data", "nyu", "--root", "/nonexistent/nyu"],
                                   ["--data", "manifest", "--data-path", "/nonexistent/m.jsonl"],
                                   ["--tasks", "i2d,depth"], ["--data", "nyu", "--tasks", "joint"],
                                   ["--offset", "-1"]])
def test_user_mistakes_raise_user_error(tiny_ckpt, tmp_path, extra):
    out = tmp_path / "never"
    with pytest.raises(UserError):
        ev.main(["--ckpt", tiny_ckpt, "--data", "scenes", "--steps", "1", "--out", str(out)] + extra)
    assert list(tmp_path.iterdir()) == []


def test_non_empty_out_is_refused(tiny_ckpt, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        ev.main(["--ckpt", tiny_ckpt, "--data", "scenes", "--n", "1", "--steps", "1", "--out", str(tmp_path)])
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [("notes.txt", "keep me")]
