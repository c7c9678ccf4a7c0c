"""Distilling a few-step MeanFlow head from a trained rectified-flow (Euclidean) head, the transformer frozen
(issue 20; MeanFlow, Geng et al. 2025; `spheregen train distill`, engine/distill_setup.py).

The student u(x_t, t, r | h) learns the average velocity of the teacher's own ODE dx/dt = v_T(x, t, h) instead of
the one-sample path velocity x1 - eps of from-scratch training:
  identity    target v_T + (r - t) d/dt u (the MeanFlow identity with the teacher's velocity, one JVP);
  trajectory  target (x_r - x_t) / (r - t), x_r from K Euler steps of the teacher's ODE from x_t at t to r: the
              definition of u, no bootstrap, K teacher evaluations per row.
  grid        the teacher's ODE from the sampler's own start x_0 ~ N(0, I) to t = 1 in K Euler steps, and every
              interval [i/n, (i+1)/n] of the few-step samplers n in `grid_steps` read off that one trajectory:
              u(x_a, a, b) = (x_b - x_a) / (b - a), plus u(x_a, a, a) = v_T(x_a, a) at the grid points. The
              student is trained where its samplers go (x_a on the teacher's path, not the data path), and one
              trajectory gives every interval.
Guidance:
  combined  the student learns each row's own flow (cond and null), and sampling combines the two rows' average
            velocities as SphereAR's CFG does today, u_null + s (u_cond - u_null). Over a long interval this
            extrapolates between two *endpoints* rather than two velocities, which is not the guided flow.
  folded    the student takes the CFG scale w as an input and learns the average velocity of the guided
            teacher flow v_T(., h_null) + w (v_T(., h_cond) - v_T(., h_null)), w ~ U[1, cfg_max] per row; sampling
            then needs no null rows (MeanFlow's Sec. 4.2 folds CFG into training the same way).
x_t comes from the data path (1 - t) eps + t x1, as in training the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spheregen.errors import UserError, check_choice
from spheregen.models.flow_head import FlowHead
from spheregen.models.meanflow_head import MeanFlowHead, identity_loss, weighted_error

TIME_SAMPLERS = ("logit_normal", "uniform")
TARGETS = ("identity", "trajectory", "grid")
GUIDANCE = ("combined", "folded")


@dataclass
class DistillConfig:
    """The [distill] table of `spheregen train distill`.

    teacher: the teacher AR checkpoint (or --teacher); average_share: rows with r != t; time_sampler: the law of
    the pair (t, r), "uniform" (covers t = 0, r = 1, the one-step jump) or "logit_normal" (the from-scratch law);
    target / teacher_steps / grid_steps: see the module docstring (for "grid", teacher_steps must be a multiple of
    every entry of grid_steps, and average_share / time_sampler are unused); guidance: "combined" or "folded",
    cfg_max the largest CFG
    scale a folded student learns; weight_power: the adaptive weight's p (0: the plain squared error);
    class_dropout / batch_mul: as [model].
    """

    teacher: str | None = None
    average_share: float = 0.5
    time_sampler: str = "uniform"
    target: str = "identity"
    teacher_steps: int = 8
    grid_steps: tuple[int, ...] = (1, 2, 4)
    guidance: str = "combined"
    cfg_max: float = 4.0
    weight_power: float = 1.0
    class_dropout: float = 0.1
    batch_mul: int = 4

    def __post_init__(self) -> None:
        check_choice("distill.time_sampler", self.time_sampler, TIME_SAMPLERS)
        check_choice("distill.target", self.target, TARGETS)
        check_choice("distill.guidance", self.guidance, GUIDANCE)
        if self.teacher_steps < 1:
            raise UserError(f"distill.teacher_steps must be at least 1, got {self.teacher_steps}")
        if self.target == "grid" and any(n < 1 or self.teacher_steps % n for n in self.grid_steps):
            raise UserError(f"distill.teacher_steps {self.teacher_steps} must be a multiple of every grid step count "
                            f"{list(self.grid_steps)}")
        if self.cfg_max < 1:
            raise UserError(f"distill.cfg_max must be at least 1 (no guidance), got {self.cfg_max}")


class MeanFlowDistiller:
    """The distillation loss: owns the frozen teacher head and the (t, r, w) sampler; the student head calls
    `loss` from its own (MeanFlowHead.loss). `attach` zeroes the student's interval (and guidance) embedding
    output, so training starts from u(x, t, r) = v_T(x, t): one Euler step of the teacher per interval."""

    def __init__(self, student: MeanFlowHead, teacher: FlowHead, cfg: DistillConfig):
        if cfg.guidance == "folded" and not student.guidance_input:
            raise UserError("distill.guidance = \"folded\" needs a student head that takes the CFG scale "
                            "(model.head_guidance = true)")
        self.student, self.teacher, self.cfg = student, teacher.eval().requires_grad_(False), cfg
        self.folded = cfg.guidance == "folded"

    @classmethod
    def attach(cls, student: MeanFlowHead, teacher: FlowHead, cfg: DistillConfig) -> MeanFlowDistiller:
        torch.nn.init.zeros_(student.interval_embed[-1].weight)
        torch.nn.init.zeros_(student.interval_embed[-1].bias)
        distiller = cls(student, teacher, cfg)
        object.__setattr__(student, "distiller", distiller)  # outside the module tree: never saved
        return distiller

    def loss(self, x1: torch.Tensor, h: torch.Tensor, batch_mul: int, h_null: torch.Tensor | None) -> torch.Tensor:
        """x1 [N, d] targets, h [N, C] conditions (h_null [N, C]: the null rows' conditions, folded only)."""
        if self.folded and h_null is None:
            raise ValueError("folded-guidance distillation needs the null rows' conditions h_null")
        x1 = x1.float().repeat(batch_mul, 1)
        h = h.repeat(batch_mul, 1)
        h_null = h_null.repeat(batch_mul, 1) if self.folded else None
        n, dev = x1.shape[0], x1.device
        if self.cfg.target == "grid":
            return self.grid_loss(h, h_null, torch.randn_like(x1))
        t, r = self.sample_times(n, dev)
        w = 1 + (self.cfg.cfg_max - 1) * torch.rand(n, device=dev) if self.folded else None
        eps = torch.randn_like(x1)
        xt = (1 - t[:, None]) * eps + t[:, None] * x1
        with torch.no_grad():
            v = self.velocity(xt, t, h, h_null, w)
        if self.cfg.target == "trajectory":
            return weighted_error(self.student(xt, t, h, r=r, w=w), self.trajectory_target(xt, t, r, h, h_null, w, v),
                                  self.cfg.weight_power)
        return identity_loss(self.student, xt, t, r, h, v, self.cfg.weight_power, w)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, h_null: torch.Tensor | None,
                 w: torch.Tensor | None) -> torch.Tensor:
        """The teacher's velocity at (x, t): per row, or guided v_null + w (v_cond - v_null) when folded."""
        if not self.folded:
            return self.teacher(x, t, h).float()
        v_cond, v_null = self.teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([h, h_null])).float().chunk(2)
        return torch.lerp(v_null, v_cond, w[:, None])

    @torch.no_grad()
    def trajectory_target(self, xt: torch.Tensor, t: torch.Tensor, r: torch.Tensor, h: torch.Tensor,
                          h_null: torch.Tensor | None, w: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        """(x_r - x_t) / (r - t) with x_r from `teacher_steps` Euler steps of (r - t) / K per row (v, the
        velocity at (x_t, t), is the first); the velocity v itself where r = t."""
        k = self.cfg.teacher_steps
        dt = ((r - t) / k)[:, None]
        x = xt + dt * v
        for i in range(1, k):
            x = x + dt * self.velocity(x, t + i * dt[:, 0], h, h_null, w)
        span = (r - t)[:, None]
        return torch.where(span > 0, (x - xt) / span.clamp_min(1e-12), v)

    def grid_loss(self, h: torch.Tensor, h_null: torch.Tensor | None, x0: torch.Tensor) -> torch.Tensor:
        """The "grid" target: one teacher trajectory per row from x0, every few-step interval read off it."""
        n, k = x0.shape[0], self.cfg.teacher_steps
        w = 1 + (self.cfg.cfg_max - 1) * torch.rand(n, device=x0.device) if self.folded else None
        xs, vs = [x0], []
        with torch.no_grad():
            for i in range(k):  # Euler on the grid i / k; xs[i] is x at t = i / k, vs[i] the velocity there
                vs.append(self.velocity(xs[-1], torch.full((n,), i / k, device=x0.device), h, h_null, w))
                xs.append(xs[-1] + vs[-1] / k)
        starts, ends = [], []
        for steps in sorted(set(self.cfg.grid_steps)):
            starts += [i * k // steps for i in range(steps)]
            ends += [(i + 1) * k // steps for i in range(steps)]
        finest = k // max(self.cfg.grid_steps)
        points = list(range(0, k, finest))
        starts, ends = starts + points, ends + points  # r = t rows: the teacher's velocity at the grid points
        x = torch.cat([xs[a] for a in starts])
        target = torch.cat([(xs[b] - xs[a]) * (k / (b - a)) if b > a else vs[a] for a, b in zip(starts, ends)])
        t = torch.cat([torch.full((n,), a / k, device=x0.device) for a in starts])
        r = torch.cat([torch.full((n,), b / k, device=x0.device) for b in ends])
        hh = h.repeat(len(starts), 1)
        ww = w.repeat(len(starts)) if w is not None else None
        return weighted_error(self.student(x, t, hh, r=r, w=ww), target, self.cfg.weight_power)

    def sample_times(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r), r >= t: the ordered pair of two draws (uniform or logit-normal(0, 1)), r = t on a share
        1 - average_share of the rows."""
        if self.cfg.time_sampler == "uniform":
            a, b = torch.rand(2, n, device=device)
        else:
            a, b = torch.sigmoid(torch.randn(2, n, device=device))
        t, r = torch.minimum(a, b), torch.maximum(a, b)
        return t, torch.where(torch.rand(n, device=device) < self.cfg.average_share, r, t)
