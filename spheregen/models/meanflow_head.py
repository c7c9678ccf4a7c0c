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

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import forward_ad

from spheregen.errors import UserError, check_choice
from spheregen.models.flow_head import FlowHead, solver_times, timestep_embedding

AVERAGE_SHARE = 0.25  # rows with r != t (the paper's best ratio; the rest train the instantaneous velocity)
WEIGHT_POWER, WEIGHT_EPS = 1.0, 1e-3  # adaptive loss weight 1 / (||err||^2 + eps)^power
TIME_SAMPLERS = ("logit_normal", "uniform")
DISTILL_TARGETS = ("identity", "trajectory")


@dataclass
class DistillConfig:
    """Distilling a MeanFlow head from a trained rectified-flow head, the transformer frozen (`spheregen train
    distill`, the [distill] table). The teacher's velocity v_T(x_t, t, h) replaces the one-sample target x1 - eps
    in the MeanFlow identity, so the head learns the average velocity of the teacher's own ODE.

    teacher: the teacher AR checkpoint (or --teacher); average_share: rows with r != t; time_sampler: the law of
    the pair (t, r), "uniform" (covers t = 0, r = 1, the one-step jump) or "logit_normal" (the from-scratch law);
    target: "identity" (the MeanFlow identity with v_T, one JVP) or "trajectory" (the teacher's ODE solved from
    x_t at t to r with `teacher_steps` Euler steps, u = (x_r - x_t) / (r - t): the definition of u, no bootstrap);
    weight_power: the adaptive weight's p (0: the plain squared error); class_dropout / batch_mul: as [model].
    """

    teacher: str | None = None
    average_share: float = 0.5
    time_sampler: str = "uniform"
    target: str = "identity"
    teacher_steps: int = 8
    weight_power: float = 1.0
    class_dropout: float = 0.1
    batch_mul: int = 4

    def __post_init__(self) -> None:
        check_choice("distill.time_sampler", self.time_sampler, TIME_SAMPLERS)
        check_choice("distill.target", self.target, DISTILL_TARGETS)
        if self.teacher_steps < 1:
            raise UserError(f"distill.teacher_steps must be at least 1, got {self.teacher_steps}")


class MeanFlowHead(FlowHead):
    """u_w(x_t, t, r, h): the average velocity over [t, r]; r = None is r = t (the instantaneous velocity)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, n_adaln: int = 2):
        super().__init__(token_dim, cond_dim, width, depth, n_adaln)
        self.interval_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        for m in self.interval_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.average_share, self.time_sampler, self.weight_power = None, "logit_normal", WEIGHT_POWER
        self.teacher, self.distill = None, None  # a frozen FlowHead and its DistillConfig (never saved)

    def distill_from(self, teacher: FlowHead, cfg: DistillConfig) -> None:
        """Learn from `teacher`'s velocities (see DistillConfig). The caller has copied the teacher's weights
        into this head; the interval embedding's output layer is zeroed, so training starts from
        u(x, t, r) = v_T(x, t): one Euler step of the teacher per interval."""
        nn.init.zeros_(self.interval_embed[-1].weight)
        nn.init.zeros_(self.interval_embed[-1].bias)
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        self.distill = cfg
        self.average_share, self.time_sampler, self.weight_power = cfg.average_share, cfg.time_sampler, \
            cfg.weight_power

    def time_features(self, t: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """MLP(sinusoid(1000 t)) + MLP'(sinusoid(1000 (r - t))) [N, C]."""
        dtype = self.input_proj.weight.dtype
        gap = torch.zeros_like(t) if r is None else r - t
        return self.time_embed(timestep_embedding(t).to(dtype)) + self.interval_embed(timestep_embedding(gap).to(dtype))

    def loss(self, x1: torch.Tensor, h: torch.Tensor, batch_mul: int = 4) -> torch.Tensor:
        """MeanFlow loss with `batch_mul` independent (t, r, eps) draws per target; x1 [N, d], h [N, cond_dim].
        The velocity along the path is x1 - eps, or the teacher's v_T(x_t, t, h) when distilling."""
        x1 = x1.float().repeat(batch_mul, 1)
        h = h.repeat(batch_mul, 1)
        t, r = self.sample_times(x1.shape[0], x1.device)
        eps = torch.randn_like(x1)
        xt = (1 - t[:, None]) * eps + t[:, None] * x1
        if self.teacher is None:
            v = x1 - eps
        else:
            with torch.no_grad():
                v = self.teacher(xt, t, h).float()
            if self.distill.target == "trajectory":
                return self.trajectory_loss(xt, t, r, h, v)
        with forward_ad.dual_level():  # u and d/dt u = v . grad_x u + d_t u in one forward pass
            out = self(forward_ad.make_dual(xt, v), forward_ad.make_dual(t, torch.ones_like(t)), h, r=r)
            u, du_dt = forward_ad.unpack_dual(out)
        target = (v + (r - t)[:, None] * du_dt.float()).detach()  # the MeanFlow identity, stop-gradient
        err = (u.float() - target).pow(2).sum(-1)
        weight = (err.detach() + WEIGHT_EPS).pow(-self.weight_power)
        return (weight * err).mean()

    def trajectory_loss(self, xt: torch.Tensor, t: torch.Tensor, r: torch.Tensor, h: torch.Tensor,
                        v: torch.Tensor) -> torch.Tensor:
        """The average velocity regressed on the teacher's own: x_r = x_t + int_t^r v_T ds by `teacher_steps`
        Euler steps of size (r - t) / K per row (v = v_T(x_t, t) is the first), target (x_r - x_t) / (r - t),
        and v_T(x_t, t) itself where r = t."""
        k = self.distill.teacher_steps
        dt = ((r - t) / k)[:, None]
        x = xt + dt * v
        with torch.no_grad():
            for i in range(1, k):
                x = x + dt * self.teacher(x, t + i * dt[:, 0], h).float()
        span = (r - t)[:, None]
        target = torch.where(span > 0, (x - xt) / span.clamp_min(1e-12), v)
        err = (self(xt, t, h, r=r).float() - target).pow(2).sum(-1)
        weight = (err.detach() + WEIGHT_EPS).pow(-self.weight_power)
        return (weight * err).mean()

    def sample_times(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r), r >= t: the ordered pair of two draws (logit-normal(0, 1) or uniform), and r = t on a share
        1 - average_share of the rows (AVERAGE_SHARE unless distilling)."""
        if self.time_sampler == "uniform":
            a, b = torch.rand(2, n, device=device)
        else:
            a, b = torch.sigmoid(torch.randn(2, n, device=device))
        t, r = torch.minimum(a, b), torch.maximum(a, b)
        share = AVERAGE_SHARE if self.average_share is None else self.average_share
        return t, torch.where(torch.rand(n, device=device) < share, r, t)

    def eval_times(self, sampler: str, steps: int) -> list[tuple[float, float]]:
        """`euler` jumps with the average velocity over each step [t_i, t_i+1]; the other solvers use the
        instantaneous velocity u(x, t, t)."""
        times = solver_times(sampler, steps)
        if sampler != "euler":
            return [(t, t) for t in times]
        return [(t, (i + 1) / steps) for i, t in enumerate(times)]
