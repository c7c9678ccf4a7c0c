"""Built-in DDP: 2 gloo ranks under torchrun train the tokenizer (GAN on), SphereAR and the Sphere Encoder to the
weights of one process with the same global batch; global-batch BatchNorm; activation checkpointing; foreach EMA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spheregen.checkpoint import list_checkpoints, load_weights
from spheregen.engine import dist

SCRIPT = str(Path(__file__).parent / "ddp_train.py")
sys.path.insert(0, str(Path(__file__).parent))
from ddp_train import build  # noqa: E402


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _single(out, *extra):
    res = subprocess.run([sys.executable, SCRIPT, str(out), *extra], capture_output=True, text=True, env=_env(),
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _torchrun(out, *extra, port=29631):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           SCRIPT, str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _same(a_dir, b_dir, keys=None, atol=1e-5):
    """Checkpoints of two runs agree to atol (weights and EMA), on `keys` or on everything saved."""
    for use_ema in (False, True):
        a = load_weights(list_checkpoints(a_dir)[-1], use_ema=use_ema)
        b = load_weights(list_checkpoints(b_dir)[-1], use_ema=use_ema)
        assert a.keys() == b.keys()
        for k in keys if keys is not None else a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (a_dir.name, k,
                                                                                 (a[k] - b[k]).abs().max())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_ranks_match_one_process_for_every_model(tmp_path):
    """Global batch 16: one process accumulating 2 micro-batches of 8 vs 2 ranks x 8 through DDP, with each
    part's model noise seeded alike; per-part BatchNorm in both (sync_batchnorm off). 4 steps, GAN from step 2.
    Parameters and EMA are compared; BatchNorm running statistics are not (accumulation updates them once per
    micro-batch, a rank once per step; the global-batch test below covers them)."""
    models = "tokenizer,ar,sphere"
    _single(tmp_path / "one", "--accum", "2", "--only", models)
    _torchrun(tmp_path / "two", "--only", models)
    for name in models.split(","):
        before = {k: v for k, v in build(name)[0].state_dict().items()}
        after = load_weights(list_checkpoints(tmp_path / "one" / name)[-1])
        assert any(not torch.equal(before[k], after[k]) for k in after), f"{name} did not train"
        if name == "tokenizer":  # the discriminator trained too (steps 2 and 3), and is compared below
            assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("gan."))
        params = [n for n, _ in build(name)[0].named_parameters()]
        _same(tmp_path / "one" / name, tmp_path / "two" / name, keys=params)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_global_batchnorm_two_ranks_match_one_process(tmp_path):
    """With train.sync_batchnorm, 2 ranks x 8 normalise with the statistics of all 16 items: the same weights
    (and running statistics) as one process with batch 16."""
    _single(tmp_path / "one", "--only", "bn")
    _torchrun(tmp_path / "two", "--only", "bn", "--sync-bn", port=29632)
    _same(tmp_path / "one" / "bn", tmp_path / "two" / "bn")


def test_activation_checkpointing_gives_the_same_gradients():
    """checkpoint_blocks recomputes every transformer block in backward: same loss and gradients, same names."""
    model, data = build("ar")
    batch = data.get_batch(torch.arange(8))
    grads = []
    for wrap in (False, True):
        if wrap:
            assert dist.checkpoint_blocks(model) == len(model.blocks)
        model.zero_grad()
        torch.manual_seed(0)
        loss, _ = model.training_loss(batch, 0)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    with torch.no_grad():  # sampling paths run the plain forward
        model.eval()
        model.training_loss(batch, 0)


def test_foreach_ema_matches_per_tensor_lerp(tmp_path):
    from spheregen.engine.trainer import TrainConfig, Trainer

    model, data = build("bn")
    trainer = Trainer(model, data, TrainConfig(steps=1, batch_size=8, ema_decay=0.9), tmp_path, progress=False)
    before = {n: v.clone() for n, v in trainer.ema.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trainer._update_ema()
    params = dict(model.named_parameters())
    for n, v in trainer.ema.items():
        assert torch.allclose(v, before[n] + 0.1 * (params[n] - before[n]), atol=1e-6), n
