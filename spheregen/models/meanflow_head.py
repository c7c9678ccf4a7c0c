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
sphere after each token are SphereAR's, as for the Euclidean head. A head can also be distilled from a trained
Euclidean head (models/meanflow_distill.py), optionally with the CFG scale as an input (`guidance_input`).

Why MeanFlow rather than a shortcut model (Frans et al. 2024): it trains from scratch in one stage, with one
JVP instead of the shortcut's two bootstrap evaluations at dyadic step sizes; with r = t its loss is exactly the
head's rectified-flow loss, so the multi-step samplers keep working on the same weights; and it reported the
better one-step FID on ImageNet 256 (3.43 against the shortcut model's 10.6).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import forward_ad

from spheregen.models.flow_head import FlowHead, ModulationTable, solver_times, timestep_embedding

AVERAGE_SHARE = 0.25  # rows with r != t (the paper's best ratio; the rest train the instantaneous velocity)
WEIGHT_POWER, WEIGHT_EPS = 1.0, 1e-3  # adaptive loss weight 1 / (||err||^2 + eps)^power
GUIDANCE_SCALE = 8.0  # the CFG scale w enters the guidance embedding as sinusoid(1000 (w - 1) / GUIDANCE_SCALE)


class MeanFlowHead(FlowHead):
    """u_w(x_t, t, r, h): the average velocity over [t, r]; r = None is r = t (the instantaneous velocity).

    guidance_input: the head also takes the CFG scale w (a head distilled with guidance folded in,
    models/meanflow_distill.py): it then learns the average velocity of the guided flow and samples from the
    conditional rows alone, with w as an input instead of a null-row combination."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, n_adaln: int = 2,
                 guidance_input: bool = False):
        super().__init__(token_dim, cond_dim, width, depth, n_adaln)
        self.interval_embed = _embedding_mlp(width)
        self.guidance_input = guidance_input
        self.guidance_embed = _embedding_mlp(width, zero_out=True) if guidance_input else None
        self.distiller = None  # a models.meanflow_distill.MeanFlowDistiller while distilling (never saved)

    def time_features(self, t: torch.Tensor, r: torch.Tensor | None = None,
                      w: torch.Tensor | None = None) -> torch.Tensor:
        """MLP(sinusoid(1000 t)) + MLP'(sinusoid(1000 (r - t))) [+ MLP''(sinusoid(1000 (w - 1) / 8))] [N, C]."""
        dtype = self.input_proj.weight.dtype
        gap = torch.zeros_like(t) if r is None else r - t
        emb = self.time_embed(timestep_embedding(t).to(dtype)) + self.interval_embed(timestep_embedding(gap).to(dtype))
        if self.guidance_embed is not None:
            w = torch.ones_like(t) if w is None else w
            emb = emb + self.guidance_embed(timestep_embedding((w - 1) / GUIDANCE_SCALE).to(dtype))
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor | None, h: torch.Tensor | None,
                mods: tuple[torch.Tensor, ...] | None = None, r: torch.Tensor | None = None,
                w: torch.Tensor | None = None) -> torch.Tensor:
        """u for x [N, d] over [t, r] under conditions h [N, cond_dim] (and CFG scales w [N] with guidance_input);
        mods: precomputed modulations, as FlowHead.forward."""
        if mods is None:
            mods = self.modulations(self.time_features(t, r, w), self.cond_embed(h)).unbind(-2)
        return self.trunk(x, mods)

    @property
    def needs_null_condition(self) -> bool:
        """Whether `loss` wants the null rows' conditions (distilling with guidance folded in)."""
        return self.distiller is not None and self.distiller.folded

    def loss(self, x1: torch.Tensor, h: torch.Tensor, batch_mul: int = 4,
             h_null: torch.Tensor | None = None) -> torch.Tensor:
        """MeanFlow loss with `batch_mul` independent (t, r, eps) draws per target; x1 [N, d], h [N, cond_dim].
        While distilling, the distiller's loss (the teacher's velocities; h_null: the null rows' conditions)."""
        if self.distiller is not None:
            return self.distiller.loss(x1, h, batch_mul, h_null)
        x1 = x1.float().repeat(batch_mul, 1)
        h = h.repeat(batch_mul, 1)
        n = x1.shape[0]
        a, b = torch.sigmoid(torch.randn(2, n, device=x1.device))  # logit-normal(0, 1) each
        t, r = torch.minimum(a, b), torch.maximum(a, b)
        r = torch.where(torch.rand(n, device=x1.device) < AVERAGE_SHARE, r, t)
        eps = torch.randn_like(x1)
        xt = (1 - t[:, None]) * eps + t[:, None] * x1
        return identity_loss(self, xt, t, r, h, x1 - eps, WEIGHT_POWER)

    def sample(self, h: torch.Tensor, noise: torch.Tensor, scale: float | None, sampler: str = "euler",
               steps: int = 100, temperature: float = 1.0) -> torch.Tensor:
        """As FlowHead.sample; with guidance_input, h [B, C] holds the conditional rows only and `scale` (None: 1)
        is the head's input w, so there are no null rows to combine."""
        if not self.guidance_input:
            return super().sample(h, noise, scale, sampler, steps, temperature)
        table = ModulationTable(self, h, self.eval_times(sampler, steps), guided=False,
                                guidance=1.0 if scale is None else scale)
        return table.solve(None, noise, sampler, steps, temperature)

    def eval_times(self, sampler: str, steps: int) -> list[tuple[float, float]]:
        """`euler` jumps with the average velocity over each step [t_i, t_i+1]; the other solvers use the
        instantaneous velocity u(x, t, t)."""
        times = solver_times(sampler, steps)
        if sampler != "euler":
            return [(t, t) for t in times]
        return [(t, (i + 1) / steps) for i, t in enumerate(times)]


def identity_loss(head: MeanFlowHead, xt: torch.Tensor, t: torch.Tensor, r: torch.Tensor, h: torch.Tensor,
                  v: torch.Tensor, power: float, w: torch.Tensor | None = None) -> torch.Tensor:
    """The MeanFlow loss at x_t with path velocity v: target v + (r - t) d/dt u (stop-gradient), the total
    derivative d/dt u = v . grad_x u + d_t u as one forward-mode JVP along (v, 1); weight 1 / (||err||^2 + c)^p."""
    with forward_ad.dual_level():  # u and d/dt u in one forward pass
        out = head(forward_ad.make_dual(xt, v), forward_ad.make_dual(t, torch.ones_like(t)), h, r=r, w=w)
        u, du_dt = forward_ad.unpack_dual(out)
    target = (v + (r - t)[:, None] * du_dt.float()).detach()  # the MeanFlow identity, stop-gradient
    return weighted_error(u, target, power)


def weighted_error(u: torch.Tensor, target: torch.Tensor, power: float) -> torch.Tensor:
    """mean of w ||u - target||^2 with MeanFlow's adaptive weight w = 1 / (||err||^2 + c)^p (stop-gradient)."""
    err = (u.float() - target).pow(2).sum(-1)
    return ((err.detach() + WEIGHT_EPS).pow(-power) * err).mean()


def _embedding_mlp(width: int, zero_out: bool = False) -> nn.Sequential:
    """Linear(256, C) - SiLU - Linear(C, C) on a sinusoidal embedding, N(0, 0.02) weights (the output layer
    zero with zero_out: the embedding starts as nothing)."""
    mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    if zero_out:
        nn.init.zeros_(mlp[-1].weight)
    return mlp
