"""Opt-in (`make test-slow`): the recipe actually learns.

The default suite checks wiring and math only; this runs the demo recipe (tiny preset, 8000
pre-rendered scenes, t2i then MoFo on dense depth with a cool-down) and evaluates it with
evaluate.py's defaults on held-out scenes 64..191, i.e. outside the first 64 that `make demo` shows,
and asserts:
- i2d beats the mean-depth predictor by a wide margin (AbsRel under half of it, delta1 over twice);
- the text is used: joint and d2i images adhere to their own captions more than to other scenes'
  captions (colour + relation tests).
The stronger bar -- i2d below the ground-truth-plane baseline -- is not reached within the demo's
budget. results/demo.md has the measured values, the run time and every setting tried.
"""
import json
import os

import pytest

from helpers import ENV, run_cli

pytestmark = pytest.mark.slow

RECIPE = ["--config", "tiny", "--batch-size", "32", "--lr", "1e-3", "--dtype", "bf16", "--log-every", "100"]


def test_recipe_learns_on_held_out_scenes(tmp_path, monkeypatch):
    # One thread: on a shared 2-core machine PyTorch's default pool of 2 spinning threads runs the
    # tiny model several times slower (results/sampling.md, Timings); on an idle one it costs little.
    monkeypatch.setitem(ENV, "OMP_NUM_THREADS", "1")
    pool, t2i, mf = str(tmp_path / "scenes"), str(tmp_path / "t2i"), str(tmp_path / "mofo")
    run_cli("tools/render_shards.py", "--n", "8000", "--res", "32", "--out", pool, timeout=600)
    shards = ["--data", "shards", "--data-path", os.path.join(pool, "*.tar"), "--num-workers", "0"]
    run_cli("train.py", *RECIPE, *shards, "--stage", "t2i", "--steps", "800", "--save-every", "800", "--out", t2i,
            timeout=3600)
    run_cli("train.py", *RECIPE, *shards, "--stage", "mofo", "--steps", "1900", "--decay", "0.5",
            "--save-every", "1900", "--init", t2i, "--out", mf, timeout=3600)
    out = str(tmp_path / "eval")
    run_cli("evaluate.py", "--ckpt", mf, "--data", "scenes", "--n", "128", "--offset", "64", "--batch-size", "32",
            "--out", out, timeout=1800)
    s = json.load(open(os.path.join(out, "summary.json")))
    model, mean = s["model"], s["baselines"]["mean"]
    assert model["abs_rel"] < 0.5 * mean["abs_rel"], (model, mean)
    assert model["delta1"] > 2 * mean["delta1"], (model, mean)
    for mode in ("joint", "d2i"):
        own, other = s[mode]["adherence"]["adherence"], s[mode]["adherence_random_caption"]["adherence"]
        assert own > other, (mode, s[mode])
