"""Perceptual (LPIPS-VGG16 on random VGG weights + the lpips wheel's real heads, SSIM), PatchGAN and hinge losses."""

import pytest
import torch

from spheregen import losses
from spheregen.errors import UserError
from spheregen.losses import (
    LPIPS,
    VGG16_CONVS,
    PatchDiscriminator,
    SSIMLoss,
    build_perceptual,
    hinge_d_loss,
    hinge_g_loss,
    lpips_heads_path,
)


def _fake_vgg_state(seed: int = 0) -> dict:
    """A torchvision-format vgg16 state dict (features.N.* plus a classifier) with random weights."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (cin, cout) in VGG16_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        state[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    state["classifier.0.weight"] = torch.zeros(4, 4)
    return state


@pytest.fixture(scope="module")
def lpips_net():
    heads = torch.load(lpips_heads_path(), map_location="cpu", weights_only=True)
    return LPIPS(_fake_vgg_state(), heads)


def test_lpips_real_heads_load_and_are_nonnegative(lpips_net):
    heads = torch.load(lpips_heads_path(), map_location="cpu", weights_only=True)
    for i, head in enumerate(lpips_net.heads):
        assert torch.equal(head.weight, heads[f"lin{i}.model.1.weight"])
        assert (head.weight >= 0).all()
    assert not any(p.requires_grad for p in lpips_net.parameters())


def test_lpips_vgg_keys_map_by_index(tmp_path):
    state = _fake_vgg_state(3)
    path = tmp_path / "vgg16-test.pth"
    torch.save(state, path)
    module = build_perceptual("lpips", path)
    for i in VGG16_CONVS:
        assert torch.equal(module.lpips.features[i].weight, state[f"features.{i}.weight"])
        assert torch.equal(module.lpips.features[i].bias, state[f"features.{i}.bias"])
    del state["features.28.bias"]
    torch.save(state, path)
    with pytest.raises(UserError, match="features.28.bias"):
        build_perceptual("lpips", path)
    with pytest.raises(UserError, match="do not exist"):
        build_perceptual("lpips", tmp_path / "missing.pth")


def test_lpips_shapes_identity_symmetry_gradients(lpips_net):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d = lpips_net(x, y)
    assert d.shape == (3,)
    assert (d > 0).all()
    assert torch.allclose(lpips_net(x, x), torch.zeros(3), atol=1e-6)
    assert torch.allclose(d, lpips_net(y, x), rtol=1e-5, atol=1e-7)
    # more noise -> larger distance (monotone on the same image)
    far = (x + 1.0 * torch.randn_like(x)).clamp(-1, 1)
    assert (lpips_net(x, far) > d).all()
    xg = x.clone().requires_grad_(True)
    lpips_net(xg, y).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_lpips_grayscale_and_small_images(lpips_net):
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    assert torch.allclose(lpips_net(x, x), torch.zeros(2), atol=1e-6)
    assert (lpips_net(x, -x) > 0).all()


def test_build_perceptual_without_weights_says_so_once(capsys, monkeypatch):
    monkeypatch.setattr(losses, "_said", set())
    assert build_perceptual("lpips", None) is None
    assert build_perceptual("lpips", "") is None
    err = capsys.readouterr().err
    assert err.count("WITHOUT the perceptual term") == 1
    module = build_perceptual("lpips", "random")
    assert "NOT a perceptual metric" in capsys.readouterr().err
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert module(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert build_perceptual("none") is None
    with pytest.raises(UserError, match="unknown perceptual"):
        build_perceptual("vgg")


def test_ssim_loss():
    torch.manual_seed(0)
    loss = build_perceptual("ssim")
    assert isinstance(loss, SSIMLoss)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    near, far = (x + 0.05 * torch.randn_like(x)).clamp(-1, 1), torch.rand_like(x) * 2 - 1
    assert 0 < loss(x, near).item() < loss(x, far).item()
    xg = x.clone().requires_grad_(True)
    loss(xg, near).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 3)])
def test_patch_discriminator_shapes(size, channels):
    disc = PatchDiscriminator(channels, ndf=16, n_layers=3)
    out = disc(torch.randn(2, channels, size, size))
    assert out.shape[:2] == (2, 1) and out.shape[2] >= 1 and out.shape[2] == out.shape[3]


def test_patch_discriminator_reference_size():
    """ndf 64, 3 layers, RGB: the taming/pix2pix PatchGAN has 2,765,633 parameters."""
    disc = PatchDiscriminator(3, 64, 3)
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules()) == 3


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # 0.5 [mean(relu(1 - real)) + mean(relu(1 + fake))] = 0.5 [(0 + 0.5)/2 + (0 + 1)/2]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_d_loss(torch.ones(3) * 5, -torch.ones(3) * 5).item() == 0.0
    assert hinge_g_loss(fake).item() == pytest.approx(1.5)
