"""Riemannian flow matching on the token sphere S^{d-1}(R) (Chen & Lipman 2023; SphereAR's "Future work").

The network is flow_head.FlowHead's MLP-AdaLN; only the path, the loss and the sampler change:
  Path.   x_0 = N_R(eps), eps ~ N(0, I): uniform on the sphere (the per-seed Gaussian draw, normalised);
          x_t = exp_{x_0}(t log_{x_0}(x_1)), the constant-speed geodesic to the data token x_1 (RFM Eq. 14 with
          the geodesic distance), and its velocity u_t = dx_t/dt, tangent at x_t (sphere.geodesic).
  Head.   v(x_t, t, h) = P_{x_t} v_w(x_t, t, h): the network's output projected onto T_{x_t} (sphere.tangent).
  Loss.   E ||v(x_t, t, h) - u_t||^2 in the ambient R^d, t = sigmoid(N(0, 1)) as the Euclidean head.
          This is the Riemannian loss of RFM (Eq. 13): the sphere's metric is the one induced by its embedding,
          g_x(a, b) = <a, b> for a, b in T_x, and both v and u_t are in T_{x_t}, so ||v - u_t||_g = ||v - u_t||_2.
  Sampler (sample / solve): integrate dx/dt = v(x, t) on the sphere from t = 0 to 1, every state on it:
    euler  x <- exp_x(dt v(x, t)) (geodesic Euler); N evaluations.
    heun   predictor y = exp_x(dt v1), v1 = v(x, t); v2 = v(y, t + dt) carried back to T_x by parallel transport
           along the great circle (sphere.transport); x <- exp_x(dt (v1 + Gamma_{y->x} v2) / 2). Second order,
           2N evaluations.
  The path has no closed-form score, so there is no SDE sampler: "euler_maruyama" (the Euclidean head's default)
  runs as geodesic Euler, with a warning.
  Guidance: v = P_x v_null + s (P_x v_cond - P_x v_null) at the current point (P_x is linear, so this is P_x of
  the guided raw output), then the exp-map step: the guided token stays on the sphere and SphereAR's projection
  after the solve is an identity.
"""

from __future__ import annotations

import torch

from spheregen.errors import UserError
from spheregen.losses import say_once
from spheregen.models.flow_head import FlowHead, VelocityFn, guided_velocity
from spheregen.sphere import exp_map, geodesic, project, tangent, transport

SPHERE_SAMPLERS = ("euler", "heun")


class RiemannianFlowHead(FlowHead):
    """A flow head whose path, velocity and solver stay on the radius-R sphere of the tokens."""

    needs_radius = True  # models/heads.build_head passes the tokens' radius R

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, n_adaln: int = 2,
                 radius: float = 1.0):
        super().__init__(token_dim, cond_dim, width, depth, n_adaln)
        if not radius > 0:
            raise ValueError(f"the Riemannian head needs a positive sphere radius, got {radius}")
        self.radius = float(radius)

    def loss(self, x1: torch.Tensor, h: torch.Tensor, batch_mul: int = 4) -> torch.Tensor:
        """Riemannian flow-matching loss (RFM Eq. 13) with `batch_mul` independent (t, x_0) draws per target.

        x1 [N, token_dim] targets (projected to radius R: only points on the sphere are reachable),
        h [N, cond_dim] conditions; fp32 path whatever the autocast."""
        x1 = project(x1.float().repeat(batch_mul, 1), self.radius)
        h = h.repeat(batch_mul, 1)
        t = torch.sigmoid(torch.randn(x1.shape[0], device=x1.device))  # logit-normal(0, 1)
        x0 = project(torch.randn_like(x1), self.radius)  # uniform on S^{d-1}(R)
        xt, ut = geodesic(x0, x1, t, self.radius)
        v = tangent(xt, self(xt, t, h).float())
        return (v - ut).pow(2).mean()

    def noise_draws(self, sampler: str, steps: int) -> int:
        """One Gaussian vector per token (normalised to the starting point); no sampler draws more."""
        return 1

    def sample(self, h: torch.Tensor, noise: torch.Tensor, scale: float | None, sampler: str = "euler",
               steps: int = 100, temperature: float = 1.0) -> torch.Tensor:
        """One token per row, on the sphere: scale None, h [R, C], noise [R, 1, d] -> [R, d]; scale s,
        h = [h_cond; h_null] [2B, C] sharing noise [B, 1, d] -> [B, d] with guided tangent velocities."""
        if temperature != 1.0:
            raise UserError(f"temperature {temperature:g}: the Riemannian head starts from the uniform law on the "
                            "sphere, which has no scale; use temperature 1")
        if sampler == "euler_maruyama":
            say_once("the Riemannian flow head has no SDE sampler; euler_maruyama runs as geodesic Euler")
            sampler = "euler"
        velocity = guided_velocity(self, h, scale)
        return solve(lambda x, t: tangent(x, velocity(x, t)), project(noise[:, 0].float(), self.radius),
                     self.radius, sampler, steps)


def solve(velocity: VelocityFn, x0: torch.Tensor, radius: float, sampler: str = "euler",
          steps: int = 50) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) (tangent at x) on S^{d-1}(R) from x0 [N, d] at t = 0 to t = 1 with
    exp-map steps (module docstring: euler, heun); every state and every evaluation point is on the sphere."""
    if sampler not in SPHERE_SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r} for the Riemannian head; choose one of "
                        f"{', '.join(SPHERE_SAMPLERS)}")
    if steps < 1:
        raise UserError(f"the flow solver needs at least 1 step, got {steps}")
    x, dt = x0.float(), 1.0 / steps
    for i in range(steps):
        v = velocity(x, i * dt)
        if sampler == "heun":
            y = exp_map(x, dt * v, radius)
            v = 0.5 * (v + transport(y, x, velocity(y, (i + 1) * dt), radius))
        x = exp_map(x, dt * v, radius)
    return x
