"""The practitioners' switches: `sample --compile`, `sample --precision`, and train.logger = csv | tensorboard |
wandb (the optional packages are skipped with a reason when absent)."""

import csv
import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch
from toy import ToyConfig, ToyData, ToyModel

from spheregen.cli import main
from spheregen.config import to_dict
from spheregen.engine.logger import MetricsLogger
from spheregen.engine.trainer import TrainConfig, Trainer
from spheregen.errors import UserError
from spheregen.models.sphere_encoder import SphereEncoder
from spheregen.models.sphere_encoder_nets import Decoder, SphereEncoderConfig
from spheregen.models.tokenizer import Tokenizer
from spheregen.runtime import compile_model, precision_autocast


def _sample(tiny, tmp_path, name, *extra):
    out = tmp_path / f"{name}.npz"
    rc = main(["sample", "--ckpt", str(tiny / "ar"), "--classes", "1,2", "--n", "1", "--steps", "2", "--cfg", "2",
               "--npz", str(out), "--device", "cpu", "--quiet", *extra])
    assert rc == 0
    return np.load(out)["arr_0"]


def test_sample_compile_compiles_the_flow_head(tiny, tmp_path, monkeypatch):
    """--compile goes through torch.compile (here with the eager backend: inductor's C++ build takes a minute
    on these cores; test_compile_inductor_matches_eager runs the real one) and draws the same images."""
    calls = []
    real = torch.compile

    def eager_compile(fn, *args, **kwargs):
        calls.append(getattr(fn, "__self__", fn))
        return real(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    plain = _sample(tiny, tmp_path, "plain")
    compiled = _sample(tiny, tmp_path, "compiled", "--compile")
    assert [type(m).__name__ for m in calls] == ["FlowHead"]
    assert np.array_equal(plain, compiled)


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    """The real torch.compile (inductor) on a tiny Sphere Encoder, CPU; about a minute on one busy core."""
    torch.manual_seed(0)
    model = SphereEncoder(SphereEncoderConfig(image_size=16, channels=1, num_classes=3, patch_size=4, latent_dim=8,
                                              width=32, depth=1, heads=2, mixer_depth=1, perceptual="ssim")).eval()
    labels = torch.tensor([0, 2])
    ref = model.generate_images(labels, [0, 1], {"steps": 2})
    assert compile_model(model) == ["encoder", "decoder"]
    try:
        out = model.generate_images(labels, [0, 1], {"steps": 2})
    except Exception as e:  # no C++ compiler, an unsupported platform, ...
        pytest.skip(f"torch inductor is not available here: {type(e).__name__}: {str(e)[:200]}")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert all(not k.startswith("_orig_mod") for k in model.state_dict())  # still saves as before


def test_compile_refuses_a_model_without_a_step():
    with pytest.raises(UserError, match="none of"):
        compile_model(torch.nn.Linear(2, 2))


def _spy_autocast(monkeypatch, cls, name: str) -> list:
    """Record the CPU autocast dtype (None: off) every time cls.name runs."""
    seen, real = [], getattr(cls, name)

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, name, spy)
    return seen


def test_sample_precision_bf16_autocasts(tiny, tmp_path, monkeypatch):
    """--precision bf16 runs the Sphere Encoder's networks and the AR's tokenizer decode under bf16 autocast."""
    torch.manual_seed(0)
    se = SphereEncoder(SphereEncoderConfig(image_size=16, channels=1, num_classes=3, patch_size=4, latent_dim=8,
                                           width=32, depth=1, heads=2, mixer_depth=1, perceptual="ssim"))
    se.save_pretrained(tmp_path / "se")
    seen = _spy_autocast(monkeypatch, Decoder, "forward")
    args = ["sample", "--ckpt", str(tmp_path / "se"), "--n", "1", "--steps", "2", "--device", "cpu", "--quiet"]
    assert main(args + ["--npz", str(tmp_path / "fp32.npz")]) == 0
    assert seen and set(seen) == {None}
    seen.clear()
    assert main(args + ["--npz", str(tmp_path / "bf16.npz"), "--precision", "bf16"]) == 0
    assert seen and set(seen) == {torch.bfloat16}
    fp32, bf16 = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in ("fp32", "bf16"))
    assert bf16.shape == fp32.shape == (3, 16, 16, 1) and bf16.dtype == np.uint8
    decodes = _spy_autocast(monkeypatch, Tokenizer, "decode")
    _sample(tiny, tmp_path, "ar_bf16", "--precision", "bf16")
    assert decodes == [torch.bfloat16]
    with pytest.raises(SystemExit) as e:
        main(["sample", "--ckpt", str(tiny / "ar"), "--precision", "fp8", "--npz", str(tmp_path / "x.npz")])
    assert e.value.code == 2


def test_precision_autocast_choices_and_tf32():
    with precision_autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with precision_autocast("cpu", "fp16"):
        assert torch.get_autocast_dtype("cpu") == torch.float16
    with precision_autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(UserError, match="fp32, bf16, fp16"):
        precision_autocast("cpu", "fp64")
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CUDA is not available" on a CPU-only machine
            precision_autocast("cuda", "fp32")  # TF32 for fp32 matmuls / convolutions on CUDA
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def _train(run_dir, logger):
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=0, log_every=2, ckpt_every=10_000, seed=0,
                      logger=logger)
    torch.manual_seed(0)
    model = ToyModel(ToyConfig())
    Trainer(model, ToyData(), cfg, run_dir, config_dict={"model": to_dict(model.config)}, progress=False).fit()
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows][:2] == [2, 4] and "loss" in rows[0]  # the CSV is always written


def test_logger_csv(tmp_path):
    _train(tmp_path / "run", "csv")
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name in ("tb", "wandb")) == []


def test_logger_unknown_is_one_line(tmp_path):
    with pytest.raises(UserError, match="csv, tensorboard, wandb"):
        MetricsLogger(tmp_path, "mlflow")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (pip install 'spheregen[tensorboard]')")
def test_logger_tensorboard(tmp_path):
    _train(tmp_path / "run", "tensorboard")
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_logger_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    _train(tmp_path / "run", "wandb")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs and os.environ.get("WANDB_MODE") is None
    assert list(runs[0].glob("*.wandb"))


def _spy_head_dtype(monkeypatch) -> list:
    """Record the dtype the flow head's sampling engine is asked for (on CPU the packed engine runs the head)."""
    from spheregen.models import flow_head

    seen, real = [], flow_head.packed_trunk

    def spy(head, dtype, rows):
        seen.append(dtype)
        return real(head, dtype, rows)

    monkeypatch.setattr(flow_head, "packed_trunk", spy)
    return seen


def test_sample_precision_reaches_the_ar_networks(tiny, tmp_path, monkeypatch):
    """SphereAR's transformer and flow head follow --precision (default on CPU: fp32, no autocast)."""
    from spheregen.layers import Block

    heads, blocks = _spy_head_dtype(monkeypatch), _spy_autocast(monkeypatch, Block, "forward")
    _sample(tiny, tmp_path, "ar_default")
    assert heads and set(heads) == {torch.float32} and set(blocks) == {None}
    heads.clear(), blocks.clear()
    _sample(tiny, tmp_path, "ar_bf16_head", "--precision", "bf16")
    assert heads and set(heads) == {torch.bfloat16} and set(blocks) == {torch.bfloat16}


def test_pipeline_precision_reaches_the_ar_networks(tiny, monkeypatch):
    from spheregen.pipelines import SphereARPipeline

    heads = _spy_head_dtype(monkeypatch)
    pipe = SphereARPipeline.from_pretrained(tiny / "ar").to(precision="bf16")
    pipe(class_labels=[1], num_inference_steps=1, seed=0)
    assert heads and set(heads) == {torch.bfloat16}
