"""S-VAE tokenizer: shapes, the radius-R invariant, posterior/KL arms, losses and discriminator protocol,
save/load, latent caches, the encode command, and a short training smoke run through `spheregen train`."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spheregen.cli import main as cli_main
from spheregen.cli.train import run_training
from spheregen.config import load_toml
from spheregen.data.builders import write_dataset
from spheregen.data.datasets import ImageDataset
from spheregen.data.latents import LatentCache, OnTheFlyLatents, write_latent_cache
from spheregen.errors import UserError
from spheregen.generation import load_tokenizer
from spheregen.models.tokenizer import POSTERIORS, Tokenizer, TokenizerConfig, kl_term, sample_posterior
from spheregen.sphere import PowerSpherical


def tiny_config(**kw) -> TokenizerConfig:
    base = dict(image_size=16, in_channels=3, channels=(8, 16, 32), dim=32, enc_depth=1, dec_depth=1, n_heads=2,
                mlp_hidden=64, n_registers=2, latent_dim=8, perceptual="none", disc_weight=0.0)
    base.update(kw)
    return TokenizerConfig(**base)


def _images(n, size, channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """A 24-image, 3-class, 16 px RGB dataset directory."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("data") / "toy16"
    write_dataset(out, rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8), np.arange(24) % 3,
                  ["a", "b", "c"], source="test")
    return out


# -- architecture -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,channels,in_ch,grid", [
    (28, (8, 16, 32), 1, 7), (32, (8, 16, 32), 3, 8), (64, (8, 16, 16, 32), 3, 8), (256, (4, 8, 8, 16, 16), 3, 16),
])
def test_encode_decode_shapes(size, channels, in_ch, grid):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(image_size=size, channels=channels, in_channels=in_ch)).eval()
    assert model.grid == (grid, grid) and model.radius == math.sqrt(8)
    x = _images(2, size, in_ch)
    with torch.no_grad():
        params = model.encode(x)
        assert params["mu"].shape == (2, grid * grid, 8) and params["kappa"].shape == (2, grid * grid)
        assert (params["kappa"] >= 1).all()
        z = model.sample_latent(params)
        assert z.shape == (2, grid * grid, 8)
        out = model.decode(z)
        assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
        assert model.reconstruct(x).shape == x.shape


def test_wrong_input_is_a_user_error():
    model = Tokenizer(tiny_config())
    with pytest.raises(UserError, match="divisible"):
        model.encode(torch.zeros(1, 3, 18, 18))
    with pytest.raises(UserError, match="dimension"):
        model.decode(torch.zeros(1, 16, 5))
    with pytest.raises(UserError, match="posterior"):
        Tokenizer(tiny_config(posterior="vmf"))
    with pytest.raises(UserError, match="divisible"):
        Tokenizer(tiny_config(image_size=30))
    with pytest.raises(UserError, match="too deep"):
        Tokenizer(tiny_config(disc_weight=0.5, disc_layers=3))


def test_paper_config_parameter_count():
    cfg = TokenizerConfig(**load_toml("configs/tokenizer/paper_256.toml")["model"])
    with torch.device("meta"):
        model = Tokenizer(cfg)
    n_vae = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("gan.discriminator."))
    n_disc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("gan.discriminator."))
    assert 72e6 <= n_vae <= 78e6, n_vae  # the reference counts 75.4M
    assert n_disc == 2_765_633
    assert model.grid == (16, 16) and model.radius == 4.0
    assert len(model.encoder.blocks) == 6 and len(model.decoder.blocks) == 12


@pytest.mark.parametrize("posterior", ["spherical", "gaussian_norm"])
def test_every_decoder_latent_has_norm_r(posterior):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(posterior=posterior))
    seen = []
    model.post_quant_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    x = _images(3, 16, 3)
    model.training_loss((x, None), 0)
    with torch.no_grad():
        model.reconstruct(x)
        model.reconstruct(x, sample=True)
        model.decode(torch.randn(3, 16, 8) * 7)  # arbitrary latents are projected too
    assert len(seen) == 4
    for z in seen:
        assert torch.allclose(z.norm(dim=-1), torch.full(z.shape[:-1], model.radius), atol=1e-5)


# -- posteriors and KL -------------------------------------------------------------------------------------
def test_spherical_posterior_and_kl():
    torch.manual_seed(0)
    mu = torch.nn.functional.normalize(torch.randn(4, 5, 8), dim=-1)
    kappa = torch.rand(4, 5) * 50 + 1
    params = {"mu": mu, "kappa": kappa}
    assert torch.allclose(kl_term("spherical", params), PowerSpherical(mu, kappa).kl_to_uniform().mean())
    # KL grows with kappa; the mean reduction is over batch and tokens
    low = kl_term("spherical", {"mu": mu, "kappa": torch.ones(4, 5)})
    high = kl_term("spherical", {"mu": mu, "kappa": torch.full((4, 5), 100.0)})
    assert 0 < low < high
    z = torch.stack([sample_posterior("spherical", params, 2.0) for _ in range(2000)])
    assert torch.allclose(z.norm(dim=-1), torch.full(z.shape[:-1], 2.0), atol=1e-5)
    assert torch.allclose(z.mean(0) / 2.0, PowerSpherical(mu, kappa).mean, atol=0.06)


def test_gaussian_posterior_and_kl():
    torch.manual_seed(0)
    mean, std = torch.randn(3, 4, 6), torch.rand(3, 4, 6) + 0.2
    params = {"mean": mean, "std": std}
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(0, 1))
    assert torch.allclose(kl_term("gaussian", params), ref.mean(), atol=1e-6)  # mean over all elements
    assert kl_term("gaussian", {"mean": torch.zeros(2, 3), "std": torch.ones(2, 3)}).abs() < 1e-7
    z = torch.stack([sample_posterior("gaussian", params, 1.0) for _ in range(4000)])
    assert torch.allclose(z.mean(0), mean, atol=0.1) and torch.allclose(z.std(0), std, rtol=0.1)
    zn = sample_posterior("gaussian_norm", params, math.sqrt(6))
    assert torch.allclose(zn.norm(dim=-1), torch.full((3, 4), math.sqrt(6)), atol=1e-5)
    assert torch.allclose(kl_term("gaussian_norm", params), kl_term("gaussian", params))


def test_sigma_posterior_fixed_scale_per_image():
    torch.manual_seed(0)
    mean = torch.randn(2000, 3, 4)
    z = sample_posterior("sigma", {"mean": mean}, 2.0, c_sigma=0.5)
    noise = z - mean
    # one sigma per image: the noise of an image is sigma * eps, sigma = 0.5 |n| -> E[noise^2] = 0.25
    assert abs(noise.pow(2).mean().item() - 0.25) < 0.02
    per_image = noise.pow(2).mean(dim=(1, 2))
    assert per_image.std() > 0.1  # sigma varies across images (a fixed value would give ~0.05)
    assert torch.allclose(kl_term("sigma", {"mean": mean}), 0.5 * mean.pow(2).mean())


@pytest.mark.parametrize("posterior", POSTERIORS)
def test_training_loss_backpropagates_for_every_arm(posterior):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(posterior=posterior, kl_weight=0.01))
    loss, terms, _ = model.training_loss((_images(2, 16, 3), None), 0)
    loss.backward()
    assert torch.isfinite(loss) and {"rec", "kl"} <= set(terms)
    assert loss.item() == pytest.approx(terms["rec"].item() + 0.01 * terms["kl"].item(), rel=1e-5)
    for name in ("conv_in.weight", "quant_proj.weight", "post_quant_proj.weight", "conv_out.2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    if posterior == "spherical":  # gradients reach kappa's output channel through the reparameterised draw
        assert model.quant_proj.bias.grad[-1].abs() > 0


def test_kappa_init_and_perceptual_terms(monkeypatch):
    from spheregen import losses

    monkeypatch.setattr(losses, "_said", set())
    model = Tokenizer(tiny_config(kappa_init=300.0, perceptual="ssim", perceptual_weight=0.5))
    with torch.no_grad():
        kappa = model.encode(_images(2, 16, 3))["kappa"]
    assert (kappa - 300).abs().max() < 30  # the bias sets kappa; the weights only perturb it
    loss, terms, _ = model.training_loss((_images(2, 16, 3), None), 0)
    expected = terms["rec"] + model.config.kl_weight * terms["kl"] + 0.5 * terms["perceptual"]
    assert terms["perceptual"] > 0 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    lp = Tokenizer(tiny_config(perceptual="lpips", vgg_weights="random"))
    assert "perceptual" in lp.training_loss((_images(2, 16, 3), None), 0)[1]
    assert not any(n.startswith("_perceptual") or "lpips" in n for n in lp.state_dict())  # VGG stays out
    assert "perceptual" not in Tokenizer(tiny_config(perceptual="lpips")).training_loss((_images(2, 16, 3), None), 0)[1]


def test_discriminator_protocol():
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(disc_weight=0.5, disc_start=10, disc_ndf=8, disc_layers=2))
    gan = model.second_objective
    disc = gan.discriminator
    x = _images(2, 16, 3)
    # before disc_start: no generator GAN term, a zero D loss that leaves D's gradients empty
    _, terms, context = model.training_loss((x, None), 5)
    assert "gen" not in terms
    d_loss, _ = gan.loss(context, 5)
    d_loss.backward()
    assert d_loss.item() == 0 and all(p.grad is None for p in disc.parameters())
    # after: the G loss carries the GAN term without touching D; the D loss trains D only
    loss, terms, context = model.training_loss((x, None), 10)
    assert "gen" in terms
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    model.zero_grad(set_to_none=True)
    d_loss, _ = gan.loss(context, 10)
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("gan.discriminator."))


# -- persistence -------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(posterior="gaussian", disc_weight=0.5, disc_ndf=8, disc_layers=2)).eval()
    model.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.config == model.config and not loaded.training
    x = _images(2, 16, 3)
    with torch.no_grad():
        assert torch.equal(model.reconstruct(x), loaded.reconstruct(x))
    with pytest.raises(UserError, match="neither"):
        load_tokenizer(tmp_path)


# -- latent caches -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("posterior", POSTERIORS)
def test_latent_cache_round_trip(tmp_path, dataset_dir, posterior):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(posterior=posterior, c_sigma=0.3)).eval()
    data = ImageDataset(dataset_dir)
    out = write_latent_cache(model, data, tmp_path / "cache", tokenizer_path=tmp_path / "tok", batch_size=10)
    tensors = load_file(str(out / "latents.safetensors"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["posterior"] == posterior and meta["grid"] == [4, 4] and meta["latent_dim"] == 8
    assert meta["num_classes"] == 3 and meta["classes"] == ["a", "b", "c"] and meta["c_sigma"] == 0.3
    assert meta["radius"] == pytest.approx(math.sqrt(8)) and meta["image_size"] == 16 and meta["channels"] == 3
    assert tensors["labels"].dtype == torch.int64 and torch.equal(tensors["labels"], torch.arange(24) % 3)
    key = "mu" if posterior == "spherical" else "mean"
    assert tensors[key].shape == (24, 2, 16, 8) and tensors[key].dtype == torch.float32
    if posterior == "spherical":
        assert tensors["kappa"].shape == (24, 2, 16)
    # index 1 is the posterior of the mirrored image
    x, _ = data.get_batch(torch.tensor([5]))
    with torch.no_grad():
        flipped = model.encode(x.flip(-1))
    assert torch.allclose(tensors[key][5, 1], flipped[key][0], atol=1e-5)

    cache = LatentCache(out)
    assert len(cache) == 24 and cache.grid == (4, 4) and cache.posterior == posterior
    assert cache.latent_dim == 8 and cache.num_classes == 3 and cache.tokenizer_path.endswith("tok")
    idx, flips = torch.tensor([0, 7, 3]), torch.tensor([False, True, False])
    torch.manual_seed(1)
    z1, y = cache.get_batch(idx, flips)
    z2, _ = cache.get_batch(idx, flips)
    torch.manual_seed(1)
    z1_again, _ = cache.get_batch(idx, flips)
    assert z1.shape == (3, 16, 8) and z1.dtype == torch.float32 and torch.equal(y, torch.tensor([0, 1, 0]))
    assert not torch.equal(z1, z2) and torch.equal(z1, z1_again)  # fresh draw per call, global RNG
    if posterior in ("spherical", "gaussian_norm"):
        assert torch.allclose(z1.norm(dim=-1), torch.full((3, 16), cache.radius), atol=1e-5)

    live = OnTheFlyLatents(model, data)
    assert (len(live), live.grid, live.latent_dim, live.num_classes) == (24, (4, 4), 8, 3)
    zl, yl = live.get_batch(idx, flips)
    assert zl.shape == (3, 16, 8) and torch.equal(yl, y)


def test_latent_cache_errors(tmp_path, dataset_dir):
    with pytest.raises(UserError, match="not a latent cache"):
        LatentCache(tmp_path)
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a latent cache"):
        write_latent_cache(Tokenizer(tiny_config()), ImageDataset(dataset_dir), tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# -- commands ----------------------------------------------------------------------------------------------
def test_train_smoke_then_encode_command(tmp_path, capsys):
    """A few steps of the real tiny MNIST config through `spheregen train`'s run_training, then `spheregen encode`."""
    from spheregen.data.builders import build_mnist

    build_mnist(tmp_path / "mnist28", size=28)
    config = load_toml("configs/tokenizer/mnist_tiny.toml",
                       [f"data.path=\"{tmp_path / 'mnist28'}\"", "train.batch_size=8", "data.eval_images=16",
                        "train.log_every=1"])
    args = argparse.Namespace(out=str(tmp_path / "run"), resume=False, steps=3, device="cpu")
    result = run_training("tokenizer", config, args)
    assert {"loss", "rec", "kl", "kappa", "psnr", "ssim"} <= set(result)
    assert math.isfinite(result["psnr"]) and result["psnr"] > 0
    assert (tmp_path / "run" / "eval" / "recon_step_00000003.png").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()

    rc = cli_main(["encode", "--tokenizer", str(tmp_path / "run"), "--data", str(tmp_path / "mnist28"),
                   "--out", str(tmp_path / "cache"), "--split", "test", "--device", "cpu"])
    assert rc == 0
    cache = LatentCache(tmp_path / "cache")
    assert len(cache) == 500 and cache.grid == (7, 7) and cache.num_classes == 10
    z, y = cache.get_batch(torch.arange(4), torch.tensor([True, False, True, False]))
    assert z.shape == (4, 49, 16)
    assert torch.allclose(z.norm(dim=-1), torch.full((4, 49), 4.0), atol=1e-5)

    rc = cli_main(["encode", "--tokenizer", str(tmp_path / "nothing"), "--data", str(tmp_path / "mnist28"),
                   "--out", str(tmp_path / "cache2")])
    assert rc == 2 and "tokenizer checkpoint" in capsys.readouterr().err
