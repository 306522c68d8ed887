"""train.py: checkpoints, exact resume, DDP on CPU, the t2i -> mofo recipe, bad input."""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import common
import data
import scenes
import train
from helpers import ENV, ROOT, TINY, assert_same_run, assert_user_error, run_cli, train_tiny


def weights(run_dir: str) -> dict[str, torch.Tensor]:
    ckpt = checkpoint.resolve_checkpoint(run_dir)
    out = load_file(os.path.join(ckpt, "model.safetensors"))
    out.update({f"opt/{k}": v for k, v in load_file(os.path.join(ckpt, "optimizer.safetensors")).items()})
    return out


def test_checkpoint_roundtrip_and_outputs(tmp_path):
    out = train_tiny(str(tmp_path / "run"), "--stage", "mofo", "--sparse", "lidar", steps=3)
    ckpt = checkpoint.resolve_checkpoint(out)
    assert os.path.basename(ckpt) == "ckpt_0000003"
    for f in ("model.safetensors", "optimizer.safetensors", "config.json", "tokenizer.json", "train_state.json"):
        assert os.path.isfile(os.path.join(ckpt, f)), f
    state = json.load(open(os.path.join(ckpt, "train_state.json")))
    assert state["step"] == 3 and state["args"]["sparse"] == "lidar"
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    for ema in (True, False):
        model, tok = checkpoint.load_checkpoint(out, ema=ema)
        prefix = "ema." if ema else "raw."
        for k, v in model.state_dict().items():
            assert torch.equal(v, tensors[prefix + k]), k
    assert model.cfg.has_depth and model.cfg.vocab_size == tok.get_vocab_size()
    assert not torch.equal(tensors["ema.final_layer.out.weight"], tensors["raw.final_layer.out.weight"])
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all("loss_depth" in m for m in metrics)
    assert os.path.isfile(os.path.join(out, "loss.png"))
    assert os.path.isfile(os.path.join(out, "samples", "step_0000003.png"))


def test_resume_after_sigkill_repeats_the_run(tmp_path):
    """Kill a run with SIGKILL after its first checkpoint, resume it: the weights, optimizer state
    and EMA of the same run never interrupted (helpers.assert_same_run)."""
    args = [*TINY, "--stage", "mofo", "--steps", "8", "--save-every", "2"]
    straight = str(tmp_path / "straight")
    run_cli("train.py", *args, "--out", straight)

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--out", killed], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(killed, "latest")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.load(open(os.path.join(checkpoint.resolve_checkpoint(killed), "train_state.json")))["step"]
    assert step < 8, "the run finished before it could be killed; the test proves nothing"
    res = run_cli("train.py", "--resume", "--steps", "8", "--out", killed, "--num-workers", "0")
    assert f"steps {step}->8" in res.stdout
    assert_same_run(weights(straight), weights(killed))
    # the metrics log has each step once
    steps = [json.loads(line)["step"] for line in open(os.path.join(killed, "metrics.jsonl"))]
    assert steps == list(range(1, 9))


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = train_tiny(str(tmp_path / "run"), "--stage", "t2i", steps=2)
    before = checkpoint.resolve_checkpoint(out)
    model, tok = checkpoint.load_checkpoint(out)

    def boom(*a, **k):
        raise KeyboardInterrupt  # stands in for a kill in the middle of writing the JSON files

    monkeypatch.setattr(checkpoint, "write_json", boom)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(out, 4, model, copy.deepcopy(model), opt, tok, {"step": 4})
    assert checkpoint.resolve_checkpoint(out) == before
    checkpoint.load_checkpoint(out)


def test_t2i_then_mofo_recipe(tmp_path):
    t2i = train_tiny(str(tmp_path / "t2i"), "--stage", "t2i", steps=2)
    m_t2i, _ = checkpoint.load_checkpoint(t2i)
    assert not m_t2i.cfg.has_depth
    out = train_tiny(str(tmp_path / "mofo"), "--stage", "mofo", "--init", t2i, steps=1)
    m, _ = checkpoint.load_checkpoint(out)
    assert m.cfg.has_depth
    # the fresh depth-only weights are seeded too: the same command gives the same model
    again = train_tiny(str(tmp_path / "mofo2"), "--stage", "mofo", "--init", t2i, steps=1)
    assert_same_run(weights(out), weights(again))
    # the text tokenizer travels with the weights
    assert open(os.path.join(checkpoint.resolve_checkpoint(t2i), "tokenizer.json")).read() == \
        open(os.path.join(checkpoint.resolve_checkpoint(out), "tokenizer.json")).read()


def test_torchrun_two_processes_cpu(tmp_path):
    out = str(tmp_path / "ddp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *TINY, "--stage", "mofo", "--steps", "2", "--save-every", "2", "--out", out],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.load(open(os.path.join(checkpoint.resolve_checkpoint(out), "train_state.json")))
    assert state["world_size"] == 2 and state["step"] == 2
    assert proc.stdout.count("saved ") == 1  # only rank 0 writes


def test_step_batches_are_a_function_of_the_step():
    full = list(train.StepBatches(10, 0, 6, 4, 0, 1, seed=0))
    assert list(train.StepBatches(10, 3, 6, 4, 0, 1, seed=0)) == full[3:]
    # a finite dataset is walked as whole reshuffled epochs
    flat = [i for b in full for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    ranks = [list(train.StepBatches(None, 0, 2, 2, r, 2, seed=0)) for r in (0, 1)]
    assert ranks == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


@pytest.mark.parametrize("case", ["existing", "resume_empty", "manifest_no_path", "bad_init", "bad_steps",
                                  "triton_on_cpu"])
def test_bad_input(tmp_path, case):
    out = str(tmp_path / "run")
    if case == "existing":
        train_tiny(out, "--stage", "t2i", steps=1)
        proc = run_cli("train.py", *TINY, "--steps", "2", "--out", out, check=False)
        assert_user_error(proc, "--resume")
    elif case == "resume_empty":
        os.makedirs(out)
        assert_user_error(run_cli("train.py", "--resume", "--out", out, check=False), out)
    elif case == "manifest_no_path":
        assert_user_error(run_cli("train.py", "--data", "manifest", "--out", out, check=False), "--data-path")
    elif case == "bad_init":
        assert_user_error(run_cli("train.py", *TINY, "--init", str(tmp_path / "nope"), "--out", out, check=False),
                          "nope")
        assert not os.path.exists(os.path.join(out, "latest"))
    elif case == "triton_on_cpu":  # run_cli's environment has no TRITON_INTERPRET
        proc = run_cli("train.py", *TINY, "--kernels", "triton", "--device", "cpu", "--out", out, check=False)
        assert_user_error(proc, "TRITON_INTERPRET=1")
        assert not os.path.exists(out)
    else:
        assert_user_error(run_cli("train.py", "--steps", "0", "--out", out, check=False), "--steps")


def test_train_on_a_manifest_with_mixed_rows(tmp_path):
    """Image-only rows (t2i pre-training) and rows with depth, read from the user's files."""
    rows = []
    for i in range(4):
        scene = scenes.render_scene(i, 40)
        data.save_png(str(tmp_path / f"{i}.png"), scene["rgb"])
        row = {"image": f"{i}.png", "caption": scene["caption"]}
        if i % 2:
            np.save(tmp_path / f"{i}.npy", scene["depth"])
            row["depth"] = f"{i}.npy"
        rows.append(row)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t2i = train_tiny(str(tmp_path / "t2i"), "--stage", "t2i", "--data", "manifest",
                     "--data-path", str(tmp_path / "m.jsonl"), steps=2)
    out = train_tiny(str(tmp_path / "mofo"), "--stage", "mofo", "--init", t2i, "--data", "manifest",
                     "--data-path", str(tmp_path / "m.jsonl"), "--sparse", "random", steps=2)
    assert json.load(open(os.path.join(checkpoint.resolve_checkpoint(out), "train_state.json")))["step"] == 2


def test_torchrun_on_tar_shards(tmp_path):
    from test_readers import write_shards

    write_shards(str(tmp_path), n_shards=3, per_shard=4)
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *TINY, "--stage", "mofo", "--data", "shards", "--data-path",
                           str(tmp_path / "shard-*.tar"), "--steps", "3", "--save-every", "3", "--out", out],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(os.path.join(checkpoint.resolve_checkpoint(out), "train_state.json")))["step"] == 3


@pytest.mark.slow  # 30-60 s on a 2-core CPU: kept out of the 10-minute suite
def test_compiled_blocks_train_like_eager(tmp_path):
    """--compile (per-block torch.compile, the CUDA default) gives the eager run's losses on CPU."""
    losses = {}
    for flag in ("--compile", "--no-compile"):
        out = train_tiny(str(tmp_path / flag), "--stage", "mofo", flag, steps=2)
        losses[flag] = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(losses["--compile"]) == 2
    assert np.allclose(losses["--compile"], losses["--no-compile"], rtol=1e-4, atol=1e-6), losses


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_and_resumes(tmp_path, sig, code):
    """SIGTERM (a cluster's preemption notice) or Ctrl-C mid-run: the run saves the step it is at,
    says how to resume, exits 128 + signal; the resumed run ends where the uninterrupted one does."""
    args = [*TINY, "--stage", "mofo", "--steps", "12", "--save-every", "100"]
    straight = train_tiny(str(tmp_path / "straight"), "--stage", "mofo", steps=12)
    out = str(tmp_path / "stopped")
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--out", out], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 240
    while (not os.path.exists(metrics) or len(open(metrics).readlines()) < 2) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    assert "--resume" in err and "Traceback" not in err
    step = json.load(open(os.path.join(checkpoint.resolve_checkpoint(out), "train_state.json")))["step"]
    assert 2 <= step < 12, "the run finished before it could be stopped; the test proves nothing"
    run_cli("train.py", "--resume", "--out", out, "--num-workers", "0")
    assert_same_run(weights(straight), weights(out))


def test_checkpoint_files_are_readable_by_others(tmp_path):
    out = train_tiny(str(tmp_path / "run"), "--stage", "t2i", steps=1)
    umask = os.umask(0)
    os.umask(umask)
    ckpt = checkpoint.resolve_checkpoint(out)
    for f in os.listdir(ckpt):
        assert os.stat(os.path.join(ckpt, f)).st_mode & 0o777 == 0o666 & ~umask, f


@pytest.mark.parametrize("script, args", [
    ("train.py", [*TINY, "--steps", "1"]),
    ("sample.py", ["--prompt", "x", "--steps", "1"]),
    ("evaluate.py", ["--data", "scenes", "--n", "1", "--steps", "1"]),
])
def test_clean_errors_for_device_and_out(tmp_path, script, args):
    """An output path under a file, and --device cuda without CUDA: one line, exit 2, nothing written."""
    if script != "train.py":
        args = ["--ckpt", train_tiny(str(tmp_path / "ckpt"), "--stage", "mofo", steps=1), *args]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_user_error(run_cli(script, *args, "--out", str(blocker / "out"), check=False), "--out")
    if not torch.cuda.is_available():
        proc = run_cli(script, *args, "--device", "cuda", "--out", str(tmp_path / "o"), check=False)
        assert_user_error(proc, "--device cuda")
        assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("flags, needle", [(["--res", "30"], "--res"), (["--lr", "-1"], "--lr"),
                                          (["--decay", "1.5"], "--decay"), (["--beta2", "1"], "--beta2")])
def test_bad_values_leave_nothing_behind(tmp_path, flags, needle):
    out = tmp_path / "run"
    assert_user_error(run_cli("train.py", *TINY, "--steps", "1", *flags, "--out", str(out), check=False), needle)
    assert not out.exists()


def test_beta2_reaches_adamw():
    model = torch.nn.Linear(3, 2)
    for flags, beta2 in (([], 0.99), (["--beta2", "0.9"], 0.9)):
        opt = train.make_optimizer(model, train.parse_args(["--out", "unused", *flags]))
        assert opt.param_groups[0]["betas"] == (0.9, beta2)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_gets_a_note(monkeypatch, capsys, native):
    """--dtype bf16 on a CPU that emulates bf16 (measured several times slower than fp32) prints one
    line; auto, fp32, CUDA and CPUs with AVX512-BF16 / AMX print nothing."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for dtype, device in (("bf16", cpu), ("auto", cpu), ("fp32", cpu), ("bf16", cuda), ("auto", cuda)):
        common.note_slow_bf16(dtype, device, "train.py")
    err = capsys.readouterr().err
    assert err == ("" if native else "train.py: note: this CPU has no native bf16 (AVX512-BF16 or AMX), so "
                   "--dtype bf16 runs several times slower than fp32 here, which --dtype auto picks\n")


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")), reason="make uses .venv")
def test_make_demo_trains_in_the_fast_dtype_of_this_machine(tmp_path):
    """Both training stages of `make demo` get bf16 where it is fast here and fp32 where it is emulated."""
    proc = subprocess.run(["make", "-n", "demo", f"DEMO={tmp_path}"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = "bf16" if common.bf16_is_fast(common.pick_device()) else "fp32"
    dtypes = [line.split("--dtype ")[1].split()[0] for line in proc.stdout.splitlines() if "--dtype" in line]
    assert dtypes == [want, want], proc.stdout


def test_learning_rate_schedule():
    """Warm-up, constant, then --decay's linear fall: every step's rate from the formula."""
    args = train.parse_args(["--out", "unused", "--lr", "1e-3", "--warmup", "10", "--steps", "100", "--decay", "0.2"])
    lrs = [train.learning_rate(args, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[9:81])
    assert [lr / 1e-3 for lr in lrs[80:]] == pytest.approx([(100 - s) / 20 for s in range(80, 100)])
    args.decay = 0.0  # the default: constant to the last step
    assert train.learning_rate(args, 99) == pytest.approx(1e-3)


def test_same_run_tolerance():
    """assert_same_run lets through the CPU's rare last-bit rounding differences (~1e-8) and stops a
    one-step slip (a learning-rate-sized move, 1e-5)."""
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(64, 64, generator=g), "opt/w/step": torch.tensor(8.0)}
    assert_same_run(a, {"w": a["w"] + 1e-8 * torch.randn(64, 64, generator=g), "opt/w/step": torch.tensor(8.0)})
    with pytest.raises(AssertionError):
        assert_same_run(a, {"w": a["w"] + 1e-5, "opt/w/step": torch.tensor(8.0)})
    with pytest.raises(AssertionError):
        assert_same_run(a, {"w": a["w"], "opt/w/step": torch.tensor(7.0)})


@pytest.mark.slow  # 30-60 s on a 2-core CPU: kept out of the 10-minute suite
def test_gpu_train_script_dry_run(tmp_path):
    """tools/gpu_train.sh (make gpu-train) end to end on the CPU at toy sizes, so a lent GPU's
    minutes are not lost to its plumbing: every training and evaluation runs, the three claims
    get a verdict from paired per-image numbers, and only the six result files stay."""
    out = tmp_path / "gt"
    env = {**ENV, "PY": sys.executable, "CONFIG": "tiny", "T2I_STEPS": "2", "MOFO_STEPS": "2", "BATCH": "4",
           "N_EVAL": "4", "GEN_STEPS": "2", "DEVICE": "cpu", "POOL": "64", "SEED": "1", "GPU_TRAIN_OUT": str(out)}
    proc = subprocess.run(["bash", "tools/gpu_train.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["claims.json", "claims.md", "full.log", "i2d_worst.png",
                                       "joint_samples.png", "summary.txt"]
    record = json.load(open(out / "claims.json"))
    assert record["steps"] == {"t2i": 2, "dense": 2, "lidar": 2, "scratch": 2}
    assert set(record["evaluations"]) == {"dense", "depth-first", "lidar", "scratch"}
    assert all(c["verdict"] in ("holds", "does not hold", "within the noise") and c["n"] == 4
               for c in record["claims"]), record["claims"]
    summary = (out / "summary.txt").read_text()
    assert "FAILED" not in summary and "SEED=1" in summary
    assert (out / "full.log").read_text().count("--seed 1 ") == 4  # t2i and the three MoFo runs
