"""Geometry core: projection, spherify, and PowerSpherical against the independent `power-spherical` package."""

import math

import pytest
import torch

from spheregen.sphere import HypersphericalUniform, PowerSpherical, project, spherify

ps_oracle = pytest.importorskip("power_spherical")


def _unit(shape, gen=None, dtype=torch.float32):
    return project(torch.randn(shape, generator=gen, dtype=dtype), 1.0)


def _loc(kind: str, n: int, d: int) -> torch.Tensor:
    if kind == "random":
        return _unit((n, d))
    loc = torch.zeros(n, d)
    loc[:, 0] = 1.0 if kind == "+e1" else -1.0
    return loc


def test_project_norm_and_zero_vector():
    z = torch.randn(8, 5, 16) * 10
    out = project(z, 4.0)
    assert torch.allclose(out.norm(dim=-1), torch.full((8, 5), 4.0), atol=1e-5)
    assert torch.allclose(project(out, 4.0), out, atol=1e-6)  # idempotent
    zero = project(torch.zeros(2, 16), 4.0)
    assert torch.isfinite(zero).all() and (zero == 0).all()
    assert project(z.bfloat16(), 4.0).dtype == torch.bfloat16


def test_spherify_norm_is_sqrt_L():
    z = torch.randn(4, 256, 8) * torch.tensor([0.5, 1.0, 10.0, 1000.0]).view(4, 1, 1)
    out = spherify(z)
    L = 256 * 8
    rel = (out.flatten(1).norm(dim=1) / math.sqrt(L) - 1).abs()
    assert rel.max() < 1e-4
    # only a per-sample rescale: directions are kept
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), z.flatten(1), dim=1)
    assert (cos > 1 - 1e-5).all()


@pytest.mark.parametrize("d", [2, 3, 16, 256, 4096])
@pytest.mark.parametrize("kappa", [1e-4, 1.0, 50.0, 1e6])
@pytest.mark.parametrize("kind", ["+e1", "-e1", "random"])
def test_rsample_unit_norm_finite_grads(d, kappa, kind):
    loc = _loc(kind, 32, d).requires_grad_()
    scale = torch.full((32,), kappa, requires_grad=True)
    u = PowerSpherical(loc, scale).rsample()
    assert u.shape == (32, d) and torch.isfinite(u).all()
    assert (u.norm(dim=-1) - 1).abs().max() < 1e-5
    (u * torch.randn_like(u)).sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def test_shapes_and_scale_validation():
    loc = _unit((3, 5, 16))
    dist = PowerSpherical(loc, torch.ones(3, 5))
    assert dist.batch_shape == (3, 5) and dist.event_shape == (16,)
    assert dist.rsample((7,)).shape == (7, 3, 5, 16)
    assert dist.mean.shape == (3, 5, 16)
    with pytest.raises(ValueError, match="scale must have shape"):
        PowerSpherical(loc, torch.ones(3, 5, 1))
    with pytest.raises(ValueError):
        PowerSpherical(loc, torch.ones(5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    loc = _unit((64, 16)).to(dtype)
    scale = (torch.rand(64) * 100 + 1).to(dtype)
    dist = PowerSpherical(loc, scale)
    u = dist.rsample()
    assert u.dtype == dtype and torch.isfinite(u.float()).all()
    assert (u.float().norm(dim=-1) - 1).abs().max() < 2e-2
    kl = dist.kl_to_uniform()
    assert kl.dtype == dtype
    ref = PowerSpherical(loc.float(), scale.float()).kl_to_uniform()
    assert torch.allclose(kl.float(), ref, rtol=1e-2)


def test_generator_reproducible():
    loc, scale = _unit((10, 16)), torch.rand(10) * 10
    a = PowerSpherical(loc, scale).rsample(generator=torch.Generator().manual_seed(3))
    b = PowerSpherical(loc, scale).rsample(generator=torch.Generator().manual_seed(3))
    c = PowerSpherical(loc, scale).rsample(generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("d", [16, 256])
def test_against_power_spherical_oracle(d):
    gen = torch.Generator().manual_seed(d)
    loc = _unit((50, d), gen, torch.float64)
    scale = torch.rand(50, generator=gen, dtype=torch.float64) * 200 + 0.01
    ours = PowerSpherical(loc, scale)
    ref = ps_oracle.PowerSpherical(loc, scale)
    x = ref.rsample()
    assert torch.allclose(ours.log_prob(x), ref.log_prob(x), rtol=1e-5)
    assert torch.allclose(ours.entropy(), ref.entropy(), rtol=1e-5)
    ref_kl = torch.distributions.kl_divergence(ref, ps_oracle.HypersphericalUniform(d, dtype=torch.float64))
    # The oracle's KL carries an absolute error of ~6e-6 at d=256 (its log-area term); ours matches mpmath
    # to 1e-12 (test_kl_against_mpmath). So: 1e-5 relative where KL > 1, 1e-5 absolute below.
    ours_kl = torch.distributions.kl_divergence(ours, HypersphericalUniform(d, dtype=torch.float64))
    assert torch.equal(ours_kl, ours.kl_to_uniform())
    big = ref_kl > 1
    assert big.sum() > 10
    assert torch.allclose(ours_kl[big], ref_kl[big], rtol=1e-5, atol=0)
    assert torch.allclose(ours_kl, ref_kl, rtol=0, atol=1e-5)


@pytest.mark.parametrize("d,kappa", [(16, 5.0), (16, 100.0), (256, 30.0)])
def test_mean_cosine_matches_beta_mean(d, kappa):
    torch.manual_seed(0)
    loc = _unit((1, d)).expand(100_000, d).contiguous()
    u = PowerSpherical(loc, torch.full((100_000,), kappa)).rsample()
    alpha, beta = (d - 1) / 2 + kappa, (d - 1) / 2
    analytic = (alpha - beta) / (alpha + beta)
    empirical = (u * loc).sum(-1).mean().item()
    # std of the mean of 100k draws of t is < 1/sqrt(100k) ~ 3e-3; allow 4 sigma of the worst case
    assert abs(empirical - analytic) < 0.006
    assert torch.allclose(PowerSpherical(loc[:1], torch.tensor([kappa])).mean, analytic * loc[:1], atol=1e-6)


@pytest.mark.parametrize("kappa", [1.0, 20.0, 100.0])
def test_kl_matches_monte_carlo(kappa):
    torch.manual_seed(1)
    d, n = 16, 100_000
    loc = _unit((1, d), dtype=torch.float64).expand(n, d).contiguous()
    dist = PowerSpherical(loc, torch.full((n,), kappa, dtype=torch.float64))
    u = dist.rsample()
    mc = (dist.log_prob(u) - HypersphericalUniform(d, dtype=torch.float64).log_prob(u)).mean().item()
    exact = dist.kl_to_uniform()[0].item()
    assert abs(mc - exact) < 0.02 * max(exact, 1.0)


def test_uniform_kl_is_zero_at_kappa_zero_and_uniform_samples():
    loc = _unit((4, 16))
    assert PowerSpherical(loc, torch.zeros(4)).kl_to_uniform().abs().max() < 1e-5
    s = HypersphericalUniform(16).sample((20_000,))
    assert (s.norm(dim=-1) - 1).abs().max() < 1e-5
    assert s.mean(0).abs().max() < 0.03


@pytest.mark.parametrize("d,kappa", [(16, 1e-3), (256, 0.05), (256, 30.0), (4096, 1e4)])
def test_kl_against_mpmath(d, kappa):
    """High-precision oracle for the closed form, including small kappa where KL -> 0."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    a, b, k = mp.mpf(d - 1) / 2 + kappa, mp.mpf(d - 1) / 2, mp.mpf(kappa)
    log_c = -((a + b) * mp.log(2) + b * mp.log(mp.pi) + mp.loggamma(a) - mp.loggamma(a + b))
    h = -(log_c + k * (mp.log(2) + mp.digamma(a) - mp.digamma(a + b)))
    kl = mp.log(2) + mp.mpf(d) / 2 * mp.log(mp.pi) - mp.loggamma(mp.mpf(d) / 2) - h
    ours = PowerSpherical(_unit((1, d), dtype=torch.float64), torch.tensor([kappa], dtype=torch.float64))
    assert abs(ours.kl_to_uniform().item() - float(kl)) <= 1e-6 * abs(float(kl)) + 1e-12
