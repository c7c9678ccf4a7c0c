"""A few-step flow head: MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling").

The head predicts the average velocity of the rectified flow over [t, r] (t = 0 noise, t = 1 data, r >= t),
    u(x_t, t, r) = 1 / (r - t) int_t^r v(x_s, s) ds,   so   x_r = x_t + (r - t) u(x_t, t, r),
and one evaluation jumps a whole interval: 1 or 2 head evaluations per token (paper Eq. 1-3, written for our
time direction). Differentiating (r - t) u = int_t^r v ds in t gives the MeanFlow identity (Eq. 6)
    u(x_t, t, r) = v(x_t, t) + (r - t) d/dt u(x_t, t, r),   d/dt u = v . grad_x u + d_t u,
whose right side is the training target with v = x1 - eps, the total derivative one forward-mode JVP of the
network along the tangent (v, 1) in (x, t), and a stop-gradient (Eq. 8-9). The loss uses the paper's adaptive
weight w = 1 / (||err||^2 + c)^p, p = 1 (Sec. 4.3). A share `1 - AVERAGE_SHARE` of the rows has r = t, where the
target is the rectified-flow velocity itself (the paper's best ratio, Table 1a).

Network: flow_head.FlowHead's MLP-AdaLN with a second time embedding, of the interval r - t, added to the
first (the paper conditions on (t, t - r)). Since u(x, t, t) = v(x, t), the head still runs every solver of
the Euclidean head (Heun and Euler-Maruyama with instantaneous velocities), while `euler` evaluates the average
velocity over each step: `euler` with 1 or 2 steps is the few-step sampler. CFG and the projection to the
sphere after each token are SphereAR's, as for the Euclidean head.

Why MeanFlow rather than a shortcut model (Frans et al. 2024): it trains from scratch in one stage, with one
JVP instead of the shortcut's two bootstrap evaluations at dyadic step sizes; with r = t its loss is exactly the
head's rectified-flow loss, so the multi-step samplers keep working on the same weights; and it reported the
better one-step FID on ImageNet 256 (3.43 against the shortcut model's 10.6).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import forward_ad

from spheregen.models.flow_head import FlowHead, solver_times, timestep_embedding

AVERAGE_SHARE = 0.25  # rows with r != t (the paper's best ratio; the rest train the instantaneous velocity)
WEIGHT_POWER, WEIGHT_EPS = 1.0, 1e-3  # adaptive loss weight 1 / (||err||^2 + eps)^power


class MeanFlowHead(FlowHead):
    """u_w(x_t, t, r, h): the average velocity over [t, r]; r = None is r = t (the instantaneous velocity)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, n_adaln: int = 2):
        super().__init__(token_dim, cond_dim, width, depth, n_adaln)
        self.interval_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        for m in self.interval_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def time_features(self, t: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """MLP(sinusoid(1000 t)) + MLP'(sinusoid(1000 (r - t))) [N, C]."""
        dtype = self.input_proj.weight.dtype
        gap = torch.zeros_like(t) if r is None else r - t
        return self.time_embed(timestep_embedding(t).to(dtype)) + self.interval_embed(timestep_embedding(gap).to(dtype))

    def loss(self, x1: torch.Tensor, h: torch.Tensor, batch_mul: int = 4) -> torch.Tensor:
        """MeanFlow loss with `batch_mul` independent (t, r, eps) draws per target; x1 [N, d], h [N, cond_dim]."""
        x1 = x1.float().repeat(batch_mul, 1)
        h = h.repeat(batch_mul, 1)
        n = x1.shape[0]
        a, b = torch.sigmoid(torch.randn(2, n, device=x1.device))  # logit-normal(0, 1) each
        t, r = torch.minimum(a, b), torch.maximum(a, b)
        r = torch.where(torch.rand(n, device=x1.device) < AVERAGE_SHARE, r, t)
        eps = torch.randn_like(x1)
        xt = (1 - t[:, None]) * eps + t[:, None] * x1
        v = x1 - eps
        with forward_ad.dual_level():  # u and d/dt u = v . grad_x u + d_t u in one forward pass
            out = self(forward_ad.make_dual(xt, v), forward_ad.make_dual(t, torch.ones_like(t)), h, r=r)
            u, du_dt = forward_ad.unpack_dual(out)
        target = (v + (r - t)[:, None] * du_dt.float()).detach()  # the MeanFlow identity, stop-gradient
        err = (u.float() - target).pow(2).sum(-1)
        weight = (err.detach() + WEIGHT_EPS).pow(-WEIGHT_POWER)
        return (weight * err).mean()

    def eval_times(self, sampler: str, steps: int) -> list[tuple[float, float]]:
        """`euler` jumps with the average velocity over each step [t_i, t_i+1]; the other solvers use the
        instantaneous velocity u(x, t, t)."""
        times = solver_times(sampler, steps)
        if sampler != "euler":
            return [(t, t) for t in times]
        return [(t, (i + 1) / steps) for i, t in enumerate(times)]
