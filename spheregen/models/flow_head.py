"""Token-level flow head (SphereAR Sec. 3.2, after MAR): an MLP with AdaLN that predicts the velocity of a
rectified flow from noise (t = 0) to the next latent token (t = 1), conditioned on the transformer output.

Network (the authors' MLP-AdaLN head, paper Sec. 3.3):
  x -> Linear(d, C);  y = SiLU(t_emb + c_emb), with t_emb = MLP(sinusoid(1000 t)) and c_emb = Linear(h)
  ResBlock: h = LayerNorm(x) (1 + scale) + shift;  x += gate * SwiGLU(h)
  the (scale, shift, gate) come from `n_adaln` shared Linear(C, 3C) layers applied to y, each serving
  depth / n_adaln consecutive blocks; the final layer is LayerNorm -> modulate -> Linear(C, d), zero-init.
Loss (Eq. 7-8): x_t = (1 - t) eps + t x1,  v = x1 - eps,  t = sigmoid(N(0, 1)),  L = E ||v - v_w(x_t, t, h)||^2.
Samplers integrate dx/dt = v from t = 0 to 1: `euler` (Eq. 9), `heun` (EDM style: no corrector on the last
step), and `euler_maruyama` (the authors' SDE sampler).

Sampling engine (`sample`, App. G names the head the inference bottleneck): y, hence every AdaLN output,
depends on (t, h) only, never on the state x. So per token the head embeds h once, embeds every solver time
once, and computes the AdaLN outputs of all solver steps in one large matrix product (`ModulationTable`); a
solver step then runs the state path alone (input projection, ResBlocks, final layer), the CFG rows share the
state by broadcasting, guidance is one lerp, and the solver updates the state in place. On CPU the state path
runs on packed weights (models/head_engine.py: contiguous W^T in fp32, prepacked oneDNN products in bf16).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from spheregen.layers import SwiGLU
from spheregen.models.head_engine import PackedTrunk, packed_trunk

SAMPLERS = ("euler", "euler_maruyama", "heun")
EM_LAST_STEP = 0.04  # the Euler-Maruyama sampler ends with one deterministic Euler step of this size
TABLE_BYTES = 1 << 21  # precomputed AdaLN outputs come in chunks of solver steps of ~2 MB (cache-sized)


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

    def forward(self, x: torch.Tensor, scale1p: torch.Tensor, shift: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """scale1p = 1 + scale (the AdaLN tables carry the 1); x may broadcast against the modulations."""
        return torch.addcmul(x, gate, self.mlp(torch.addcmul(shift, self.norm(x), scale1p)))


class FlowHead(nn.Module):
    """v_w(x_t, t, h): x_t [N, token_dim], t [N], h [N, cond_dim] -> velocity [N, token_dim]."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, n_adaln: int = 2):
        super().__init__()
        if depth % n_adaln:
            raise ValueError(f"head depth {depth} must be a multiple of the number of AdaLN linears {n_adaln}")
        self.token_dim, self.width, self.depth, self.n_adaln = token_dim, width, depth, n_adaln
        self.input_proj = nn.Linear(token_dim, width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.adaln = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(n_adaln))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_adaln = nn.Linear(width, 2 * width)
        self.final_proj = nn.Linear(width, token_dim)
        # the 1 of every (1 + scale) in the AdaLN outputs, laid out [K = 3 n_adaln + 2, C] as `modulations`
        one = torch.zeros(3 * n_adaln + 2, width)
        one[[*range(0, 3 * n_adaln, 3), 3 * n_adaln]] = 1.0
        self.register_buffer("scale_one", one, persistent=False)
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

    def time_features(self, t: torch.Tensor, r: torch.Tensor | None = None,
                      w: torch.Tensor | None = None) -> torch.Tensor:
        """t_emb = MLP(sinusoid(1000 t)) [N, C]. r, the end time of an average velocity, and w, a CFG scale
        taken as an input, are the MeanFlow head's; this (instantaneous) flow uses neither."""
        return self.time_embed(timestep_embedding(t).to(self.input_proj.weight.dtype))

    def modulations(self, t_emb: torch.Tensor, c_emb: torch.Tensor) -> torch.Tensor:
        """The AdaLN outputs of y = SiLU(t_emb + c_emb) (broadcast) as [..., K, C], K = 3 n_adaln + 2 rows:
        (1 + scale, shift, gate) of each AdaLN linear, then (1 + scale, shift) of the final layer; all in one
        matrix product with the stacked weights and the 1s folded into the bias."""
        layers = [*self.adaln, self.final_adaln]
        weight = torch.cat([a.weight for a in layers])  # [K * C, C]
        bias = torch.cat([a.bias for a in layers]) + self.scale_one.flatten()
        out = F.linear(F.silu(t_emb + c_emb), weight, bias)
        return out.unflatten(-1, self.scale_one.shape)  # [..., K * C] -> [..., K, C]

    def trunk(self, x: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The state path: x [..., d] and the K modulations [..., C] -> velocity. The leading dims broadcast: x [B, d]
        with modulations [2, B, C] runs the cond and null rows of CFG from one shared state, giving [2, B, d]."""
        x = self.input_proj(x)
        per = self.depth // self.n_adaln
        for i, blk in enumerate(self.blocks):
            j = 3 * (i // per)
            x = blk(x, mods[j], mods[j + 1], mods[j + 2])
        return self.final_proj(torch.addcmul(mods[-1], self.final_norm(x), mods[-2]))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None, h: torch.Tensor | None,
                mods: tuple[torch.Tensor, ...] | None = None, r: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity for x [N, d] at times t [N] under conditions h [N, cond_dim]. mods: the precomputed
        `modulations` of (t, h) as K tensors (the sampler's per-step call; t and h are then unused); r: see
        time_features."""
        if mods is None:
            mods = self.modulations(self.time_features(t, r), self.cond_embed(h)).unbind(-2)
        return self.trunk(x, mods)

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

    def compile(self, *args, **kwargs) -> None:
        """torch.compile the network in place (what `spheregen sample --compile` does); on CUDA the default
        mode is "reduce-overhead", which replays each solver step as a CUDA graph (untested here: no GPU)."""
        on_cuda = any(p.is_cuda for p in self.parameters())
        if on_cuda and not args and "mode" not in kwargs and "options" not in kwargs:
            kwargs["mode"] = "reduce-overhead"
        super().compile(*args, **kwargs)

    @contextmanager
    def fixed_weights(self) -> Iterator[None]:
        """Inside, the weights stay as they are (one `generate` call): each token's ModulationTable reuses the
        time features and the packed engine made for the first token instead of making them again."""
        self.__dict__["_memo"] = {}
        try:
            yield
        finally:
            self.__dict__.pop("_memo", None)

    def memo(self, key: tuple, make: Callable[[], object]) -> object:
        """make() once per key inside `fixed_weights`; at every call outside it."""
        memo = self.__dict__.get("_memo")
        if memo is None:
            return make()
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def noise_draws(self, sampler: str, steps: int) -> int:
        """Standard-normal vectors per token that `sample` consumes with this sampler and step count."""
        return noise_draws(sampler, steps)

    def eval_times(self, sampler: str, steps: int) -> list[tuple[float, float]]:
        """(t, r) of every velocity evaluation of `solve`: r = t, the instantaneous velocity."""
        return [(t, t) for t in solver_times(sampler, steps)]

    def sample(self, h: torch.Tensor, noise: torch.Tensor, scale: float | None, sampler: str = "euler_maruyama",
               steps: int = 100, temperature: float = 1.0) -> torch.Tensor:
        """One token per row from head conditions h: the flow solved from noise (see `solve`).

        scale None: h [R, C], noise [R, draws, d] -> [R, d], every row on its own.
        scale s: h = [h_cond; h_null] [2B, C] sharing noise [B, draws, d]; guided velocity -> [B, d].
        Projection onto the sphere is the caller's (SphereAR.solve_token), after the solve and after CFG.
        """
        table = ModulationTable(self, h, self.eval_times(sampler, steps), guided=scale is not None)
        return table.solve(scale, noise, sampler, steps, temperature)


class ModulationTable:
    """One token's AdaLN outputs at every evaluation time of its solver, made ahead of the solver in chunks
    of at most TABLE_BYTES (one matrix product per chunk instead of three small ones per step)."""

    def __init__(self, head: FlowHead, h: torch.Tensor, times: list[tuple[float, float]], guided: bool,
                 guidance: float | None = None):
        uniq = sorted(set(times))  # the solvers' times never decrease, so chunks are used in order
        self.index = {t: i for i, (t, _) in enumerate(uniq)}

        def time_features() -> torch.Tensor:
            t, r = torch.tensor(uniq, dtype=torch.float32, device=h.device).unbind(-1)
            w = None if guidance is None else torch.full_like(t, guidance)  # a CFG scale as the head's input
            return head.time_features(t, r, w)

        self.head, self.c_emb = head, head.cond_embed(h)  # [R, C]
        self.t_emb = head.memo(("time", tuple(uniq), guidance, h.device), time_features)  # [E, C]
        self.rows = (2, len(h) // 2) if guided else (len(h),)  # guided: [h_cond; h_null] -> [2, B]
        self.chunk = max(1, TABLE_BYTES // (len(h) * head.scale_one.numel() * 4))
        self.start, self.block, self.packed = 0, None, None  # packed: the engine, once `engine` found one

    def at(self, t: float) -> tuple[torch.Tensor, ...]:
        """The K modulations [*rows, C] of the evaluation at time t (contiguous)."""
        return self.from_step(self.index[t])[0].unbind(0)

    def from_step(self, i: int) -> torch.Tensor:
        """The modulations [e, K, *rows, C] of evaluation i (in time order) and those after it in its chunk."""
        if self.block is None or not self.start <= i < self.start + len(self.block):
            self.start = i
            c = self.c_emb.view(*self.rows, -1)
            t_emb = self.t_emb[i:i + self.chunk].view(-1, *[1] * len(self.rows), self.t_emb.shape[-1])
            if self.packed is not None:
                self.block = self.packed.modulations(F.silu(t_emb + c))
            else:  # [e, *rows, K, C] -> [e, K, *rows, C]: each step's K slices contiguous
                self.block = self.head.modulations(t_emb, c).movedim(-2, 1).contiguous()
        return self.block[i - self.start:]

    def engine(self) -> PackedTrunk | None:
        """The head's packed state path for this device and autocast dtype (None: use the module); with one,
        the engine also makes the modulation blocks (fp32, its elementwise dtype)."""
        device = self.c_emb.device.type
        amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        dtype, rows = amp or self.head.input_proj.weight.dtype, math.prod(self.rows)
        self.packed = self.head.memo(("engine", dtype, rows), lambda: packed_trunk(self.head, dtype, rows))
        return self.packed

    def velocity(self, scale: float | None) -> VelocityFn:
        """The token's velocity field for `solve`; guided: v = v_null + scale (v_cond - v_null) (fp32). On CPU
        the state path runs on packed weights (models/head_engine.py), in the autocast dtype when one is on."""
        engine = self.engine()
        if engine is not None:
            return lambda x, t: engine(x, self.from_step(self.index[t])[0], scale)

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            v = self.head(x, None, None, mods=self.at(t))
            return v.float() if scale is None else torch.lerp(v[1].float(), v[0].float(), scale)

        return velocity

    def solve(self, scale: float | None, noise: torch.Tensor, sampler: str, steps: int,
              temperature: float = 1.0) -> torch.Tensor:
        """`solve` on this token's velocity field. With a packed engine and a one-evaluation-per-step solver
        (Euler, Euler-Maruyama) each chunk of steps runs as one scripted loop: the same ops, no Python between."""
        check_solver(sampler, steps)
        coefs, engine = step_coefficients(sampler, steps, temperature), self.engine()
        if engine is None or coefs is None or len(self.index) != len(coefs):
            return solve(self.velocity(scale), noise, sampler, steps, temperature)
        x, i = temperature * noise[:, 0].float(), 0
        while i < len(coefs):
            block = self.from_step(i)
            n = len(block)
            x = engine.steps(x, block, coefs[i:i + n], noise[:, 1 + i:1 + i + n] if noise.shape[1] > 1 else None,
                             scale)
            i += n
        return x


VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def guided_velocity(head: FlowHead, h: torch.Tensor, scale: float | None = None) -> VelocityFn:
    """The velocity field of one token for the solver, x [N, d] -> v [N, d] (fp32), one full head call per
    evaluation (the reference the sampling engine is tested against; other heads reuse it).

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


def solver_times(sampler: str, steps: int) -> list[float]:
    """The times at which `solve` evaluates the velocity, in order (the same floats it passes)."""
    if sampler == "euler_maruyama":
        dt = (1.0 - EM_LAST_STEP) / steps
        return [i * dt for i in range(steps)] + [1.0 - EM_LAST_STEP]
    dt = 1.0 / steps
    if sampler == "heun":  # predictor at t_i, corrector at t_i+1, except on the last step
        return [t for i in range(steps) for t in ((i * dt, (i + 1) * dt) if i + 1 < steps else (i * dt,))]
    return [i * dt for i in range(steps)]


def solve(velocity: VelocityFn, noise: torch.Tensor, sampler: str = "euler", steps: int = 50,
          temperature: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 0 to 1 starting at x0 = temperature * noise[:, 0]; the state is
    updated in place and each velocity is used up before the next call.

    noise [N, noise_draws(sampler, steps), d]: row k's randomness, so a sample never depends on its batch.
    - euler: x += v(x, t) dt with dt = 1/N (Eq. 9); N evaluations.
    - heun: Euler predictor + trapezoid corrector on each step but the last, which is a plain Euler step
      (EDM, Karras et al. 2022: the corrector there would evaluate v at t = 1); 2N - 1 evaluations.
    - euler_maruyama: over t in [0, 0.96] with dt = 0.96/N, score = (t v - x) / (1 - t) (as x = eps + t v
      gives E[eps | x] = x - t v), x += (v + (1 - t) score) dt + temperature * sqrt(2 (1 - t) dt) xi, then
      one deterministic Euler step of 0.04 with v at t = 0.96; N + 1 evaluations.
    """
    check_solver(sampler, steps)
    x = temperature * noise[:, 0].float()
    coefs = step_coefficients(sampler, steps, temperature)
    if coefs is not None:  # euler, euler_maruyama: one velocity per step
        for i, (t, (a, b, c)) in enumerate(zip(solver_times(sampler, steps), coefs)):
            v = velocity(x, t)
            if a != 1.0:
                x.mul_(a)
            x.add_(v, alpha=b)
            if c != 0.0:
                x.add_(noise[:, 1 + i], alpha=c)
        return x
    dt = 1.0 / steps
    for i in range(steps):  # heun
        v = velocity(x, i * dt)
        if i + 1 < steps:
            y = torch.add(x, v, alpha=dt)
            x.add_(v, alpha=0.5 * dt)  # v is used up before the next call (a CUDA graph may reuse its memory)
            x.add_(velocity(y, (i + 1) * dt), alpha=0.5 * dt)
        else:
            x.add_(v, alpha=dt)
    return x


def check_solver(sampler: str, steps: int) -> None:
    """ValueError for an unknown sampler or fewer than one step."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"the flow solver needs at least 1 step, got {steps}")


def step_coefficients(sampler: str, steps: int, temperature: float = 1.0) -> list[tuple[float, float, float]] | None:
    """(a, b, c) of each step x <- a x + b v(x, t_i) + c xi_i of the one-evaluation-per-step solvers (None: heun).
    euler: (1, 1/N, 0). euler_maruyama: drift v + (1 - t) score = (1 + t) v - x with score = (t v - x) / (1 - t),
    so (1 - dt, (1 + t) dt, temperature sqrt(2 (1 - t) dt)) with dt = 0.96/N, then (1, 0.04, 0)."""
    if sampler == "euler_maruyama":
        dt = (1.0 - EM_LAST_STEP) / steps
        return [(1.0 - dt, (1.0 + i * dt) * dt, temperature * math.sqrt(2 * (1 - i * dt) * dt))
                for i in range(steps)] + [(1.0, EM_LAST_STEP, 0.0)]
    return [(1.0, 1.0 / steps, 0.0)] * steps if sampler == "euler" else None
