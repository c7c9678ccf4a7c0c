"""The pipeline API (spheregen.pipelines) and examples/generate.py on tiny untrained checkpoints."""

import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spheregen.errors import UserError
from spheregen.generation import load_generator, sample_images, store_default_sampling
from spheregen.models.sphere_encoder import SphereEncoder
from spheregen.models.sphere_encoder_nets import SphereEncoderConfig
from spheregen.pipelines import SphereARPipeline, SphereEncoderPipeline, pipeline_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_se(tmp_path_factory) -> Path:
    """An untrained tiny class-conditional Sphere Encoder checkpoint (16 px, grayscale, 3 classes)."""
    torch.manual_seed(0)
    model = SphereEncoder(SphereEncoderConfig(image_size=16, channels=1, num_classes=3, patch_size=4, latent_dim=8,
                                              width=32, depth=1, heads=2, mixer_depth=1, perceptual="ssim"))
    path = tmp_path_factory.mktemp("se") / "se"
    model.save_pretrained(path)
    return path


def test_ar_pipeline_matches_sample_images(tiny):
    pipe = SphereARPipeline.from_pretrained(tiny / "ar")
    out = pipe(class_labels=[3, 7], guidance_scale=2.0, num_inference_steps=2, seed=5)
    assert len(out.images) == 2 and all(isinstance(im, Image.Image) for im in out.images)
    assert out.images[0].size == (28, 28) and out.labels == [3, 7]
    ref = sample_images(load_generator(tiny / "ar"), [3, 7], 5, 64, {"cfg": 2.0, "steps": 2}, progress=False)
    pt = pipe([3, 7], 2.0, 2, seed=5, output_type="pt").images
    assert torch.equal(pt, ref)  # the pipeline draws exactly what `spheregen sample` draws
    g = torch.Generator().manual_seed(1)
    a = pipe(3, num_inference_steps=2, generator=g, output_type="np", return_dict=False)[0]
    b = pipe(3, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert a.dtype == np.uint8 and np.array_equal(a, b)


def test_pipeline_starts_from_the_checkpoints_default_sampling(tiny_se, tmp_path, monkeypatch):
    """A checkpoint's stored default sampling (what the demo's sweep writes) is what the pipeline uses unless
    the caller overrides it, as `spheregen sample` does."""
    import spheregen.pipelines as pipelines

    ckpt = tmp_path / "se"
    shutil.copytree(tiny_se, ckpt)
    store_default_sampling(ckpt, {"cfg": 1.5, "steps": 2})
    seen = []
    real = pipelines.sample_images
    monkeypatch.setattr(pipelines, "sample_images", lambda model, labels, seed, bs, opts, **kw: (
        seen.append((opts.cfg, opts.steps)) or real(model, labels, seed, bs, opts, **kw)))
    stored, plain = SphereEncoderPipeline.from_pretrained(ckpt), SphereEncoderPipeline.from_pretrained(tiny_se)
    out = stored([0, 2], seed=3, output_type="pt").images
    assert torch.equal(out, plain([0, 2], 1.5, 2, seed=3, output_type="pt").images)
    plain([0, 2], seed=3, output_type="pt")
    stored([0, 2], 1.0, 1, seed=3, output_type="pt")  # the caller's settings win
    default = SphereEncoderPipeline.from_pretrained(tiny_se).model.sampling_options({})
    assert seen == [(1.5, 2), (1.5, 2), (default.cfg, default.steps), (1.0, 1)]
    assert (default.cfg, default.steps) != (1.5, 2)


def test_ar_pipeline_options_and_errors(tiny):
    pipe = SphereARPipeline.from_pretrained(tiny / "ar")
    assert pipe(1, num_inference_steps=1, sampler="euler", cfg_schedule="constant", output_type="pt").images.shape \
        == (1, 1, 28, 28)
    with pytest.raises(UserError):
        pipe(1, num_inference_steps=1, gamma=1.0)  # a Sphere Encoder option
    with pytest.raises(UserError, match="class-conditional"):
        pipe(num_inference_steps=1)
    with pytest.raises(UserError):
        pipe(10, num_inference_steps=1)  # out of range
    with pytest.raises(UserError):
        pipe(1, num_inference_steps=1, output_type="jpeg")


def test_ar_pipeline_save_pretrained_is_self_contained(tiny, tmp_path):
    pipe = SphereARPipeline.from_pretrained(tiny / "ar").to("cpu")
    before = pipe(2, num_inference_steps=1, seed=0, output_type="pt").images
    pipe.save_pretrained(tmp_path / "saved")
    again = SphereARPipeline.from_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer").is_dir()
    assert torch.equal(again(2, num_inference_steps=1, seed=0, output_type="pt").images, before)


def test_sphere_encoder_pipeline_and_edits(tiny_se, tmp_path):
    with pytest.raises(UserError, match="SphereARPipeline needs a SphereAR checkpoint"):
        SphereARPipeline.from_pretrained(tiny_se)
    pipe = SphereEncoderPipeline.from_pretrained(tiny_se)
    out = pipe(class_labels=[0, 2], num_images=2, guidance_scale=1.5, num_inference_steps=2, seed=0, gamma=1.0)
    assert len(out.images) == 4 and out.images[0].size == (16, 16) and out.labels == [0, 0, 2, 2]
    a, b = out.images[0], out.images[3]
    m = pipe.manipulate(a, class_label=1, num_inference_steps=2, return_steps=True)
    assert len(m.images) == 2 and len(m.images[-1]) == 1
    c = pipe.crossover(a, b, mode="top-bottom", num_inference_steps=2, output_type="pt")
    assert c.images.shape == (1, 1, 16, 16)
    i = pipe.interpolate(a, b, num_images=3, class_label=0)
    assert len(i.images) == 3
    a.save(tmp_path / "a.png")
    assert len(pipe.manipulate(tmp_path / "a.png", 2, num_inference_steps=1).images) == 1
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(UserError, match="cannot read image"):
        pipe.manipulate(tmp_path / "bad.png", 1)
    pipe.save_pretrained(tmp_path / "se_copy")
    assert isinstance(pipeline_for(tmp_path / "se_copy"), SphereEncoderPipeline)


def test_example_generates_two_images(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid.png"
    argv = ["generate.py", "--ckpt", str(tiny / "ar"), "--classes", "1,4", "--n", "1", "--steps", "2",
            "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "examples" / "generate.py"), run_name="__main__")
    assert "2 images" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size == (28, 56)


def test_pipeline_compile_and_precision(tiny_se, monkeypatch):
    """pipe.compile() goes through torch.compile (eager backend here: inductor's build takes a minute on these
    cores, tests/test_switches.py runs it as a slow test); .to(precision="bf16") samples under bf16 autocast."""
    real, compiled = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(fn) or real(fn, backend="eager"))
    pipe = SphereEncoderPipeline.from_pretrained(tiny_se)
    ref = pipe([0, 1], num_inference_steps=2, output_type="pt").images
    assert torch.equal(pipe.compile()([0, 1], num_inference_steps=2, output_type="pt").images, ref)
    assert len(compiled) == 2  # encoder and decoder
    bf16 = pipe.to("cpu", precision="bf16")([0, 1], num_inference_steps=2, output_type="pt").images
    assert bf16.dtype == torch.float32 and bf16.shape == ref.shape
    with pytest.raises(UserError, match="precision"):
        pipe.to(precision="fp8")
