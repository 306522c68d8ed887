"""Dry run of tools/bench.py on CPU: toy sizes, a wall-clock timer, the Triton interpreter.

The figures mean nothing here; what is checked is the plumbing the GPU run depends on (every
implementation is called and checked, unsupported backends become "n/a" rows instead of crashes,
ratios, tables and the JSON), so a lent GPU's time is not lost to a bug in the script.
"""
import json
import math
import time

import pytest

from common import UserError
from kernels import INTERPRET
from tools import bench


def wall_timer(fn, grad_to_none=None) -> float:
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
    if not INTERPRET:
        pytest.skip("dry run uses the Triton interpreter")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "COPY_ELEMS", 1 << 16)
    monkeypatch.setattr(bench, "GEMM_N", 64)


@pytest.mark.slow  # 30-60 s on a 2-core CPU: kept out of the 10-minute suite
def test_bench_plumbing_dry_run(cpu_bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "ATTN_SHAPES", [(1, 2, 17, 64), (1, 2, 9, 16, "graph")])
    monkeypatch.setattr(bench, "RMS_SHAPES", [(9, 48), (5, 40, "graph")])
    monkeypatch.setattr(bench, "QK_SHAPES", [(1, 2, 7, 32), (1, 1, 5, 16, "graph")])
    args = bench.parse_args(["--out", str(tmp_path / "bench.json")])
    out = bench.run(args, wall_timer)
    bench.write_json(args.out, out)
    printed = capsys.readouterr().out

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"]["device"].startswith("cpu") and saved["meta"]["torch"]
    assert set(saved) == {"meta", "ceilings", "attention", "rmsnorm", "qknorm", "targets"}
    assert [r["shape"] for r in saved["attention"]] == [[1, 2, 17, 64], [1, 2, 9, 16]]
    # The CUDA-graph rows are timed for fwd and fwd+bwd only and carry no target.
    for section in ("attention", "rmsnorm", "qknorm"):
        graph_row = saved[section][1]
        assert graph_row["cuda_graph"] and set(graph_row["impls"]["triton"]["ms"]) == {"fwd", "fwd+bwd"}
        assert graph_row["impls"]["triton"]["ok"]
    verdicts = saved["targets"]
    # attention at D=64: fwd, bwd, fwd+bwd against cuDNN; RMSNorm 3 bars; QK-norm 2 bars
    assert [v["section"] for v in verdicts] == ["attention"] * 3 + ["rmsnorm"] * 3 + ["qknorm"] * 2
    assert {v["verdict"] for v in verdicts if v["section"] == "attention"} == {"not measured"}
    assert all(v["verdict"] in ("met", "missed") for v in verdicts if v["section"] != "attention")

    for section, bases in (("attention", ("sdpa_flash",)), ("rmsnorm", ("eager", "compile")),
                           ("qknorm", ("eager", "compile"))):
        row = saved[section][0]
        ours = row["impls"]["triton"]
        assert ours["ok"] and ours["error"] is None, ours
        assert set(ours["ms"]) == set(bench.PASSES)
        for base in bases:  # run on CPU too, so every ratio exists
            rec = row["impls"][base]
            assert rec["ok"] and set(rec["ms"]) == set(bench.PASSES), (base, rec)
            assert math.isfinite(row["speedup_vs"][base]["fwd+bwd"])
    assert set(saved["attention"][0]["impls"]["triton"]["configs"]) == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}
    # cuDNN attention cannot run on CPU tensors: reported, not raised.
    cudnn = saved["attention"][0]["impls"]["sdpa_cudnn"]
    assert cudnn["error"] and cudnn["ms"] == {}
    assert saved["attention"][0]["speedup_vs"]["sdpa_cudnn"]["fwd"] is None
    assert "Attention, bf16" in printed and "RMSNorm, bf16" in printed and "QK-norm + RoPE" in printed
    assert "n/a" in printed and "FAIL" not in printed


@pytest.mark.slow  # 30-60 s on a 2-core CPU: kept out of the 10-minute suite
def test_sample_section_dry_run(cpu_bench, monkeypatch, capsys):
    """The sampler section times the denoising loop of each backend (eager only here: compiling
    on CPU takes minutes) and judges the best Triton time against the bar."""
    monkeypatch.setattr(bench, "SAMPLE_CONFIG", ("tiny", 2, 2.0))
    monkeypatch.setattr(bench, "SAMPLE_VARIANTS", [("torch", False), ("triton", False)])
    out = bench.run(bench.parse_args(["--only", "sample"]), wall_timer)
    assert "Sampler: tiny" in capsys.readouterr().out
    for v in out["sample"]["variants"]:
        assert v["error"] is None and v["denoise_s"] > 0 and v["warmup_s"] > 0, v
    (verdict,) = out["targets"]
    assert verdict["section"] == "sample" and verdict["verdict"] in ("met", "missed")


def test_bench_refuses_bad_out_dir_before_running(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        bench.main(["--out", str(tmp_path / "missing" / "b.json")])


def test_shape_selection(capsys):
    assert bench.parse_args(["--attn-shapes", "0,5", "--rms-shapes", "2"]).attn_shapes == [0, 5]
    assert bench.pick(bench.RMS_SHAPES, [2]) == [bench.RMS_SHAPES[2]]
    assert bench.pick(bench.ATTN_SHAPES, None) == bench.ATTN_SHAPES
    for bad in ("9", "a", "1,,2"):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(["--attn-shapes", bad])
        assert e.value.code == 2
    assert "--attn-shapes" in capsys.readouterr().err


@pytest.mark.slow  # 30-60 s on a 2-core CPU: kept out of the 10-minute suite
def test_step_section_dry_run(cpu_bench, monkeypatch, capsys):
    """Both backends run whole training steps of the same tiny model; before timing, the
    Triton backend's model outputs match the torch backend's (and are not bit-equal: it ran)."""
    monkeypatch.setattr(bench, "STEP_CONFIGS", [("tiny", 2, {"res": 16})])
    out = bench.run(bench.parse_args(["--only", "step", "--step-iters", "2"]), wall_timer)
    printed = capsys.readouterr().out

    assert set(out) == {"meta", "ceilings", "step", "targets"} and out["targets"] == []
    (row,) = out["step"]
    # tiny at 16 px, patch 4: 24 text + 2 x 16 image/depth tokens; width 96, 3 layers of each kind
    assert row["seq"] == 24 + 2 * 16 and row["head_dim"] == 32
    assert row["step_flops"] > 0
    assert [(v["backend"], v["compile"]) for v in row["variants"]] == [("torch", False), ("triton", False)]
    for v in row["variants"]:
        assert v["error"] is None and v["ms"] > 0 and v["tokens_per_s"] > 0, v
        prof = v["profile"]
        assert prof["top"] and prof["split_pct"]["GEMM"] > 0
        assert abs(sum(prof["split_pct"].values()) - 100) < 1e-6
    torch_path, triton = row["variants"]
    assert torch_path["out_rel_err"] == 0
    # fp32 on CPU: the Triton backend gives the reference's outputs, not bit-equal ones (it ran).
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
        assert [(v["backend"], v["compile"]) for v in row["variants"]] == [
            ("torch", False), ("triton", False), ("torch", True), ("triton", True)]
        for v in row["variants"]:
            assert v["error"] is None and v["ms"] > 0, v
            assert v["out_rel_err"] < 1e-5


def _fake_row(speedups: dict, ok: bool = True, D: int = 64, **extra) -> dict:
    return {"shape": [1, 2, 3, D], "impls": {"triton": {"ok": ok, "pct_ceiling": {"fwd": 90.0}}},
            "speedup_vs": speedups, **extra}


def test_judge_verdicts():
    out = {"attention": [
        _fake_row({"sdpa_cudnn": {"fwd": 1.05, "bwd": 0.8, "fwd+bwd": None}}),
        _fake_row({"sdpa_cudnn": {"fwd": 0.95, "bwd": 2.0, "fwd+bwd": 2.0}}, D=128),
        _fake_row({"sdpa_cudnn": {"fwd": 2.0, "bwd": 2.0, "fwd+bwd": 2.0}}, ok=False),
    ], "rmsnorm": [
        _fake_row({"compile": {"fwd+bwd": 1.1}}),
        _fake_row({"compile": {"fwd": 9.0, "fwd+bwd": 9.0}}, cuda_graph=True),
    ], "step": [{"config": "base", "variants": [
        {"backend": "triton", "compile": True, "mfu_pct": 41.0, "speedup_vs_torch": 0.9}]}],
        "sample": {"preset": "base", "variants": [{"backend": "triton", "denoise_s": 0.4},
                                                  {"backend": "torch", "denoise_s": 0.1}]}}
    got = [(v["section"], v["target"].split(" >=")[0], v["verdict"]) for v in bench.judge(out)]
    assert got == [
        ("attention", "fwd", "met"), ("attention", "fwd", "missed"),  # D=64: bar 1.0; fast but wrong is missed
        ("attention", "fwd", "met"),  # D=128: 0.95 >= 0.9
        ("attention", "bwd", "missed"), ("attention", "bwd", "met"), ("attention", "bwd", "missed"),
        ("attention", "fwd+bwd", "not measured"), ("attention", "fwd+bwd", "met"), ("attention", "fwd+bwd", "missed"),
        ("rmsnorm", "fwd", "met"), ("rmsnorm", "fwd+bwd", "not measured"), ("rmsnorm", "fwd+bwd", "missed"),
        ("step", "MFU", "met"), ("step", ">= 1 x compiled torch backend", "missed"),
        ("sample", "denoise <= 0.5 s", "met"),  # the best Triton-backend time counts
    ]


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "GEMM"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "GEMM"),
    ("aten::addmm", "GEMM"),
    ("_attn_bwd_kernel", "attention"),
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
