"""MeanFlow head: the JVP of the identity, r = t as the instantaneous flow, few-step sampling of a fitted toy
problem, and the `model.flow = "meanflow"` switch of SphereAR."""

import pytest
import torch
from torch.autograd import forward_ad

from spheregen.models import meanflow_head
from spheregen.models.ar import ARConfig, SphereAR
from spheregen.models.flow_head import noise_draws
from spheregen.models.heads import FLOW_TYPES
from spheregen.models.meanflow_head import MeanFlowHead


def random_head(seed: int = 0) -> MeanFlowHead:
    torch.manual_seed(seed)
    head = MeanFlowHead(token_dim=2, cond_dim=3, width=16, depth=2, n_adaln=1)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    return head


def test_forward_mode_total_derivative_matches_reverse_mode():
    """d/dt u(x_t, t, r) along (v, 1), as the loss computes it, against autograd's double-backward JVP."""
    head = random_head()
    x, t, h, v = torch.randn(5, 2), torch.rand(5) * 0.5, torch.randn(5, 3), torch.randn(5, 2)
    r = t + 0.3
    with forward_ad.dual_level():
        out = head(forward_ad.make_dual(x, v), forward_ad.make_dual(t, torch.ones_like(t)), h, r=r)
        _, du = forward_ad.unpack_dual(out)
    _, ref = torch.autograd.functional.jvp(lambda x, t: head(x, t, h, r=r), (x, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(du, ref, atol=1e-3, rtol=1e-4)
    assert du.abs().max() > 1e-2


def test_the_interval_is_an_input_and_r_none_is_r_equal_t():
    head = random_head()
    x, t, h = torch.randn(4, 2), torch.rand(4) * 0.5, torch.randn(4, 3)
    assert torch.equal(head(x, t, h), head(x, t, h, r=t))
    assert (head(x, t, h, r=t + 0.4) - head(x, t, h)).abs().max() > 1e-3


def test_euler_uses_average_velocities_the_other_solvers_instantaneous_ones():
    head = random_head()
    assert head.eval_times("euler", 2) == [(0.0, 0.5), (0.5, 1.0)]
    assert all(t == r for t, r in head.eval_times("heun", 3) + head.eval_times("euler_maruyama", 3))


def test_fitted_head_samples_its_targets_in_one_and_two_steps(monkeypatch):
    """Fit 3 condition-dependent point clouds; one- and two-step Euler (average velocities) land on the right one."""
    monkeypatch.setattr(meanflow_head, "AVERAGE_SHARE", 0.5)
    torch.manual_seed(0)
    head = MeanFlowHead(token_dim=2, cond_dim=3, width=64, depth=2, n_adaln=1)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(250):
        c = torch.randint(0, 3, (256,))
        loss = head.loss(centers[c] + 0.05 * torch.randn(256, 2), torch.eye(3)[c], batch_mul=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    c = torch.arange(3).repeat(20)
    with torch.no_grad():
        for steps in (1, 2):
            x = head.sample(torch.eye(3)[c], torch.randn(len(c), noise_draws("euler", steps), 2), None, "euler", steps)
            assert (torch.cdist(x, centers).argmin(1) == c).float().mean() > 0.9, steps


@pytest.mark.parametrize("steps", [1, 2])
def test_sphere_ar_with_the_meanflow_head_trains_and_samples_on_the_sphere(steps):
    assert "meanflow" in FLOW_TYPES
    torch.manual_seed(0)
    model = SphereAR(ARConfig(token_dim=4, grid=(2, 2), radius=2.0, num_classes=3, dim=32, n_layers=1, n_heads=2,
                              mlp_multiple_of=8, n_cls_tokens=2, head_depth=2, head_width=16, head_adaln=1,
                              flow="meanflow"))
    z = torch.nn.functional.normalize(torch.randn(6, 4, 4), dim=-1) * 2.0
    loss, _ = model.training_loss((z, torch.tensor([0, 1, 2, 0, 1, 2])), 0)
    loss.backward()
    assert torch.isfinite(loss) and model.head.final_proj.bias.grad.abs().sum() > 0  # the zero-init layers learn
    out = model.eval().generate([0, 2], [1, 2], sampler="euler", steps=steps, cfg=2.0)
    assert torch.allclose(out.norm(dim=-1), torch.full((2, 4), 2.0), atol=1e-5)
