"""Kill safety (SIGKILL mid-run and mid-checkpoint, then resume bitwise) and torchrun data parallelism."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spheregen.checkpoint import list_checkpoints, load_weights

SCRIPT = str(Path(__file__).parent / "toy_train.py")


def _run(*args, check=True):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, check=check)


def _final(run_dir):
    return load_weights(list_checkpoints(run_dir)[-1]), load_weights(list_checkpoints(run_dir)[-1], use_ema=True)


def _kill_when(proc, marker: str | None, delay: float = 0.0):
    """SIGKILL `proc` once it prints `marker` (or after `delay` seconds)."""
    if marker:
        for line in proc.stdout:
            if marker in line:
                break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    steps = 300
    _run(tmp_path / "ref", steps)
    run = tmp_path / "killed"
    # kill 1: in the middle of training (between checkpoints)
    p = subprocess.Popen([sys.executable, SCRIPT, str(run), str(steps), "--step-sleep", "0.01"], stdout=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 60
    while not list_checkpoints(run) and time.time() < deadline:
        time.sleep(0.05)
    _kill_when(p, None, delay=0.3)
    assert list_checkpoints(run), "no checkpoint was written before the kill"
    # kill 2: while a checkpoint is half written (model.safetensors written, the rest not yet)
    p = subprocess.Popen([sys.executable, SCRIPT, str(run), str(steps), "--resume", "--slow-save"],
                         stdout=subprocess.PIPE, text=True)
    _kill_when(p, "SAVING")
    leftovers = [d.name for d in (run / "checkpoints").iterdir() if d.name.startswith(".")]
    assert leftovers, "the kill should have landed inside a checkpoint write"
    for ckpt in list_checkpoints(run):  # every listed checkpoint is complete
        assert {f.name for f in ckpt.iterdir()} == {"config.json", "model.safetensors", "ema.safetensors",
                                                   "train_state.pt"}
    out = _run(run, steps, "--resume")
    assert "FINISHED" in out.stdout
    ref_w, ref_ema = _final(tmp_path / "ref")
    got_w, got_ema = _final(run)
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], got_w[k]), k
        assert torch.equal(ref_ema[k], got_ema[k]), k


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_ranks_match_single_process(tmp_path):
    """Same global batch (16 = 2 ranks x 8) in one process and under torchrun with gloo: same weights."""
    steps = 30
    _run(tmp_path / "single", steps, "--deterministic")
    _torchrun(tmp_path / "ddp", steps, "--deterministic")
    a, a_ema = _final(tmp_path / "single")
    b, b_ema = _final(tmp_path / "ddp")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
        assert torch.allclose(a_ema[k], b_ema[k], atol=1e-5, rtol=0), k


def _torchrun(run_dir, steps, *extra, port=29617):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           SCRIPT, str(run_dir), str(steps), *map(str, extra)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_fsdp_two_ranks_with_resume_match_single_process(tmp_path):
    """FSDP (sharded weights and AdamW state) for 15 steps, a resumed FSDP run for 15 more: same weights
    as one single-process run of 30 steps with the same global batch."""
    _run(tmp_path / "single", 30, "--deterministic")
    _torchrun(tmp_path / "fsdp", 30, "--deterministic", "--fsdp", "--ckpt-every", 15, "--until", 15, port=29618)
    _torchrun(tmp_path / "fsdp", 30, "--deterministic", "--fsdp", "--ckpt-every", 15, "--resume", port=29619)
    a, a_ema = _final(tmp_path / "single")
    b, b_ema = _final(tmp_path / "fsdp")
    assert list_checkpoints(tmp_path / "fsdp")[-1].name == "step_00000030"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
        assert torch.allclose(a_ema[k], b_ema[k], atol=1e-5, rtol=0), k
