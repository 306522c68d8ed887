"""train.py --fsdp (FSDP2) and --activation-checkpointing on CPU: two gloo processes train like
DDP, resume exactly from DCP shards after SIGKILL, and leave a checkpoint sample.py reads."""
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import checkpoint
import mofo
import train
from common import UserError
from helpers import ENV, ROOT, TINY, assert_same_run, run_cli

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
# --grad-accum 2: micro-batches of one sample per rank, the non-last one without gradient sync.
ARGS = [*TINY, "--stage", "mofo", "--steps", "4", "--save-every", "2", "--grad-accum", "2"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TORCHRUN, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(run: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def flatten(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of nested dicts and lists, by path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    return {k: v for key, sub in items for k, v in flatten(sub, f"{prefix}/{key}").items()}


def state(run: str) -> dict[str, torch.Tensor]:
    """An FSDP run's gathered weights (model.safetensors) and every tensor of its DCP shards
    (weights, EMA and AdamW state, read back whole)."""
    ckpt = checkpoint.resolve_checkpoint(run)
    assert checkpoint.is_sharded(ckpt) and not os.path.exists(os.path.join(ckpt, "optimizer.safetensors"))
    out = load_file(os.path.join(ckpt, "model.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(os.path.join(ckpt, checkpoint.SHARDS), os.path.join(tmp, "shards.pt"))
        out.update(flatten(torch.load(os.path.join(tmp, "shards.pt"), weights_only=False)))
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("fsdp") / "run")
    proc = torchrun(*ARGS, "--fsdp", "--out", out)
    assert proc.stdout.count("saved ") == 2  # rank 0 reports each checkpoint once
    return out


def test_fsdp_matches_ddp(fsdp_run, tmp_path):
    ddp = str(tmp_path / "ddp")
    torchrun(*ARGS, "--out", ddp)
    a, b = metrics(ddp), metrics(fsdp_run)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 5))
    for m, n in zip(a, b):
        for k in ("loss", "loss_rgb", "loss_depth", "grad_norm"):  # grad_norm: clipping sees the whole norm
            assert abs(m[k] - n[k]) <= 1e-4, (m["step"], k, m[k], n[k])
    wa, wb = load_file(os.path.join(checkpoint.resolve_checkpoint(ddp), "model.safetensors")), state(fsdp_run)
    assert set(wa) <= set(wb)  # the same "ema." / "raw." names, gathered whole
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)
    assert json.load(open(os.path.join(checkpoint.resolve_checkpoint(fsdp_run), "train_state.json")))["args"]["fsdp"]


def start_ranks(*args: str) -> list[subprocess.Popen]:
    """The two ranks of a gloo run started as torchrun starts them, but by this process, so that
    SIGKILL reaches both: torchrun's workers are outside its process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}  # as torchrun sets it: the same GEMM rounding as the runs it compares with
    return [subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env={**env, "RANK": r, "LOCAL_RANK": r},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in ("0", "1")]


def test_fsdp_resume_after_sigkill_repeats_the_run(fsdp_run, tmp_path):
    killed = str(tmp_path / "killed")
    ranks = start_ranks(*ARGS, "--fsdp", "--out", killed)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(killed, "latest")) and time.time() < deadline:
        time.sleep(0.01)
    for proc in ranks:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step = json.load(open(os.path.join(checkpoint.resolve_checkpoint(killed), "train_state.json")))["step"]
    assert step < 4, "the run finished before it could be killed; the test proves nothing"
    res = torchrun("--resume", "--steps", "4", "--out", killed, "--num-workers", "0")
    assert f"steps {step}->4" in res.stdout
    a, b = state(fsdp_run), state(killed)
    assert any(k.endswith("exp_avg_sq") for k in a)
    assert_same_run(a, b)
    assert [m["step"] for m in metrics(killed)] == list(range(1, 5))


def test_sample_reads_the_gathered_checkpoint(fsdp_run, tmp_path):
    out = str(tmp_path / "joint")
    run_cli("sample.py", "--ckpt", fsdp_run, "--mode", "joint", "--prompt", "x", "--steps", "1", "--out", out)
    assert os.path.isfile(os.path.join(out, "rgb.png")) and os.path.isfile(os.path.join(out, "depth.npy"))
    model, _ = checkpoint.load_checkpoint(fsdp_run)
    assert model.cfg.has_depth


def test_activation_checkpointing_gives_the_same_steps():
    """Two train_step calls in this process with and without --activation-checkpointing: the
    same losses and weights, with fewer tensors kept for the backward pass."""
    args = train.parse_args([*TINY, "--out", "unused"])
    torch.manual_seed(0)
    model = mofo.MoFo(mofo.get_config("tiny"))
    g = torch.Generator().manual_seed(0)
    batch = {"rgb": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "text": torch.randint(1, 512, (2, 24), generator=g),
             "valid": torch.rand(2, 32, 32, generator=g) < 0.5}
    batch["depth"] = mofo.normalize_depth(torch.rand(2, 32, 32, generator=g) + 0.5, batch["valid"])
    runs = []
    for ac in (False, True):
        net = copy.deepcopy(model)
        if ac:
            train.checkpoint_blocks(net)
        ema, opt, saved = copy.deepcopy(model), train.make_optimizer(net, args), []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            losses = [train.train_step(args, step, net, net, ema, opt, [batch])["loss"] for step in range(2)]
        runs.append((losses, net.state_dict(), sum(saved)))
    (plain, w_plain, n_plain), (ac, w_ac, n_ac) = runs
    assert torch.equal(torch.stack(plain), torch.stack(ac))
    assert all(torch.equal(w_plain[k], w_ac[k]) for k in w_plain)
    assert n_ac < n_plain / 2, (n_ac, n_plain)


def test_fsdp_needs_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="torchrun"):
        train.parse_args([*TINY, "--fsdp", "--out", "unused"])
