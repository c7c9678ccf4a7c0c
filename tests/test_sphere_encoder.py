"""Sphere Encoder: geometry of the latents, noise levels, losses, Algorithm 1 sampling, training, editing CLI."""

import argparse
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spheregen.cli import main as cli_main
from spheregen.cli.train import run_training
from spheregen.config import from_dict, load_toml
from spheregen.data.builders import write_dataset
from spheregen.errors import UserError
from spheregen.models import load_model
from spheregen.models.sphere_encoder import SphereEncoder
from spheregen.models.sphere_encoder_edit import slerp, stitch
from spheregen.models.sphere_encoder_loss import stratified_uniform
from spheregen.models.sphere_encoder_nets import SphereEncoderConfig

ROOT = Path(__file__).resolve().parents[1]
TERMS = {"w_recon_dist": "recon_dist", "w_recon_perc": "recon_perc", "w_con_dist": "con_dist",
         "w_con_perc": "con_perc", "w_lat_con": "lat_con"}


def tiny_config(**kw) -> SphereEncoderConfig:
    base = dict(image_size=16, channels=1, num_classes=3, patch_size=4, latent_dim=8, width=32, depth=1, heads=2,
                mixer_depth=1, perceptual="ssim")
    return SphereEncoderConfig(**{**base, **kw})


def tiny_model(seed: int = 0, **kw) -> SphereEncoder:
    """A tiny model with every zero-initialised path perturbed, so outputs depend on every input."""
    torch.manual_seed(seed)
    model = SphereEncoder(tiny_config(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def batch(n=8, seed=0, cfg=None):
    cfg = cfg or tiny_config()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, cfg.channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    return x, torch.randint(0, max(cfg.num_classes, 1), (n,), generator=g)


# -- geometry -------------------------------------------------------------------------------------------
def test_spherify_puts_model_latents_on_radius_sqrt_L():
    model = tiny_model()
    x, y = batch()
    v = model.encode_sphere(x, y)
    L = model.config.latent_size
    assert v.shape == (8, *model.latent_shape) and L == 16 * 8
    norms = v.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(L)), rtol=1e-4)
    e = torch.randn_like(v)
    noisy = model.noisy_spherify(v, torch.linspace(0, 10, 8), e)
    assert torch.allclose(noisy.flatten(1).norm(dim=1), torch.full_like(norms, math.sqrt(L)), rtol=1e-4)


def test_latent_bn_centres_every_coordinate_and_its_stats_are_saved(tmp_path):
    model = tiny_model(latent_bn=True).train()
    x, y = batch(16)
    x = x * 0.1 + 0.5  # a tight cluster of inputs: without BN their latents share one direction
    z = model.encode(x, y).flatten(1)
    assert torch.allclose(z.mean(0), torch.zeros(z.shape[1]), atol=1e-4)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(z.shape[1]), atol=0.05)  # eps = 1e-5
    plain = tiny_model(latent_bn=False).train()
    mean_dir = lambda v: float(v.flatten(1).div(v.flatten(1).norm(dim=1, keepdim=True)).mean(0).norm())  # noqa: E731
    assert mean_dir(model.encode_sphere(x, y)) < 0.5 * mean_dir(plain.encode_sphere(x, y))
    model.eval()
    assert model.encoder.bn.num_batches_tracked > 0
    model.save_pretrained(tmp_path / "m")
    again = SphereEncoder.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(again.encoder.bn.running_mean, model.encoder.bn.running_mean)
    assert torch.equal(again.encode(x, y), model.encode(x, y))


@pytest.mark.parametrize("alpha", [30.0, 60.0, 80.0, 85.0])
def test_noise_angle_matches_alpha(alpha):
    """With sigma = tan(alpha), angle(v, f(v + sigma e)) averages alpha for L = 2048 (Sec. 2.2)."""
    model = tiny_model()
    torch.manual_seed(1)
    v = model.spherify(torch.randn(512, 16, 128))  # L = 2048
    out = model.noisy_spherify(v, math.tan(math.radians(alpha)), torch.randn_like(v))
    cos = (v.flatten(1) * out.flatten(1)).sum(1) / (v.flatten(1).norm(dim=1) * out.flatten(1).norm(dim=1))
    mean_angle = torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).mean().item()
    assert abs(mean_angle - alpha) < 1.0


def test_stratified_noise_levels():
    torch.manual_seed(0)
    r = stratified_uniform(34)
    assert r.max() == 1 and r.min() == 0
    mid = torch.sort(r).values[1:-1]
    assert torch.all((mid >= torch.arange(32) / 32) & (mid <= (torch.arange(32) + 1) / 32))  # one per stratum
    model = tiny_model(mix_prob=0.0)
    r_big, r_small = model.noise_levels(64)
    assert r_big.max() == 1 and r_big.min() == 0
    assert torch.all(r_small <= 0.5 * r_big + 1e-6) and torch.all(r_small >= 0)
    # large-angle mixing: "code" reaches 1 + u (ratio - 1) with u <= p; "uniform" the whole [alpha, alpha + 5]
    ratio = math.tan(math.radians(85)) / math.tan(math.radians(80))
    for mode, hi in (("code", 1 + 0.5 * (ratio - 1)), ("uniform", ratio)):
        model = tiny_model(mix_prob=0.5, mix_mode=mode)
        r_big, _ = torch.cat([torch.stack(model.noise_levels(64)) for _ in range(50)], dim=1)
        hard = r_big[r_big > 1 + 1e-6]
        assert 0.3 < len(hard) / r_big.numel() < 0.55
        assert hard.max() <= hi + 1e-5 and hard.max() > hi - 0.1 * (ratio - 1)


# -- losses -----------------------------------------------------------------------------------------------
def _loss(model, seed=0):
    torch.manual_seed(seed)
    return model.training_loss(batch(), 0)


def test_loss_terms_finite_and_each_weight_switches_its_term():
    model = tiny_model().train()
    weights = {k: getattr(model.config, k) for k in TERMS}
    loss, terms = _loss(model)
    assert set(terms) == set(TERMS.values())
    assert all(torch.isfinite(t) and t >= 0 for t in terms.values()) and torch.isfinite(loss)
    assert loss.item() == pytest.approx(sum(weights[k] * terms[n].item() for k, n in TERMS.items()), rel=1e-5)
    for key, name in TERMS.items():
        setattr(model.config, key, 0.0)
        loss_off, terms_off = _loss(model)
        assert name not in terms_off and set(terms_off) == set(TERMS.values()) - {name}
        assert loss_off.item() == pytest.approx(loss.item() - weights[key] * terms[name].item(), rel=1e-4, abs=1e-6)
        setattr(model.config, key, weights[key])


def test_latent_consistency_trains_encoder_and_decoder():
    model = tiny_model().train()
    for key in TERMS:
        setattr(model.config, key, 0.0)
    model.config.w_lat_con = 1.0
    loss, _ = _loss(model)
    loss.backward()
    for part in (model.encoder, model.decoder.blocks):
        assert sum(p.grad.abs().sum() for p in part.parameters() if p.grad is not None) > 0


def test_pixel_consistency_target_is_stop_grad():
    """Only w_con_dist on: D(v_NOISY) gets gradient, the target D(v_noisy) none (Eq. 8)."""
    model = tiny_model().train()
    for key in TERMS:
        setattr(model.config, key, 0.0)
    model.config.w_con_dist = 1.0
    grads = []
    def hook(module, inputs, out):
        out.register_hook(grads.append)  # returns None: the output itself is unchanged

    model.decoder.register_forward_hook(hook)
    loss, _ = _loss(model)
    loss.backward()
    big, small = grads[0].chunk(2)
    assert big.abs().sum() > 0 and small.abs().sum() == 0


def test_label_dropout_rate_and_param_groups():
    model = tiny_model(num_classes=5, label_dropout=0.1).train()
    torch.manual_seed(0)
    dropped = model._drop(torch.zeros(20000, dtype=torch.long))
    assert set(dropped.unique().tolist()) == {0, 5} and 0.09 < (dropped == 5).float().mean() < 0.11
    groups = model.param_groups(0.0)
    enc_ids = {id(p) for p in model.encoder.parameters()}
    for g in groups:
        assert g["lr_scale"] == (0.1 if id(g["params"][0]) in enc_ids else 1.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# -- generation ------------------------------------------------------------------------------------------
def test_generate_is_deterministic_per_seed():
    model = tiny_model()
    labels = torch.tensor([0, 1, 2])
    a = model.generate(labels, steps=3, cfg=1.5, seeds=[5, 6, 7])
    b = model.generate(labels, steps=3, cfg=1.5, seeds=[5, 6, 7])
    assert torch.equal(a, b) and a.shape == (3, 1, 16, 16) and a.abs().max() <= 1
    alone = model.generate(labels[1:2], steps=3, cfg=1.5, seeds=[6])  # sample k depends only on seeds[k]
    assert torch.allclose(alone[0], a[1], atol=1e-5)
    c = model.generate(labels, steps=3, cfg=1.5, seeds=[8, 6, 7])
    assert not torch.allclose(c[0], a[0], atol=1e-3) and torch.allclose(c[1], a[1], atol=1e-5)


def _record_noise(model, monkeypatch):
    seen = []
    original = model.noisy_spherify

    def spy(v, sigma, e):
        seen.append((float(sigma), e.clone()))
        return original(v, sigma, e)

    monkeypatch.setattr(model, "noisy_spherify", spy)
    return seen


def test_shared_noise_reuses_one_fresh_e_prime(monkeypatch):
    model = tiny_model()
    seen = _record_noise(model, monkeypatch)
    model.generate(torch.tensor([0, 1]), steps=4, seeds=[0, 1], shared_noise=True)
    assert len(seen) == 3 and all(torch.equal(e, seen[0][1]) for _, e in seen)
    e0 = torch.randn((*model.latent_shape,), generator=torch.Generator().manual_seed(0))  # the initial e of sample 0
    assert not torch.allclose(seen[0][1][0], e0)  # e' is not the initial e
    seen.clear()
    model.generate(torch.tensor([0, 1]), steps=4, seeds=[0, 1], shared_noise=False)
    assert len(seen) == 3 and not torch.equal(seen[0][1], seen[1][1]) and not torch.equal(seen[1][1], seen[2][1])
    shared = model.generate(torch.tensor([0, 1]), steps=4, seeds=[0, 1], shared_noise=True)
    fresh = model.generate(torch.tensor([0, 1]), steps=4, seeds=[0, 1], shared_noise=False)
    assert not torch.allclose(shared, fresh, atol=1e-4)
    one = [model.generate(torch.tensor([0, 1]), steps=1, seeds=[0, 1], shared_noise=s) for s in (True, False)]
    assert torch.equal(one[0], one[1])


def test_gamma_changes_only_multi_step_outputs(monkeypatch):
    assert SphereEncoder.noise_schedule(3, 1.0, 1.0) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert SphereEncoder.noise_schedule(3, 0.25, 0.0) == pytest.approx([0.25] * 3)
    model = tiny_model()
    labels = torch.tensor([0, 2])
    for steps in (1, 2, 3):
        g0 = model.generate(labels, steps=steps, seeds=[3, 4], gamma=0.0)
        g1 = model.generate(labels, steps=steps, seeds=[3, 4], gamma=1.0)
        assert torch.equal(g0, g1) if steps == 1 else not torch.allclose(g0, g1, atol=1e-4)
    seen = _record_noise(model, monkeypatch)
    model.generate(labels, steps=4, seeds=[3, 4], gamma=1.0)
    sigma = model.sigma_max
    assert [s for s, _ in seen] == pytest.approx([sigma * 2 / 3, sigma / 3, 0.0])


def test_cfg_positions():
    model = tiny_model()
    labels = torch.tensor([0, 1, 2])
    out = {p: model.generate(labels, steps=2, cfg=3.0, cfg_position=p, seeds=[1, 2, 3]) for p in
           ("pixel", "latent", "combo")}
    assert all(o.abs().max() <= 1 for o in out.values())
    assert not torch.allclose(out["pixel"], out["latent"], atol=1e-4)
    assert not torch.allclose(out["pixel"], out["combo"], atol=1e-4)
    plain = model.generate(labels, steps=2, cfg=1.0, seeds=[1, 2, 3])
    assert all(torch.equal(plain, model.generate(labels, steps=2, cfg=1.0, cfg_position=p, seeds=[1, 2, 3]))
               for p in ("pixel", "latent"))
    # combo applies sqrt(s) at each position: at 1 step only the pixel one acts
    assert torch.allclose(model.generate(labels, steps=1, cfg=4.0, cfg_position="combo", seeds=[1, 2, 3]),
                          model.generate(labels, steps=1, cfg=2.0, cfg_position="pixel", seeds=[1, 2, 3]))
    # pixel CFG is lerp(D(v, null), D(v, y), s) at the first (1-step) decode
    v = model.spherify(torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(s))
                                    for s in (1, 2, 3)]))
    cond, uncond = model.decode(v, labels), model.decode(v, None)
    want = (uncond + 3.0 * (cond - uncond)).clamp(-1, 1)
    assert torch.allclose(model.generate(labels, steps=1, cfg=3.0, cfg_position="pixel", seeds=[1, 2, 3]), want,
                          atol=1e-5)


def test_pixel_cfg_clamps_before_the_next_encoder_pass():
    model = tiny_model()
    with torch.no_grad():
        model.decoder.labels.table.weight.mul_(100)  # a strong class signal
    v = model.spherify(torch.randn(2, *model.latent_shape))
    cond, uncond = model.decode(v, torch.tensor([0, 1])), model.decode(v, None)
    assert (uncond + 50.0 * (cond - uncond)).abs().max() > 1.5  # so unclamped guidance would leave [-1, 1]
    seen = []
    model.encoder.register_forward_hook(lambda m, i, out: seen.append(i[0].abs().max().item()))
    x = model.generate(torch.tensor([0, 1]), steps=3, cfg=50.0, cfg_position="pixel", seeds=[0, 1])
    assert len(seen) == 2 and max(seen) <= 1.0 and x.abs().max() <= 1.0


def test_unconditional_model_and_reconstruct():
    model = tiny_model(num_classes=0)
    assert model.encoder.labels is None and all(b.adaln is None for b in model.decoder.blocks)
    x, _ = batch(4, cfg=model.config)
    rec = model.reconstruct(x)
    assert rec.shape == x.shape and torch.allclose(rec, model.decode(model.encode_sphere(x)))
    out = model.generate_images(torch.zeros(3, dtype=torch.long), [0, 1, 2], {"steps": 2, "cfg": 2.0})
    assert out.shape == (3, 1, 16, 16)
    loss, terms = model.train().training_loss((x, torch.zeros(4, dtype=torch.long)), 0)
    assert torch.isfinite(loss)


def test_slerp_stays_on_sphere_and_hits_endpoints():
    torch.manual_seed(0)
    a, b = SphereEncoder.spherify(tiny_model(), torch.randn(2, 16, 8)).unbind(0)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], a, atol=1e-4) and torch.allclose(path[-1], b, atol=1e-4)
    assert torch.allclose(path.flatten(1).norm(dim=1), torch.full((5,), math.sqrt(128.0)), rtol=1e-4)
    angles = [torch.arccos(torch.dot(path[i].flatten(), path[i + 1].flatten()) / 128).item() for i in range(4)]
    assert max(angles) - min(angles) < 1e-3  # constant angular speed
    x = torch.zeros(1, 1, 4, 4)
    assert stitch(x - 1, x + 1)[0, 0, 0].tolist() == [-1, -1, 1, 1]


# -- parameter counts of the paper's configs (meta device) -------------------------------------------------
@pytest.mark.parametrize("name, paper, tol", [("imagenet256_l", 950e6, 0.01), ("flowers256_l", 948e6, 0.01),
                                               ("animalfaces256_l", 642e6, 0.01), ("imagenet256_xl", 1.3e9, 0.07)])
def test_paper_parameter_counts(name, paper, tol):
    cfg = from_dict(SphereEncoderConfig, load_toml(ROOT / "configs" / "sphere" / f"{name}.toml")["model"])
    with torch.device("meta"):
        model = SphereEncoder(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - paper) / paper < tol, f"{name}: {n / 1e6:.1f}M vs {paper / 1e6:.0f}M"


# -- training, checkpoints, CLI -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run of the tiny MNIST config (shrunk further) on 48 random 16 px images, via run_training."""
    root = tmp_path_factory.mktemp("sphere")
    rng = np.random.default_rng(0)
    write_dataset(root / "data", rng.integers(0, 256, (48, 16, 16, 1), dtype=np.uint8),
                  np.arange(48) % 3, ["a", "b", "c"], source="test")
    config = load_toml(ROOT / "configs" / "sphere" / "mnist_tiny.toml",
                       ["model.width=32", "model.depth=1", "model.heads=2", "model.mixer_depth=1",
                        "train.batch_size=8", "train.log_every=1", "train.ckpt_every=3", "train.warmup_steps=1",
                        "model.perceptual=ssim", "model.w_recon_perc=1.0", "model.w_con_perc=0.5"])
    config["data"]["path"] = str(root / "data")
    args = argparse.Namespace(out=str(root / "run"), steps=3, resume=False, device="cpu")
    result = run_training("sphere", config, args)
    return root, result


def test_smoke_training_run(trained):
    root, result = trained
    assert math.isfinite(result["loss"]) and math.isfinite(result["recon_psnr"])
    assert {"recon_dist", "con_dist", "recon_perc", "con_perc", "lat_con"} <= set(result)
    ckpt = root / "run" / "checkpoints" / "step_00000003"
    assert (ckpt / "model.safetensors").is_file()
    for T in (1, 4):
        assert (root / "run" / "eval" / f"samples_step00000003_{T}steps.png").is_file()
    model = load_model(ckpt)
    assert isinstance(model, SphereEncoder) and model.config.num_classes == 3 and model.config.image_size == 16


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    again = SphereEncoder.from_pretrained(tmp_path / "m").eval()
    assert again.config == model.config
    labels = torch.tensor([0, 1])
    assert torch.equal(model.generate(labels, steps=2, cfg=2.0, seeds=[0, 1]),
                       again.generate(labels, steps=2, cfg=2.0, seeds=[0, 1]))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(d / "a.png")  # wrong size: resized
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(d / "b.jpg")
    (d / "bad.png").write_text("not an image")
    return d


def test_edit_commands_write_pngs(trained, images, tmp_path, capsys):
    root, _ = trained
    ckpt = str(root / "run" / "checkpoints" / "step_00000003")
    a, b = str(images / "a.png"), str(images / "b.jpg")
    runs = {
        "m.png": ["manipulate", "--image", a, "--class", "1", "2", "--steps", "3"],
        "c.png": ["crossover", "--images", a, b, "--steps", "3", "--r", "0.25", "--gamma", "1"],
        "i.png": ["interpolate", "--images", a, b, "--n", "5", "--steps", "2"],
    }
    for out, argv in runs.items():
        assert cli_main(["edit", *argv, "--ckpt", ckpt, "--out", str(tmp_path / out)]) == 0
        assert Image.open(tmp_path / out).size[0] > 16
    # manipulate: one row per class of input + 3 steps; interpolate: A + 5 + B
    assert Image.open(tmp_path / "m.png").size[1] < Image.open(tmp_path / "m.png").size[0]
    r = subprocess.run([sys.executable, "-m", "spheregen.cli", "edit", "crossover", "--ckpt", ckpt, "--images", a, b,
                        "--result-only", "--out", str(tmp_path / "cli.png")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "cli.png").size == (16 + 4, 16 + 4)


@pytest.mark.parametrize("argv, message", [
    (["manipulate", "--image", "{a}", "--class", "3"], "class id 3 is out of range"),
    (["manipulate", "--image", "{bad}", "--class", "0"], "cannot read image"),
    (["crossover", "--images", "{a}", "{missing}"], "does not exist"),
    (["interpolate", "--images", "{a}", "{a}", "--ckpt", "{nockpt}"], "not a spheregen checkpoint"),
])
def test_edit_bad_input_is_one_line_exit_2(trained, images, tmp_path, capsys, argv, message):
    root, _ = trained
    paths = {"a": images / "a.png", "bad": images / "bad.png", "missing": images / "nope.png", "nockpt": tmp_path}
    argv = [s.format(**paths) for s in argv]
    if "--ckpt" not in argv:
        argv += ["--ckpt", str(root / "run" / "checkpoints" / "step_00000003")]
    assert cli_main(["edit", *argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_sample_command_runs_sphere_checkpoint(trained, tmp_path):
    root, _ = trained
    ckpt = str(root / "run" / "checkpoints" / "step_00000003")
    assert cli_main(["sample", "--ckpt", ckpt, "--classes", "0,2", "--n", "2", "--steps", "2", "--cfg", "1.5",
                     "--out", str(tmp_path / "g.png"), "--quiet"]) == 0
    assert Image.open(tmp_path / "g.png").size[1] == 2 * 16 + 3 * 2


def test_sample_command_passes_sphere_options(trained, tmp_path):
    """--cfg-position / --fresh-noise / --gamma reach generate(); without --steps the model's 4 passes are used."""
    root, _ = trained
    ckpt = str(root / "run" / "checkpoints" / "step_00000003")
    model = load_model(ckpt).eval()

    def sample(name: str, *extra: str) -> np.ndarray:
        assert cli_main(["sample", "--ckpt", ckpt, "--classes", "0,2", "--n", "2", "--npz", str(tmp_path / name),
                         "--quiet", *extra]) == 0
        return np.load(tmp_path / name)["arr_0"]

    def direct(**kw) -> np.ndarray:
        from spheregen.images import to_uint8

        with torch.no_grad():
            return to_uint8(model.generate(torch.tensor([0, 0, 2, 2]), seeds=[0, 1, 2, 3], **kw))

    assert np.array_equal(sample("d.npz"), direct(steps=4))
    assert np.array_equal(sample("p.npz", "--steps", "4", "--cfg", "2", "--cfg-position", "pixel", "--fresh-noise",
                                 "--gamma", "1"),
                          direct(steps=4, cfg=2.0, cfg_position="pixel", shared_noise=False, gamma=1.0))


@pytest.mark.slow
def test_trained_mnist_sphere_encoder_draws_the_requested_digits():
    """End to end on the checkpoint `make demo-sphere` trains (configs/sphere/mnist_tiny.toml): the classifier
    trained on real MNIST recognises the requested class in most unguided 4-step samples (the issue's >= 80%),
    and in most 1-step samples."""
    from spheregen.eval.classifier import class_accuracy, get_classifier
    from spheregen.generation import load_generator

    run, data = ROOT / "runs/demo/sphere_encoder", ROOT / "data/mnist32"
    if not any(run.glob("checkpoints/step_*")) or not (data / "images.npy").is_file():
        pytest.skip("run `make demo-sphere` first (trains configs/sphere/mnist_tiny.toml into runs/demo)")
    model = load_generator(str(run))
    classifier, _, _ = get_classifier(data)
    labels = torch.arange(10).repeat_interleave(30)
    acc = {}
    for steps in (1, 4):
        images = torch.cat([model.generate(labels[i:i + 100], steps=steps, seeds=range(i, i + 100))
                            for i in range(0, len(labels), 100)])
        assert images.shape[1:] == (1, 32, 32)
        acc[steps] = class_accuracy(images, labels, classifier)
    assert acc[4] >= 0.8 and acc[1] >= 0.6, acc


# -- issue 22: the authors' architecture switches, soft labels, Fig. 6 noise interpolation, BN recalibration -------
def test_default_switches_keep_native_keys_and_authors_switches_change_them():
    native = set(SphereEncoder(tiny_config()).state_dict())
    assert not any(k.endswith("attn.proj.bias") for k in native) and "decoder.out.norm.weight" in native
    uncond = set(SphereEncoder(tiny_config(num_classes=0)).state_dict())
    assert "decoder.out.norm.weight" in uncond and "encoder.out.norm.weight" in uncond
    authors = set(SphereEncoder(tiny_config(num_classes=0, attn_proj_bias=True, uncond_head_norm=False)).state_dict())
    assert "encoder.blocks.0.attn.proj.bias" in authors and "decoder.blocks.0.attn.proj.bias" in authors
    assert not any(k.endswith("out.norm.weight") for k in authors)
    cond = set(SphereEncoder(tiny_config(uncond_head_norm=False)).state_dict())  # AdaLN heads keep their norm
    assert "decoder.out.norm.weight" in cond


def test_authors_pixel_heads_and_position_table():
    from spheregen.models.sphere_encoder_nets import pos_table

    x, y = batch(2)
    v = torch.randn(2, 16, 8)
    for residual in (True, False):
        model = tiny_model(head_residual=residual)
        with torch.no_grad():
            model.decoder.refine.weight.zero_()
            model.decoder.refine.bias.zero_()
            out = model.decode(v, y)
        assert (out.abs().max() == 0) != residual  # the authors' head is the conv output itself
    conv = SphereEncoder(tiny_config(head="conv", conv_head_authors=True)).decoder
    assert conv.conv.padding_mode == "reflect" and conv.up.weight.std() < 0.01
    assert SphereEncoder(tiny_config(head="conv")).decoder.conv.padding_mode == "zeros"
    cfg = tiny_config(pos_order="col_row")
    a, b = pos_table(tiny_config()), pos_table(cfg)
    assert torch.equal(b, torch.cat([a[:, 16:], a[:, :16]], dim=1))
    assert torch.equal(SphereEncoder(cfg).encoder.pos, b)
    with pytest.raises(ValueError, match="pos_order"):
        tiny_config(pos_order="x").validate()


def test_soft_labels_equal_class_ids_and_mix_embeddings():
    model = tiny_model()
    x, y = batch(4)
    soft = torch.nn.functional.one_hot(y, 4).float()
    with torch.no_grad():
        assert torch.equal(model.encode(x, soft), model.encode(x, y))
        a = model.generate(y, steps=2, cfg=2.0, seeds=[0, 1, 2, 3])
        b = model.generate(soft, steps=2, cfg=2.0, seeds=[0, 1, 2, 3])
    assert torch.allclose(a, b, atol=1e-6)
    mix = model.soft_labels(torch.tensor([[0.25, 0.75]]), torch.tensor([[0, 2]]))
    table = model.decoder.labels.table.weight
    assert torch.allclose(model.decoder.labels(mix), 0.25 * table[0] + 0.75 * table[2], atol=1e-6)
    with pytest.raises(UserError, match="soft labels"):
        model.check_labels(torch.zeros(2, 3))


def test_noise_interpolation_hits_its_ends_and_corners():
    from spheregen.models.sphere_encoder_edit import interp_noise, interp_weights, noise_interpolate

    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    ends, e_ref = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 16, 8, generator=g)
    for mode in ("lerp", "slerp"):
        frames = noise_interpolate(model, ends, torch.tensor([[0, 2]]), interp_weights(mode, 3), e_ref, mode,
                                   steps=2, cfg=1.5)[-1]
        for f, k, cls in ((0, 0, 0), (-1, 1, 2)):
            draws = iter([ends[:, k], e_ref])
            direct = model.generate(torch.tensor([cls]), steps=2, cfg=1.5, n=1, noise=draws.__next__)
            assert torch.allclose(frames[f], direct, atol=1e-5), (mode, f)
    w = interp_weights("bilinear", 3)
    assert w.shape == (9, 4) and torch.allclose(w.sum(1), torch.ones(9))
    assert torch.equal(w[[0, 2, 6, 8]], torch.eye(4))
    mid = interp_noise(torch.stack([ends[0, 0], ends[0, 0].roll(1, 0)])[None], interp_weights("slerp", 3), "slerp")
    assert torch.allclose(mid.flatten(2).norm(dim=-1), ends[0, 0].norm().expand(3, 1), rtol=1e-5)


@pytest.mark.parametrize("mode, frac", [("left-right", 0.5), ("top-bottom", 0.5), ("center", 0.75),
                                        ("quadrants", 0.5), ("diagonal", 0.5)])
def test_stitch_modes(mode, frac):
    from spheregen.models.sphere_encoder_edit import stitch_mask

    mask = stitch_mask(16, 16, mode)
    assert abs(mask.float().mean().item() - frac) < 0.07
    x = torch.zeros(1, 1, 16, 16)
    assert torch.equal(stitch(x + 1, x - 1, mode)[0, 0] > 0, mask)


def test_bn_recalibration_uses_the_calibration_statistics():
    from spheregen.models.sphere_encoder import recalibrate_bn

    model = tiny_model(latent_bn=True)
    x, y = batch(16)
    seen = []
    hook = model.encoder.bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    assert recalibrate_bn(model, x, y, batch_size=8) == 2
    hook.remove()
    z = torch.cat(seen)
    bn = model.encoder.bn
    assert torch.allclose(bn.running_mean, z.mean(0), atol=1e-5) and not bn.training and bn.momentum == 0.1
    assert recalibrate_bn(model, n=4, batch_size=2, steps=2) == 2  # one encoder pass per generated batch
    assert torch.isfinite(bn.running_var).all()
    with pytest.raises(UserError, match="no latent BatchNorm"):
        recalibrate_bn(tiny_model(), x)


def test_noise_interpolation_recalibration_and_stitch_cli(trained, images, tmp_path):
    root, _ = trained
    ckpt = str(root / "run" / "checkpoints" / "step_00000003")
    base = ["edit", "interpolate", "--ckpt", ckpt, "--steps", "2"]
    assert cli_main(base + ["--noise", "bilinear", "--n", "3", "--out", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "b.png").size == (3 * 18 + 2, 3 * 18 + 2)
    assert cli_main(base + ["--noise", "slerp", "--n", "4", "--rows", "2", "--class", "0", "1",
                            "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size == (4 * 18 + 2, 2 * 18 + 2)
    assert cli_main(base + ["--noise", "lerp", "--class", "0", "--out", str(tmp_path / "x.png")]) == 2
    a = str(images / "a.png")
    assert cli_main(["edit", "crossover", "--ckpt", ckpt, "--images", a, a, "--stitch", "center", "--steps", "1",
                     "--out", str(tmp_path / "c.png")]) == 0
    out = tmp_path / "recal"
    assert cli_main(["sphere-encoder", "recalibrate-bn", "--ckpt", ckpt, "--out", str(out), "--n", "4",
                     "--batch-size", "2", "--steps", "2"]) == 0
    again = load_model(out)
    assert again.encoder.bn.num_batches_tracked == 2
    assert cli_main(["sphere-encoder", "recalibrate-bn", "--ckpt", ckpt, "--out", str(out)]) == 2
