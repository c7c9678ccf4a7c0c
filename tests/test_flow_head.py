"""Flow head: zero-init, the rectified-flow loss, and the three samplers against exact Gaussian flows."""

import math

import pytest
import torch

from spheregen.models.flow_head import FlowHead, guided_velocity, noise_draws, solve, timestep_embedding


def gaussian_velocity(mu: torch.Tensor, sigma: float):
    """Exact rectified-flow velocity from N(0, I) to N(mu, sigma^2 I):
    x_t ~ N(t mu, s_t^2), s_t^2 = (1-t)^2 + t^2 sigma^2, E[v | x] = mu + (t sigma^2 - (1-t)) (x - t mu) / s_t^2.
    Its ODE maps x0 to x(t) = t mu + s_t x0."""

    def v(x, t):
        s2 = (1 - t) ** 2 + t ** 2 * sigma ** 2
        return mu + (t * sigma ** 2 - (1 - t)) * (x - t * mu) / s2

    return v


def test_timestep_embedding_and_zero_init():
    t = torch.tensor([0.0, 0.25, 1.0])
    e = timestep_embedding(t)
    assert e.shape == (3, 256)
    assert torch.allclose(e[0, :128], torch.ones(128)) and torch.allclose(e[0, 128:], torch.zeros(128))
    assert (e[1] - e[2]).abs().max() > 0.1
    head = FlowHead(token_dim=4, cond_dim=8, width=16, depth=4, n_adaln=2)
    out = head(torch.randn(5, 4), torch.rand(5), torch.randn(5, 8))
    assert out.shape == (5, 4) and torch.equal(out, torch.zeros(5, 4))  # final layer zero-initialised
    with pytest.raises(ValueError):
        FlowHead(4, 8, 16, depth=3, n_adaln=2)


def test_loss_at_init_is_the_velocity_variance_and_gradients_flow():
    torch.manual_seed(0)
    head = FlowHead(token_dim=4, cond_dim=8, width=16, depth=2, n_adaln=1)
    x1 = torch.randn(2000, 4) * 0.5 + 1.0
    loss = head.loss(x1, torch.randn(2000, 8), batch_mul=2)
    # the head outputs 0, so loss = E||x1 - eps||^2 / d = var(x1) + mean(x1)^2 + 1 = 0.25 + 1 + 1
    assert abs(loss.item() - 2.25) < 0.1
    loss.backward()
    grads = {n: p.grad for n, p in head.named_parameters()}
    assert grads["final_proj.bias"].abs().sum() > 0  # zero-init layers still receive gradients


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_ode_solvers_converge_to_the_exact_flow(sampler):
    torch.manual_seed(0)
    mu, sigma = torch.tensor([2.0, -1.0, 0.5]), 0.3
    noise = torch.randn(64, 1, 3)
    exact = mu + sigma * noise[:, 0]  # x(1) = mu + sigma x0
    coarse, fine = [(solve(gaussian_velocity(mu, sigma), noise, sampler, n) - exact).abs().max().item()
                    for n in (8, 32)]
    if sampler == "euler":  # first order: 4x the steps, ~4x smaller error
        assert fine < 0.07 and 3 < coarse / fine < 5
    else:  # second order: ~16x smaller (the last step is plain Euler, EDM style, so the constant is larger)
        assert fine < 5e-3 and coarse / fine > 8


def test_euler_maruyama_samples_the_target_distribution():
    torch.manual_seed(0)
    mu, sigma = torch.tensor([1.5, -0.5]), 0.4
    noise = torch.randn(20000, noise_draws("euler_maruyama", 100), 2)
    x = solve(gaussian_velocity(mu, sigma), noise, "euler_maruyama", 100)
    assert torch.allclose(x.mean(0), mu, atol=0.02)
    assert torch.allclose(x.std(0), torch.full((2,), sigma), atol=0.02)
    # a wrong score sign would collapse or inflate the spread; temperature 0 makes it deterministic
    x0 = solve(gaussian_velocity(mu, sigma), noise[:10], "euler_maruyama", 100, temperature=0.0)
    assert torch.allclose(x0, mu.expand(10, 2), atol=0.05)


def test_temperature_scales_the_initial_noise():
    mu, sigma = torch.zeros(2), 1.0  # N(0, I) to itself: x(1) = x0
    noise = torch.randn(8, 1, 2)
    x = solve(gaussian_velocity(mu, sigma), noise, "heun", 64, temperature=0.5)
    assert torch.allclose(x, 0.5 * noise[:, 0], atol=1e-3)


def test_guided_velocity_combines_cond_and_null_rows():
    torch.manual_seed(0)
    head = FlowHead(token_dim=3, cond_dim=5, width=16, depth=2, n_adaln=1)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, h_c, h_u = torch.randn(4, 3), torch.randn(4, 5), torch.randn(4, 5)
    v_c = guided_velocity(head, h_c)(x, 0.3)
    v_u = guided_velocity(head, h_u)(x, 0.3)
    both = torch.cat([h_c, h_u])
    assert torch.allclose(guided_velocity(head, both, 1.0)(x, 0.3), v_c, atol=1e-5)
    assert torch.allclose(guided_velocity(head, both, 0.0)(x, 0.3), v_u, atol=1e-5)
    assert torch.allclose(guided_velocity(head, both, 3.0)(x, 0.3), v_u + 3 * (v_c - v_u), atol=1e-5)
    assert (v_c - v_u).abs().max() > 1e-2


def test_trained_head_samples_its_conditional_targets():
    """Fit the head to 3 condition-dependent point clouds, then every sampler lands near the right one."""
    torch.manual_seed(0)
    head = FlowHead(token_dim=2, cond_dim=3, width=64, depth=2, n_adaln=1)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(300):
        c = torch.randint(0, 3, (256,))
        x1 = centers[c] + 0.05 * torch.randn(256, 2)
        loss = head.loss(x1, torch.eye(3)[c], batch_mul=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    c = torch.arange(3).repeat(20)
    with torch.no_grad():
        for sampler in ("euler", "heun", "euler_maruyama"):
            noise = torch.randn(len(c), noise_draws(sampler, 20), 2)
            x = solve(lambda x, t: head(x, torch.full((len(x),), t), torch.eye(3)[c]), noise, sampler, 20)
            nearest = torch.cdist(x, centers).argmin(1)
            assert (nearest == c).float().mean() > 0.95, sampler
            assert math.isfinite(x.abs().max().item())
