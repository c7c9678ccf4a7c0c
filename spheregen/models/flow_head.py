"""Token-level flow head (SphereAR Sec. 3.2, after MAR): an MLP with AdaLN that predicts the velocity of a
rectified flow from noise (t = 0) to the next latent token (t = 1), conditioned on the transformer output.

Network (the authors' MLP-AdaLN head, paper Sec. 3.3):
  x -> Linear(d, C);  y = SiLU(t_emb + c_emb), with t_emb = MLP(sinusoid(1000 t)) and c_emb = Linear(h)
  ResBlock: h = LayerNorm(x) (1 + scale) + shift;  x += gate * SwiGLU(h)
  the (scale, shift, gate) come from `n_adaln` shared Linear(C, 3C) layers applied to y, each serving
  depth / n_adaln consecutive blocks; the final layer is LayerNorm -> modulate -> Linear(C, d), zero-init.
Loss (Eq. 7-8): x_t = (1 - t) eps + t x1,  v = x1 - eps,  t = sigmoid(N(0, 1)),  L = E ||v - v_w(x_t, t, h)||^2.
Samplers integrate dx/dt = v from t = 0 to 1: `euler` (Eq. 9), `heun`, and `euler_maruyama` (the
authors' SDE sampler).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from spheregen.layers import SwiGLU

SAMPLERS = ("euler", "euler_maruyama", "heun")
EM_LAST_STEP = 0.04  # the Euler-Maruyama sampler ends with one deterministic Euler step of this size


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(1000 t f_j), sin(1000 t f_j)] with f_j = max_period^(-j / (dim/2)), j < dim/2 (DiT style)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class ResBlock(nn.Module):
    """x + gate * SwiGLU(LayerNorm(x) (1 + scale) + shift); the SwiGLU has hidden 1.5 C and biases."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = SwiGLU(width, int(1.5 * width), bias=True)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class FlowHead(nn.Module):
    """v_w(x_t, t, h): x_t [N, token_dim], t [N], h [N, cond_dim] -> velocity [N, token_dim]."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, n_adaln: int = 2):
        super().__init__()
        if depth % n_adaln:
            raise ValueError(f"head depth {depth} must be a multiple of the number of AdaLN linears {n_adaln}")
        self.token_dim, self.depth, self.n_adaln = token_dim, depth, n_adaln
        self.input_proj = nn.Linear(token_dim, width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.adaln = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(n_adaln))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_adaln = nn.Linear(width, 2 * width)
        self.final_proj = nn.Linear(width, token_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """xavier_uniform / zero bias; time MLP N(0, 0.02); AdaLN and final layers zero (the head starts at 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.time_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for m in [*self.adaln, self.final_adaln, self.final_proj]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        y = nn.functional.silu(self.time_embed(timestep_embedding(t).to(x.dtype)) + self.cond_embed(h))
        x = self.input_proj(x)
        per = self.depth // self.n_adaln
        for i, blk in enumerate(self.blocks):
            if i % per == 0:
                scale, shift, gate = self.adaln[i // per](y).chunk(3, dim=-1)
            x = blk(x, scale, shift, gate)
        scale, shift = self.final_adaln(y).chunk(2, dim=-1)
        return self.final_proj(self.final_norm(x) * (1 + scale) + shift)

    def loss(self, x1: torch.Tensor, h: torch.Tensor, batch_mul: int = 4) -> torch.Tensor:
        """Rectified-flow loss (Eq. 8) with `batch_mul` independent (t, eps) draws per target.

        x1 [N, token_dim] targets, h [N, cond_dim] conditions; the noise is drawn in fp32.
        """
        x1 = x1.float().repeat(batch_mul, 1)
        h = h.repeat(batch_mul, 1)
        t = torch.sigmoid(torch.randn(x1.shape[0], device=x1.device))  # logit-normal(0, 1)
        eps = torch.randn_like(x1)
        xt = (1 - t[:, None]) * eps + t[:, None] * x1
        v = self(xt, t, h).float()
        return (v - (x1 - eps)).pow(2).mean()

    def noise_draws(self, sampler: str, steps: int) -> int:
        """Standard-normal vectors per token that `sample` consumes with this sampler and step count."""
        return noise_draws(sampler, steps)

    def sample(self, h: torch.Tensor, noise: torch.Tensor, scale: float | None, sampler: str = "euler_maruyama",
               steps: int = 100, temperature: float = 1.0) -> torch.Tensor:
        """One token per row from head conditions h: the flow solved from noise (see `solve`).

        scale None: h [R, C], noise [R, draws, d] -> [R, d], every row on its own.
        scale s: h = [h_cond; h_null] [2B, C] sharing noise [B, draws, d]; guided velocity -> [B, d].
        Projection onto the sphere is the caller's (SphereAR.solve_token), after the solve and after CFG.
        """
        return solve(guided_velocity(self, h, scale), noise, sampler, steps, temperature)


VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def guided_velocity(head: FlowHead, h: torch.Tensor, scale: float | None = None) -> VelocityFn:
    """The velocity field of one token for the solver, x [N, d] -> v [N, d] (fp32).

    scale None: v = v_w(x, t, h) with h [N, C]. Otherwise classifier-free guidance on the velocity:
    h = [h_cond; h_null] [2N, C], both rows see the same x (hence share the noise), and
    v = v_null + scale (v_cond - v_null).
    """

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        xx = x if scale is None else torch.cat([x, x])
        v = head(xx, torch.full((len(xx),), t, device=x.device), h).float()
        if scale is None:
            return v
        v_cond, v_null = v.chunk(2)
        return v_null + scale * (v_cond - v_null)

    return velocity


def noise_draws(sampler: str, steps: int) -> int:
    """How many standard-normal vectors per token a sampler consumes: x0, plus one per SDE step."""
    return 1 + (steps if sampler == "euler_maruyama" else 0)


def solve(velocity: VelocityFn, noise: torch.Tensor, sampler: str = "euler", steps: int = 50,
          temperature: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 0 to 1 starting at x0 = temperature * noise[:, 0].

    noise [N, noise_draws(sampler, steps), d]: row k's randomness, so a sample never depends on its batch.
    - euler: x += v(x, t) dt with dt = 1/N (Eq. 9); N evaluations.
    - heun: Euler predictor + trapezoid corrector on each of N steps; 2N evaluations.
    - euler_maruyama: over t in [0, 0.96] with dt = 0.96/N, score = (t v - x) / (1 - t) (as x = eps + t v
      gives E[eps | x] = x - t v), x += (v + (1 - t) score) dt + temperature * sqrt(2 (1 - t) dt) xi, then
      one deterministic Euler step of 0.04 with v at t = 0.96; N + 1 evaluations.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"the flow solver needs at least 1 step, got {steps}")
    x = temperature * noise[:, 0].float()
    if sampler == "euler":
        dt = 1.0 / steps
        for i in range(steps):
            x = x + dt * velocity(x, i * dt)
    elif sampler == "heun":
        dt = 1.0 / steps
        for i in range(steps):
            v1 = velocity(x, i * dt)
            v2 = velocity(x + dt * v1, (i + 1) * dt)
            x = x + 0.5 * dt * (v1 + v2)
    else:
        dt = (1.0 - EM_LAST_STEP) / steps
        for i in range(steps):
            t = i * dt
            v = velocity(x, t)
            score = (t * v - x) / (1 - t)
            x = x + (v + (1 - t) * score) * dt + temperature * math.sqrt(2 * (1 - t) * dt) * noise[:, 1 + i]
        x = x + EM_LAST_STEP * velocity(x, 1.0 - EM_LAST_STEP)
    return x
