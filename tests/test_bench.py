"""Dry run of kernels/bench.py on CPU: toy sizes, a wall-clock timer, the Triton interpreter.

The figures mean nothing here; what is checked is the plumbing the GPU run depends on (every
implementation is called and checked, unsupported backends become "n/a" rows instead of crashes,
ratios, tables and the JSON), so a lent GPU's time is not lost to a bug in the script.
"""
import importlib
import json
import math
import os
import time

import pytest

bench = importlib.import_module("kernels.bench")


def wall_timer(fn, grad_to_none=None, **_) -> float:
    """Milliseconds of one call after one warm-up call (stands in for do_bench)."""
    fn()
    for t in grad_to_none or ():
        t.grad = None
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="dry run uses the Triton interpreter")
def test_bench_plumbing_dry_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "COPY_ELEMS", 1 << 16)
    monkeypatch.setattr(bench, "GEMM_N", 64)
    monkeypatch.setattr(bench, "ATTN_SHAPES", [(1, 2, 17, 32)])
    monkeypatch.setattr(bench, "RMS_SHAPES", [(9, 48)])
    args = bench.parse_args(["--out", str(tmp_path / "bench.json")])
    out = bench.run(args, wall_timer)
    bench.write_json(args.out, out)
    printed = capsys.readouterr().out

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"]["device"].startswith("cpu") and saved["meta"]["torch"]
    assert set(saved) == {"meta", "ceilings", "attention", "rmsnorm"}
    assert [r["shape"] for r in saved["attention"]] == [[1, 2, 17, 32]]

    for section, bases in (("attention", ("sdpa_flash", "triton_atomic_dq")), ("rmsnorm", ("eager", "compile"))):
        row = saved[section][0]
        ours = row["impls"]["triton"]
        assert ours["ok"] and ours["error"] is None, ours
        assert set(ours["ms"]) == set(bench.PASSES)
        for base in bases:  # run on CPU too, so every ratio exists
            rec = row["impls"][base]
            assert rec["ok"] and set(rec["ms"]) >= {"fwd+bwd"}, (base, rec)
            assert math.isfinite(row["speedup_vs"][base]["fwd+bwd"])
    # cuDNN attention cannot run on CPU tensors: reported, not raised.
    cudnn = saved["attention"][0]["impls"]["sdpa_cudnn"]
    assert cudnn["error"] and cudnn["ms"] == {}
    assert saved["attention"][0]["speedup_vs"]["sdpa_cudnn"]["fwd"] is None
    assert "Attention, bf16" in printed and "RMSNorm, bf16" in printed and "n/a" in printed
    assert "FAIL" not in printed


def test_bench_refuses_bad_out_dir_before_running(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path / "missing" / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_shape_selection(capsys):
    assert bench.parse_args(["--attn-shapes", "0,5", "--rms-shapes", "2"]).attn_shapes == [0, 5]
    assert bench.pick(bench.RMS_SHAPES, [2]) == [bench.RMS_SHAPES[2]]
    assert bench.pick(bench.ATTN_SHAPES, None) == bench.ATTN_SHAPES
    for bad in ("9", "a", "1,,2"):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(["--attn-shapes", bad])
        assert e.value.code == 2
    assert "--attn-shapes" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="dry run uses the Triton interpreter")
def test_step_section_dry_run(monkeypatch, capsys):
    """Both kernel paths run whole training steps of the same tiny model; before timing, the
    kernel path's model outputs match the reference path's (and are not bit-equal: it ran)."""
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "COPY_ELEMS", 1 << 16)
    monkeypatch.setattr(bench, "GEMM_N", 64)
    monkeypatch.setattr(bench, "STEP_CONFIGS", [("tiny", 2, 16)])
    out = bench.run(bench.parse_args(["--only", "step"]), wall_timer)
    printed = capsys.readouterr().out

    assert set(out) == {"meta", "ceilings", "step"}
    (row,) = out["step"]
    # tiny at 16 px, patch 4: 24 text + 2 x 16 image/depth tokens; width 96, 3 layers of each kind
    assert row["seq"] == 24 + 2 * 16 and row["head_dim"] == 32
    assert row["step_flops"] > 0
    assert [(v["kernels"], v["compile"]) for v in row["variants"]] == [("torch", False), ("triton", False)]
    for v in row["variants"]:
        assert v["error"] is None and v["ms"] > 0 and v["top"], v
    torch_path, triton = row["variants"]
    assert torch_path["out_rel_err"] == 0
    # fp32 on CPU: the kernel path gives the reference's outputs, not bit-equal ones (it ran).
    assert 0 < triton["out_rel_err"] < 1e-5
    assert math.isfinite(triton["speedup_vs_torch"])
    assert "Training step" in printed
