"""Opt-in (`make test-slow`): the demo recipe learns what it exists for.

The default suite checks wiring and math only. This runs `make demo` itself into a temporary folder
(tiny preset, 8000 pre-rendered scenes, t2i pre-training, then MoFo post-training at batch 8 on
dense depth with a cool-down), evaluates the checkpoint with evaluate.py's defaults on held-out
scenes 64..191, outside the first 64 that the demo shows, and asserts:
- i2d beats the mean-depth predictor by a wide margin (AbsRel under half of it, delta1 over twice);
- i2d sees the objects: on object pixels its AbsRel is below the ground-truth plane's, which puts
  the floor behind them there (a run whose depth queries never learned to read the image misses it);
- i2d beats the ground-truth-plane predictor under the AbsRel-minimising scale and shift
  (`--alignment abs_rel`, the objective the paper's evaluation fits);
- the text is used: joint and d2i images adhere to their own captions more than to other scenes'
  captions (colour + relation tests).
The plane bar under evaluate.py's default least-squares fit is not asserted: the demo's own run
meets it by less than the evaluation's noise, and about half the seeds of its recipe miss it.
results/demo.md has the measured values, the run time and every setting tried.
"""
import json
import os
import subprocess

import pytest

from helpers import ENV, ROOT, run_cli

pytestmark = pytest.mark.slow


def test_demo_learns_depth_and_follows_its_captions(tmp_path):
    demo = str(tmp_path / "demo")
    proc = subprocess.run(["make", "demo", f"DEMO={demo}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = str(tmp_path / "eval")
    run_cli("evaluate.py", "--ckpt", os.path.join(demo, "mofo"), "--data", "scenes", "--n", "128", "--offset", "64",
            "--tasks", "i2d,joint,d2i", "--batch-size", "32", "--out", out, timeout=1800)
    s = json.load(open(os.path.join(out, "summary.json")))
    model, mean, plane = s["model"], s["baselines"]["mean"], s["baselines"]["plane"]
    assert model["abs_rel"] < 0.5 * mean["abs_rel"], (model, mean)
    assert model["delta1"] > 2 * mean["delta1"], (model, mean)
    assert model["abs_rel_objects"] < plane["abs_rel_objects"], (model, plane)
    out_ar = str(tmp_path / "eval_abs_rel")
    run_cli("evaluate.py", "--ckpt", os.path.join(demo, "mofo"), "--data", "scenes", "--n", "128", "--offset", "64",
            "--tasks", "i2d", "--alignment", "abs_rel", "--batch-size", "32", "--out", out_ar, timeout=1800)
    ar = json.load(open(os.path.join(out_ar, "summary.json")))
    assert ar["model"]["abs_rel"] < ar["baselines"]["plane"]["abs_rel"], (ar["model"], ar["baselines"]["plane"])
    for mode in ("joint", "d2i"):
        own, other = s[mode]["adherence"]["adherence"], s[mode]["adherence_random_caption"]["adherence"]
        assert own > other, (mode, s[mode])
