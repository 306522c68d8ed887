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


@pytest.fixture
def cpu_bench(monkeypatch):
    """bench.py pointed at the CPU with toy ceilings; the kernels run in the Triton interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("dry run uses the Triton interpreter")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "COPY_ELEMS", 1 << 16)
    monkeypatch.setattr(bench, "GEMM_N", 64)


def test_bench_plumbing_dry_run(cpu_bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "ATTN_SHAPES", [(1, 2, 17, 32)])
    monkeypatch.setattr(bench, "RMS_SHAPES", [(9, 48), (5, 40, "graph")])
    monkeypatch.setattr(bench, "ATTN_MATH_SHAPE", (1, 2, 9, 16))
    args = bench.parse_args(["--out", str(tmp_path / "bench.json")])
    out = bench.run(args, wall_timer)
    bench.write_json(args.out, out)
    printed = capsys.readouterr().out

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"]["device"].startswith("cpu") and saved["meta"]["torch"]
    assert set(saved) == {"meta", "ceilings", "attention_math_check", "attention", "rmsnorm", "targets"}
    assert [r["shape"] for r in saved["attention"]] == [[1, 2, 17, 32]]
    check = saved["attention_math_check"]
    assert check["shape"] == [1, 2, 9, 16] and 0 < check["triton"] < bench.ATTN_TOL
    assert 0 < check["sdpa_math"] < bench.ATTN_TOL
    # The CUDA-graph row is timed for fwd and fwd+bwd only and carries no target.
    graph_row = saved["rmsnorm"][1]
    assert graph_row["cuda_graph"] and set(graph_row["impls"]["triton"]["ms"]) == {"fwd", "fwd+bwd"}
    assert graph_row["impls"]["triton"]["ok"]
    verdicts = saved["targets"]
    assert len(verdicts) == 8 and all(v["shape"] != [5, 40] for v in verdicts)
    assert {v["verdict"] for v in verdicts if v["measure"] == "sdpa_cudnn"} == {"not measured"}
    assert all(v["verdict"] in ("met", "missed") for v in verdicts if v["measure"] != "sdpa_cudnn")

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


def test_step_section_dry_run(cpu_bench, monkeypatch, capsys):
    """Both kernel paths run whole training steps of the same tiny model; before timing, the
    kernel path's model outputs match the reference path's (and are not bit-equal: it ran)."""
    monkeypatch.setattr(bench, "STEP_CONFIGS", [("tiny", 2, {"res": 16})])
    out = bench.run(bench.parse_args(["--only", "step", "--step-iters", "2"]), wall_timer)
    printed = capsys.readouterr().out

    assert set(out) == {"meta", "ceilings", "step", "targets"} and out["targets"] == []
    (row,) = out["step"]
    # tiny at 16 px, patch 4: 24 text + 2 x 16 image/depth tokens; width 96, 3 layers of each kind
    assert row["seq"] == 24 + 2 * 16 and row["head_dim"] == 32
    assert row["step_flops"] > 0
    assert [(v["kernels"], v["compile"]) for v in row["variants"]] == [("torch", False), ("triton", False)]
    for v in row["variants"]:
        assert v["error"] is None and v["ms"] > 0 and v["tokens_per_s"] > 0, v
        prof = v["profile"]
        assert prof["top"] and prof["split_pct"]["GEMM"] > 0
        assert abs(sum(prof["split_pct"].values()) - 100) < 1e-6
    torch_path, triton = row["variants"]
    assert torch_path["out_rel_err"] == 0
    # fp32 on CPU: the kernel path gives the reference's outputs, not bit-equal ones (it ran).
    assert 0 < triton["out_rel_err"] < 1e-5
    assert math.isfinite(triton["speedup_vs_torch"])
    assert "Training step" in printed


@pytest.mark.slow
def test_step_section_compiled_dry_run(cpu_bench, monkeypatch):
    """`--step-compile` over two configs of different shapes (~3.5 CPU-minutes, opt-in): all four
    variants of each run, and the compiled ones reproduce the eager reference path's outputs."""
    monkeypatch.setattr(bench, "STEP_CONFIGS", [("tiny", 2, {"res": 16}), ("tiny", 1, {"res": 8})])
    out = bench.run(bench.parse_args(["--only", "step", "--step-iters", "2", "--step-compile"]), wall_timer)
    for row in out["step"]:
        assert [(v["kernels"], v["compile"]) for v in row["variants"]] == [
            ("torch", False), ("triton", False), ("torch", True), ("triton", True)]
        for v in row["variants"]:
            assert v["error"] is None and v["ms"] > 0, v
            assert v["out_rel_err"] < 1e-5


def _fake_row(speedups: dict, ok: bool = True, **extra) -> dict:
    return {"shape": [1, 2, 3, 4], "impls": {"triton": {"ok": ok, "pct_ceiling": {"fwd": 90.0}}},
            "speedup_vs": speedups, **extra}


def test_judge_verdicts():
    out = {"attention": [
        _fake_row({"sdpa_flash": {"fwd": 1.25, "bwd": 0.8, "fwd+bwd": None},
                   "sdpa_cudnn": {"fwd": 0.85}}),
        _fake_row({"sdpa_flash": {"fwd": 2.0, "bwd": 2.0, "fwd+bwd": 2.0}, "sdpa_cudnn": {"fwd": 2.0}}, ok=False),
    ], "rmsnorm": [
        _fake_row({"compile": {"fwd": 1.0, "fwd+bwd": 0.99}}),
        _fake_row({"compile": {"fwd": 9.0, "fwd+bwd": 9.0}}, cuda_graph=True),
    ]}
    verdicts = bench.judge(out)
    first = [v["verdict"] for v in verdicts if v["section"] == "attention"][::2]
    failed = [v["verdict"] for v in verdicts if v["section"] == "attention"][1::2]
    assert first == ["met", "missed", "not measured", "missed"]  # fwd flash, fwd cudnn, fwd+bwd, bwd
    assert failed == ["missed"] * 4  # fast but wrong is missed
    rms = [(v["pass"], v["measure"], v["verdict"]) for v in verdicts if v["section"] == "rmsnorm"]
    assert rms == [("fwd", "pct_ceiling", "met"), ("fwd+bwd", "pct_ceiling", "not measured"),
                   ("fwd", "compile", "met"), ("fwd+bwd", "compile", "missed")]  # graph row skipped


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "GEMM"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "GEMM"),
    ("aten::addmm", "GEMM"),
    ("_attn_bwd_dkdv_kernel", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("void fmha_cutlassB_bf16_aligned_64x64_k64_sm80(...)", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("void at::native::multi_tensor_apply_kernel<at::native::LpNormFunctor<float, 2>>", "optimizer/EMA/clip"),
    ("_rms_norm_bwd_kernel", "norm"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_3", "norm"),
    ("Memcpy HtoD (Pageable -> Device)", "copy/cast/fill"),
    ("void at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)", "copy/cast/fill"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
    ("aten::mul", "other"),
])
def test_profile_categories(name, category):
    assert bench.categorise(name) == category
