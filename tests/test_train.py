"""The shared training loop: schedule, param groups, checkpoints, exact resume, NaN guard, logging."""

import csv
import math

import pytest
import torch
from toy import ToyConfig, ToyData, ToyModel

from spheregen.checkpoint import list_checkpoints
from spheregen.config import to_dict
from spheregen.engine.trainer import TrainConfig, Trainer, default_param_groups, lr_factor
from spheregen.errors import UserError
from spheregen.models import load_model


def _trainer(run_dir, steps, **kw):
    cfg = TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=50, weight_decay=0.05, ema_decay=0.99,
                      flip=True, log_every=50, ckpt_every=kw.pop("ckpt_every", 10_000), seed=7, **kw)
    torch.manual_seed(123)  # model init differs from the loop's seed on purpose
    model = ToyModel(ToyConfig())
    return Trainer(model, ToyData(), cfg, run_dir, config_dict={"model": to_dict(model.config)}, progress=False)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=1000, lr=1.0, min_lr=0.1, warmup_steps=100)
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(99, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(1.0)
    assert lr_factor(550, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(1000, cfg) == pytest.approx(0.1)
    vals = [lr_factor(s, cfg) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_weight_decay_only_on_matrices():
    model = ToyModel(ToyConfig())
    decay, no_decay = default_param_groups(model, 0.05)
    assert all(p.dim() >= 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0


def test_training_reduces_loss_and_writes_checkpoint(tmp_path):
    tr = _trainer(tmp_path, 300)
    first = tr.model.training_loss(ToyData().get_batch(torch.arange(64)), 0)[0].item()
    last = tr.fit()
    assert last["loss"] < 0.5 * first
    ckpts = list_checkpoints(tmp_path)
    assert [c.name for c in ckpts] == ["step_00000300"]
    files = sorted(p.name for p in ckpts[0].iterdir())
    assert files == ["config.json", "ema.safetensors", "model.safetensors", "train_state.pt"]
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [50, 100, 150, 200, 250, 300]
    assert {"loss", "recon", "lr", "grad_norm", "samples_per_s"} <= set(rows[0])
    # EMA weights differ from raw weights, and load_model picks them by default
    ema_model = load_model(ckpts[0])
    raw_model = load_model(ckpts[0], use_ema=False)
    assert not torch.equal(ema_model.net[0].weight, raw_model.net[0].weight)
    assert torch.equal(raw_model.net[0].weight, tr.model.net[0].weight)


def test_resume_is_bitwise_identical(tmp_path):
    """2000 steps in one go == 1000 steps, a fresh process-like Trainer, --resume, 1000 more."""
    full = _trainer(tmp_path / "full", 2000)
    full.fit()
    part = _trainer(tmp_path / "part", 2000, ckpt_every=1000)
    part.fit(until=1000)  # stop early, as a killed run would after its step-1000 checkpoint
    resumed = _trainer(tmp_path / "part", 2000, ckpt_every=1000)
    assert resumed.resume()
    assert resumed.step == 1000
    resumed.fit()
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    for n in full.ema:
        assert torch.equal(full.ema[n], resumed.ema[n]), n
    assert full.opt.state_dict()["state"][0]["step"] == resumed.opt.state_dict()["state"][0]["step"]


def test_resume_skips_partial_checkpoint_dirs(tmp_path):
    tr = _trainer(tmp_path, 20, ckpt_every=10)
    tr.fit()
    # a kill during a write leaves only a hidden temp dir; a truncated weights file is skipped too
    (tmp_path / "checkpoints" / ".step_00000030.tmp-999").mkdir()
    newest = list_checkpoints(tmp_path)[-1]
    (newest / "model.safetensors").write_bytes(b"garbage")
    again = _trainer(tmp_path, 30, ckpt_every=10)
    assert again.resume()
    assert again.step == 10


def test_resume_rejects_other_model_config(tmp_path):
    _trainer(tmp_path, 10, ckpt_every=10).fit()
    other = _trainer(tmp_path, 20)
    other.config_dict["model"] = {"dim": 8, "hidden": 64, "noise": 0.1}
    with pytest.raises(UserError, match="different model config"):
        other.resume()


def test_nan_guard_skips_then_aborts(tmp_path):
    tr = _trainer(tmp_path, 50, ckpt_every=5, max_bad_steps=3)
    original = tr.model.training_loss

    def poisoned(batch, step):
        loss, terms = original(batch, step)
        if step >= 12:
            terms["recon"] = terms["recon"] * float("nan")
            loss = loss * float("nan")
        return loss, terms

    tr.model.training_loss = poisoned
    with pytest.raises(RuntimeError, match="3 consecutive non-finite steps.*recon"):
        tr.fit()
    assert list_checkpoints(tmp_path)[-1].name == "step_00000010"
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_grad_accumulation_matches_big_batch(tmp_path):
    a = _trainer(tmp_path / "a", 5)
    b = _trainer(tmp_path / "b", 5, grad_accum=4)
    for t in (a, b):  # no dropout and no input noise, so only the batch split differs
        t.model.net[2].p, t.model.config.noise = 0.0, 0.0
    torch.manual_seed(0)
    a.fit()
    b.fit()
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5) and not math.isnan(pa.sum().item())
