"""Shared test utilities: run the CLIs in subprocesses and make tiny checkpoints."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A subprocess must not run the Triton interpreter for the whole model (slow): the CLIs pick the
# PyTorch path on CPU unless asked, but make the environment explicit.
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
TINY = ["--config", "tiny", "--batch-size", "4", "--num-workers", "0", "--log-every", "1", "--sample-steps", "2"]


def run_cli(script: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user mistake: exit code 2, one line on stderr, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
    for n in needles:
        assert n in err, err


def train_tiny(out: str, *extra: str, steps: int = 2) -> str:
    run_cli("train.py", *TINY, "--steps", str(steps), "--save-every", str(steps), "--out", out, *extra)
    return out


def assert_same_run(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Weights, EMA and AdamW state of two runs that must be the same run (straight, and killed then
    resumed), equal to 1e-7. Not bit for bit: two CPU processes now and then round differently, by
    up to ~1e-8 seen here, while one step more or less, other samples or other noise move some
    weight by 1e-5 or more at the tests' learning rates."""
    assert a.keys() == b.keys()
    off = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert all(d <= 1e-7 for d in off.values()), sorted(off.items(), key=lambda kv: -kv[1])[:5]
