"""Hyperspherical geometry: the one place where "every token lies on the sphere" is written.

- `project(z, R)`    N_R(z) = R z / max(||z||_2, eps) per token (SphereAR, Sec. 3.2 and App. A).
- `spherify(z)`      global RMS normalisation, ||f(z)|| = sqrt(L) per sample (Sphere Encoder, Eq. 1).
- `tangent`, `exp_map`, `log_map`, `geodesic` / `slerp`, `transport`: the Riemannian geometry of S^{d-1}(R)
  (tangent projection, exponential and log maps, constant-speed great circles, parallel transport) for the
  Riemannian flow head (models/riemannian_head.py).
- `PowerSpherical`   the Power Spherical distribution (De Cao & Aziz, 2020), the S-VAE posterior.
- `HypersphericalUniform` the uniform prior on S^{d-1}.

Where the package puts tokens on the sphere (each site carries a one-line comment):
- the S-VAE posterior (models/tokenizer.py): mu = N_1(.) of the encoder output, a sample z = R u with
  u ~ PowerSpherical(mu, kappa) (spherical), or z = N_R(mean + std eps) and its mode N_R(mean) (gaussian_norm);
- the AR inputs (models/ar.py, `_latent_tokens`): N_R(z) before `proj_in` (off for the no-projection ablation);
- the AR outputs, after the solve and after CFG (models/ar.py, `solve_token`), for the next input and the decoder;
- the decoder (models/tokenizer.py, `decode`): renormalises the tokenizer's own on-sphere latents, and takes the
  AR's choice (`project=`) for generated tokens, so the no-projection ablation reaches it off the sphere.
The Sphere Encoder's sphere is global (spherify): its encoder output and every noisy latent (Eq. 1, 4-6).

Numerics: all distribution math runs in fp32 (fp64 for Gamma draws, lgamma and digamma) whatever the
input dtype, and results come back in the input dtype, so bf16 / fp16 inputs under autocast work.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, constraints
from torch.distributions.kl import register_kl

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def project(z: torch.Tensor, radius: float, eps: float = 1e-7) -> torch.Tensor:
    """N_R(z) = R z / max(||z||_2, eps) over the last dimension (SphereAR App. A, footnote 3)."""
    zf = z.to(_compute_dtype(z.dtype))
    norm = zf.norm(dim=-1, keepdim=True).clamp_min(eps)
    return (radius * zf / norm).to(z.dtype)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1, keepdim=True)


def tangent(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """P_x v = v - (<v, x> / <x, x>) x: the orthogonal projection of v onto T_x S = {u : <u, x> = 0}."""
    cdt = _compute_dtype(v.dtype)
    xf, vf = x.to(cdt), v.to(cdt)
    return (vf - _dot(vf, xf) / _dot(xf, xf).clamp_min(1e-30) * xf).to(v.dtype)


def exp_map(x: torch.Tensor, v: torch.Tensor, radius: float, eps: float = 1e-7) -> torch.Tensor:
    """exp_x(v) = cos(|v|/R) x + R sin(|v|/R) v/|v| on S^{d-1}(R), for x on the sphere and v in T_x
    (Chen & Lipman 2023, Sec. 3): the point reached after arc length |v| along the great circle leaving x in
    direction v. At |v| -> 0 the factor R sin(|v|/R)/|v| -> 1 (used below eps). The result is renormalised to
    radius R, which only removes floating-point rounding (it is on the sphere in exact arithmetic)."""
    cdt = _compute_dtype(x.dtype)
    xf, vf = x.to(cdt), v.to(cdt)
    n = vf.norm(dim=-1, keepdim=True)
    a = n / radius  # the angle swept
    small = n < eps
    factor = torch.where(small, torch.ones_like(n), radius * torch.sin(a) / torch.where(small, 1.0, n))
    return project(torch.cos(a) * xf + factor * vf, radius).to(x.dtype)


def _antipodal_direction(xf: torch.Tensor) -> torch.Tensor:
    """A unit tangent at x, deterministic: the coordinate axis least aligned with x, projected onto T_x."""
    axis = torch.zeros_like(xf).scatter_(-1, xf.abs().argmin(-1, keepdim=True), 1.0)
    return project(tangent(xf, axis), 1.0)


def log_map(x: torch.Tensor, y: torch.Tensor, radius: float, eps: float = 1e-6) -> torch.Tensor:
    """log_x(y) = R theta w/|w| for x, y on S^{d-1}(R): with unit x' = x/R, y' = y/R, w = y' - <x', y'> x'
    (|w| = sin theta) and the angle theta = atan2(|w|, <x', y'>) (accurate at every angle, unlike arccos near
    0 and pi). The tangent at x of length R theta (the geodesic distance) pointing along the great circle to y;
    the inverse of exp_map for theta < pi.
    Near-identical points (|w| < eps R): log = w (theta / sin theta -> 1). Antipodal points (theta -> pi, no
    unique geodesic): length pi R along a fixed tangent direction (`_antipodal_direction`)."""
    cdt = _compute_dtype(x.dtype)
    xf, yf = x.to(cdt), y.to(cdt)
    xu, yu = xf / radius, yf / radius  # unit vectors
    cos = _dot(xu, yu)
    w = yu - cos * xu  # the part of y tangent at x, |w| = sin theta
    sin = w.norm(dim=-1, keepdim=True)
    theta = torch.atan2(sin, cos)
    small = sin < eps
    direction = torch.where(small, _antipodal_direction(xf), w / torch.where(small, 1.0, sin))
    out = torch.where(small & (cos > 0), w, theta * direction)
    return (radius * out).to(x.dtype)


def geodesic(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float,
             radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The constant-speed geodesic from x0 (t = 0) to x1 (t = 1) on S^{d-1}(R) and its velocity:
    x_t = exp_{x0}(t log_{x0}(x1)),  dx_t/dt = R theta (-sin(t theta) x0/R + cos(t theta) u)
    with u = log_{x0}(x1)/|log_{x0}(x1)| and theta the angle between x0 and x1 (Chen & Lipman 2023, Eq. 14 with
    the geodesic distance as premetric). For 0 < theta < pi, x_t equals slerp: (sin((1-t) theta) x0 +
    sin(t theta) x1) / sin theta. t: a float or a tensor broadcasting against x0[..., :1]."""
    cdt = _compute_dtype(x0.dtype)
    x0f = x0.to(cdt)
    t = torch.as_tensor(t, dtype=cdt, device=x0.device)
    t = t.unsqueeze(-1) if t.dim() == x0.dim() - 1 else t
    v0 = log_map(x0f, x1.to(cdt), radius)
    speed = v0.norm(dim=-1, keepdim=True)  # R theta
    a = t * speed / radius  # the angle travelled by time t
    u = v0 / speed.clamp_min(1e-30)
    xt = project(torch.cos(a) * x0f + radius * torch.sin(a) * u, radius)
    vt = speed * (torch.cos(a) * u - torch.sin(a) * x0f / radius)
    return xt.to(x0.dtype), vt.to(x0.dtype)


def transport(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, radius: float) -> torch.Tensor:
    """Parallel transport of v in T_x to T_y along the great circle from x to y (theta < pi): with
    u = log_x(y)/|log_x(y)| and theta = |log_x(y)|/R, the part of v along u turns with the circle,
    Gamma v = v + <u, v> ((cos theta - 1) u - sin theta x/R); the rest of v is unchanged. An isometry T_x -> T_y."""
    cdt = _compute_dtype(v.dtype)
    xf, vf = x.to(cdt), v.to(cdt)
    lg = log_map(xf, y.to(cdt), radius)
    dist = lg.norm(dim=-1, keepdim=True)
    u = lg / dist.clamp_min(1e-30)
    theta = dist / radius
    return (vf + _dot(u, vf) * ((torch.cos(theta) - 1) * u - torch.sin(theta) * xf / radius)).to(v.dtype)


def slerp(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float, radius: float) -> torch.Tensor:
    """Geodesic interpolation on S^{d-1}(R): the point at fraction t of the way from x0 to x1 (see `geodesic`)."""
    return geodesic(x0, x1, t, radius)[0]


def spherify(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """f(z) = z / sqrt(mean(z^2) + eps), the mean over all non-batch dims (Sphere Encoder Eq. 1).

    For z with L = prod(z.shape[1:]) elements per sample, ||f(z)||_2 = sqrt(L) (up to eps).
    """
    zf = z.to(_compute_dtype(z.dtype))
    dims = tuple(range(1, z.dim()))
    return (zf * torch.rsqrt(zf.pow(2).mean(dim=dims, keepdim=True) + eps)).to(z.dtype)


def log_sphere_area(dim: int) -> float:
    """log |S^{dim-1}| = log 2 + (dim/2) log pi - lgamma(dim/2), the surface area of the unit sphere in R^dim."""
    return math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


class HypersphericalUniform(Distribution):
    """Uniform distribution on the unit sphere S^{dim-1} in R^dim (dim is the ambient dimension)."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, dim: int, batch_shape: torch.Size = torch.Size(), device=None,
                 dtype: torch.dtype = torch.float32, validate_args=None):
        if dim < 2:
            raise ValueError(f"HypersphericalUniform needs dim >= 2, got {dim}")
        self.dim, self.device, self.dtype = dim, device, dtype
        super().__init__(torch.Size(batch_shape), torch.Size([dim]), validate_args=validate_args)

    @property
    def support(self):
        return constraints.real_vector

    def sample(self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None):
        shape = self._extended_shape(torch.Size(sample_shape))
        x = torch.randn(shape, device=self.device, dtype=torch.float32, generator=generator)
        return project(x, 1.0).to(self.dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return torch.full(value.shape[:-1], -log_sphere_area(self.dim), dtype=value.dtype, device=value.device)

    def entropy(self) -> torch.Tensor:
        return torch.full(self.batch_shape, log_sphere_area(self.dim), dtype=self.dtype, device=self.device)


class PowerSpherical(Distribution):
    """Power Spherical PS(mu, kappa) on S^{d-1}:  p(u) = C(kappa, d) (1 + mu^T u)^kappa.

    With alpha = (d-1)/2 + kappa and beta = (d-1)/2 (De Cao & Aziz 2020, Eq. 3-4):
      log C = -[(alpha+beta) log 2 + beta log pi + lgamma(alpha) - lgamma(alpha+beta)]
      t = mu^T u ~ 2 Beta(alpha, beta) - 1,   E[u] = (alpha-beta)/(alpha+beta) mu
      H = -[log C + kappa (log 2 + digamma(alpha) - digamma(alpha+beta))]
      KL(PS || U(S^{d-1})) = -H + log |S^{d-1}|
    `loc` (unit vectors) has shape [..., d]; `scale` (kappa >= 0) must have shape loc.shape[:-1].
    """

    arg_constraints = {"loc": constraints.real_vector, "scale": constraints.nonnegative}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        if loc.dim() < 1 or loc.shape[-1] < 2:
            raise ValueError(f"PowerSpherical loc must have a last dimension >= 2, got shape {tuple(loc.shape)}")
        if scale.shape != loc.shape[:-1]:
            raise ValueError(
                f"PowerSpherical scale must have shape loc.shape[:-1] = {tuple(loc.shape[:-1])}, "
                f"got {tuple(scale.shape)} (squeeze a trailing 1?)"
            )
        self.loc, self.scale = loc, scale
        self.dim = loc.shape[-1]
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=validate_args)

    # -- parameters in compute precision ----------------------------------------------------------
    def _ab(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        beta = torch.full_like(self.scale, (self.dim - 1) / 2, dtype=dtype)
        return self.scale.to(dtype) + beta, beta

    @property
    def mean(self) -> torch.Tensor:
        alpha, beta = self._ab(torch.float32)
        m = ((alpha - beta) / (alpha + beta)).unsqueeze(-1) * self.loc.float()
        return m.to(self.loc.dtype)

    def _log_normalizer64(self) -> torch.Tensor:
        alpha, beta = self._ab()
        return -((alpha + beta) * math.log(2) + beta * math.log(math.pi)
                 + torch.lgamma(alpha) - torch.lgamma(alpha + beta))

    def _entropy64(self) -> torch.Tensor:
        alpha, beta = self._ab()
        kappa = self.scale.to(torch.float64)
        return -(self._log_normalizer64() + kappa * (math.log(2) + torch.digamma(alpha) - torch.digamma(alpha + beta)))

    def log_normalizer(self) -> torch.Tensor:
        return self._log_normalizer64().to(self.scale.dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        cdt = _compute_dtype(value.dtype)
        dot = (self.loc.to(cdt) * value.to(cdt)).sum(-1)
        out = self._log_normalizer64().to(cdt) + self.scale.to(cdt) * torch.log1p(dot)
        return out.to(value.dtype)

    def entropy(self) -> torch.Tensor:
        return self._entropy64().to(self.scale.dtype)

    def kl_to_uniform(self) -> torch.Tensor:
        """KL(PS(mu, kappa) || U(S^{d-1})) = log|S^{d-1}| - H(PS), >= 0, zero at kappa = 0."""
        return (log_sphere_area(self.dim) - self._entropy64()).to(self.scale.dtype)

    # -- sampling -----------------------------------------------------------------------------------
    def rsample(self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None):
        """Reparameterised draw: t = 2 Beta(alpha, beta) - 1 along e1, a uniform tangent direction v,
        y = [t, sqrt(1 - t^2) v], then an orthogonal reflection taking e1 to mu.

        Beta(a, b) = X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b) (fp64, implicit reparameterisation),
        so t = (X - Y)/(X + Y) and sqrt(1 - t^2) = 2 sqrt(XY)/(X + Y) without cancellation at large kappa.
        The reflection is chosen per sample to stay well conditioned: for mu_1 >= 0 use
        u -> -(I - 2 w w^T) y with w = (e1 + mu)/||e1 + mu||, else (I - 2 w w^T) y with w = (e1 - mu)/||.||.
        Both map e1 to mu, and the law of v is rotation invariant, so either gives PS(mu, kappa).
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        out_dtype, cdt = self.loc.dtype, _compute_dtype(self.loc.dtype)
        alpha, beta = self._ab()
        alpha, beta = alpha.expand(shape[:-1]), beta.expand(shape[:-1])
        x = torch._standard_gamma(alpha, generator=generator)  # differentiable in alpha (implicit grad)
        y = torch._standard_gamma(beta, generator=generator)
        s = x + y
        t = ((x - y) / s).to(cdt).unsqueeze(-1)
        r = (2 * torch.sqrt(x * y) / s).to(cdt).unsqueeze(-1)
        v = torch.randn(shape[:-1] + (self.dim - 1,), device=self.loc.device, dtype=cdt, generator=generator)
        v = project(v, 1.0)
        sample = torch.cat([t, r * v], dim=-1)

        mu = self.loc.to(cdt).expand(shape)
        flip = (mu[..., :1] >= 0).to(cdt)  # 1 -> reflect through e1 + mu and negate
        sign = 1 - 2 * flip  # -1 or +1
        e1 = torch.zeros_like(mu)
        e1[..., 0] = 1
        w = project(e1 - sign * mu, 1.0)  # e1 + mu if flip else e1 - mu
        reflected = sample - 2 * (sample * w).sum(-1, keepdim=True) * w
        return (sign * reflected).to(out_dtype)

    def sample(self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None):
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)


@register_kl(PowerSpherical, HypersphericalUniform)
def _kl_powerspherical_uniform(p: PowerSpherical, q: HypersphericalUniform) -> torch.Tensor:
    if p.dim != q.dim:
        raise ValueError(f"KL between spheres of different dimension: {p.dim} vs {q.dim}")
    return p.kl_to_uniform()
