"""Training-free editing with a Sphere Encoder (paper Sec. 4, Figs. 6, 8, 9).

- manipulate:  encode/decode an image T times conditioned on a new class, x <- D(f(f(E(x, c)) + r sigma e'), c),
               with r = 1, gamma = 0 and no CFG (Fig. 8).
- crossover:   stitch A and B (left / right halves, top / bottom, B's centre in A, quadrants, a diagonal), then
               harmonise with the same loop at r = 0.25 and the decay r_t = r (1 - k/K)^gamma, gamma = 1 (Fig. 9).
- interpolate: slerp on the sphere between v_A = f(E(A)) and v_B = f(E(B)),
               v(t) = [sin((1 - t) theta) v_A + sin(t theta) v_B] / sin(theta), decoded (optionally refined).
- noise_interpolate (Fig. 6): generate from interpolated input noise e(t) (lerp e_a (1 - t) + e_b t, slerp, or
               bilinear over four corners) with the label embeddings interpolated by the same weights, in T steps.
"""

from __future__ import annotations

import torch

from spheregen.errors import UserError
from spheregen.models.sphere_encoder import SphereEncoder
from spheregen.sphere import spherify


def _trace(model: SphereEncoder, x: torch.Tensor, labels, steps: int, r: float, gamma: float, cfg: float,
           cfg_position: str, seeds: list[int]) -> list[torch.Tensor]:
    """The images after each of `steps` refinement loops (shared noise e', drawn from each sample's seed)."""
    out: list[torch.Tensor] = []
    model.refine(x, labels, steps, r, gamma, cfg, cfg_position, shared_noise=True, seeds=seeds, trace=out)
    return out


@torch.no_grad()
def manipulate(model: SphereEncoder, x: torch.Tensor, labels: torch.Tensor, steps: int = 4, r: float = 1.0,
               gamma: float = 0.0, cfg: float = 1.0, cfg_position: str = "combo", seed: int = 0) -> list[torch.Tensor]:
    """Class manipulation: the images after each of `steps` loops conditioned on `labels` (list of [B, C, H, W])."""
    model.check_labels(labels)
    return _trace(model, x, labels, steps, r, gamma, cfg, cfg_position, [seed + k for k in range(len(x))])

STITCH_MODES = ("left-right", "top-bottom", "center", "quadrants", "diagonal")


def stitch_mask(h: int, w: int, mode: str = "left-right") -> torch.Tensor:
    """[h, w] bool, True where the composite takes A: A's left half, top half, everything but B's centre square
    (half the side), the top-left and bottom-right quadrants, or the part above the anti-diagonal."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks = {"left-right": cols < w // 2, "top-bottom": rows < h // 2,
             "center": ~((abs(2 * rows - h + 1) < h // 2) & (abs(2 * cols - w + 1) < w // 2)),
             "quadrants": (rows < h // 2) == (cols < w // 2), "diagonal": rows * w + cols * h < h * w - (h + w) // 2}
    if mode not in masks:
        raise UserError(f"stitch mode must be one of {', '.join(STITCH_MODES)}, got {mode!r}")
    return masks[mode]


def stitch(xa: torch.Tensor, xb: torch.Tensor, mode: str = "left-right") -> torch.Tensor:
    """The composite of A and B (default: left half of A next to the right half of B)."""
    return torch.where(stitch_mask(xa.shape[-2], xa.shape[-1], mode).to(xa.device), xa, xb)


@torch.no_grad()
def crossover(model: SphereEncoder, xa: torch.Tensor, xb: torch.Tensor, steps: int = 10, r: float = 0.25,
              gamma: float = 1.0, labels: torch.Tensor | None = None, seed: int = 0,
              mode: str = "left-right") -> list[torch.Tensor]:
    """Image crossover: stitch(A, B, mode), then the images after each of `steps` harmonising loops (no CFG)."""
    model.check_labels(labels)
    x = stitch(xa, xb, mode)
    return [x] + _trace(model, x, labels, steps, r, gamma, 1.0, "combo", [seed + k for k in range(len(x))])


def slerp(va: torch.Tensor, vb: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Great-circle interpolation between two latents of equal norm, one output per t in ts: [len(ts), ...]."""
    a, b = va.flatten().double(), vb.flatten().double()
    cos = (a @ b / (a.norm() * b.norm())).clamp(-1, 1)
    theta = torch.arccos(cos)
    t = ts.double().view(-1, 1)
    if theta < 1e-6:
        out = (1 - t) * a + t * b
    else:
        out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return spherify(out.to(va.dtype).view(len(ts), *va.shape))  # exact radius sqrt(L) despite rounding


@torch.no_grad()
def interpolate(model: SphereEncoder, xa: torch.Tensor, xb: torch.Tensor, n: int = 8,
                labels: torch.Tensor | None = None, steps: int = 1, r: float = 0.25, gamma: float = 1.0,
                seed: int = 0) -> torch.Tensor:
    """n images decoded along the slerp from f(E(A)) to f(E(B)) (t = 0 ... 1), refined by steps - 1 loops."""
    model.check_labels(labels)
    va, vb = model.encode_sphere(xa, labels), model.encode_sphere(xb, labels)
    v = slerp(va[0], vb[0], torch.linspace(0, 1, n))
    lab = labels.expand(n) if labels is not None else None
    x = model.decode(v, lab)
    if steps > 1:
        x = _trace(model, x, lab, steps - 1, r, gamma, 1.0, "combo", [seed] * n)[-1]
    return x.clamp(-1, 1)

# -- noise interpolation (Fig. 6) ---------------------------------------------------------------------
NOISE_MODES = ("lerp", "slerp", "bilinear")


def interp_weights(mode: str, n: int) -> torch.Tensor:
    """Corner weights per frame: lerp / slerp [n, 2] = (1 - t, t), t = linspace(0, 1, n); bilinear [n * n, 4]
    = ((1 - u)(1 - v), u (1 - v), (1 - u) v, u v) row-major (v down the rows, u along them)."""
    t = torch.linspace(0, 1, n)
    if mode in ("lerp", "slerp"):
        return torch.stack([1 - t, t], dim=1)
    if mode != "bilinear":
        raise UserError(f"noise interpolation mode must be one of {', '.join(NOISE_MODES)}, got {mode!r}")
    v, u = (g.flatten() for g in torch.meshgrid(t, t, indexing="ij"))
    return torch.stack([(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v], dim=1)


def interp_noise(ends: torch.Tensor, weights: torch.Tensor, mode: str = "lerp") -> torch.Tensor:
    """Input noise per frame [F, R, N, d] from corners ends [R, K, N, d]: sum_k w_k e_k (lerp: a (1 - t) + b t,
    bilinear), or slerp (sin((1 - t) th) a + sin(t th) b) / sin(th), th = angle(a, b) per row."""
    if mode != "slerp":
        out = torch.zeros(len(weights), *ends[:, 0].shape, dtype=ends.dtype, device=ends.device)
        for k in range(ends.shape[1]):
            out = out + ends[:, k].unsqueeze(0) * weights[:, k].view(-1, 1, 1, 1).to(ends)
        return out
    a, b = ends[:, 0].double(), ends[:, 1].double()
    cos = ((a * b).flatten(1).sum(1) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))).clamp(-1, 1)
    theta = torch.arccos(cos).view(1, -1, 1, 1).clamp_min(1e-6)
    t = weights[:, 1].double().view(-1, 1, 1, 1)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return out.to(ends.dtype)


@torch.no_grad()
def noise_interpolate(model: SphereEncoder, ends: torch.Tensor, classes: torch.Tensor | None, weights: torch.Tensor,
                      refine_noise: torch.Tensor | None = None, mode: str = "lerp", steps: int = 4, cfg: float = 1.0,
                      cfg_position: str = "combo", r: float = 1.0, gamma: float = 0.0) -> list[torch.Tensor]:
    """Fig. 6: frame f of row r is Algorithm 1 from e_f = interp(ends[r]), with the label embeddings mixed by the
    same weights (soft labels sum_k w_k onehot(classes[r, k]); None: the null label). refine_noise e': [R, N, d]
    shared by every frame, or [F, R, N, d] per frame. Returns per step (1-step first) images [F, R, C, H, W]."""
    if steps > 1 and refine_noise is None:
        raise UserError("noise_interpolate needs refine_noise e' for more than one step")
    noise = interp_noise(ends, weights, mode)
    device = next(model.parameters()).device
    per_step: list[list[torch.Tensor]] = [[] for _ in range(steps)]
    for f in range(len(weights)):
        labels = None
        if classes is not None:
            labels = model.soft_labels(weights[f].expand(len(classes), -1).to(device), classes.to(device))
        e_ref = refine_noise[f] if refine_noise is not None and refine_noise.dim() == 4 else refine_noise
        draws = iter([noise[f].to(device)] + ([e_ref.to(device)] if e_ref is not None else []))
        trace: list[torch.Tensor] = []
        model.generate(labels, steps, cfg, cfg_position, gamma=gamma, r=r, n=len(ends), noise=draws.__next__,
                       trace=trace)
        for k, x in enumerate(trace):
            per_step[k].append(x)
    return [torch.stack(frames) for frames in per_step]
