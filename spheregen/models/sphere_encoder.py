"""The Sphere Encoder (Yue et al. 2026, "Image Generation with a Sphere Encoder").

An encoder E spreads images over the sphere of radius sqrt(L) (f = spherify, Eq. 1); a decoder D maps any point of
it to an image. Training perturbs the latent direction with noise (Sec. 2.2, Eq. 4-6):

    v = f(E(x)),  v_NOISY = f(v + r_N sigma_max e),  v_noisy = f(v + r s sigma_max e),  one shared e ~ N(0, I),
    sigma_max = tan(alpha), r stratified in [0, 1] (r_N: r with large-angle mixing), s stratified in [0, 0.5]

and minimises (Eq. 7-10, images mapped to [0, 1], dist = smooth-L1, perc = the configured perceptual loss)

    w_rd dist(D(v_noisy), x) + w_rp perc(.)                    pixel reconstruction
  + w_cd dist(D(v_NOISY), sg D(v_noisy)) + w_cp perc(.)        pixel consistency
  + w_lc mean(1 - cos(E(D(v_NOISY)), sg E(x)))                 latent consistency.

Generation (Algorithm 1): x = D(f(e)), then T - 1 times x = D(f(f(E(x)) + r_t sigma_max e')), with classifier-free
guidance after E ("latent"), after D ("pixel", clamped to [-1, 1]) or both with sqrt(s) each ("combo"),
e' drawn once and shared across steps (or fresh per step), r_t = (1 - (t - 1)/(T - 1))^gamma (Eq. 13).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spheregen.checkpoint import PretrainedMixin, register_model
from spheregen.config import from_dict
from spheregen.errors import UserError, check_choice, check_class_ids
from spheregen.losses import build_perceptual
from spheregen.models.sphere_encoder_loss import (
    drop_labels,
    noise_levels,
    param_groups,
    stratified_uniform,
    training_loss,
)
from spheregen.models.sphere_encoder_nets import Decoder, Encoder, SphereEncoderConfig, sigma_max
from spheregen.sphere import spherify

CFG_POSITIONS = ("pixel", "latent", "combo")


@dataclass(frozen=True)
class SphereEncoderSampling:
    """How the Sphere Encoder samples (Algorithm 1): `steps` decoder passes (1-6 in the paper), CFG scale and
    position (decoder output "pixel", encoder output "latent", or both with sqrt(s) "combo"), one noise draw
    shared by every refinement step (or fresh ones), and the noise decay r_t = r (1 - (t-1)/(T-1))^gamma (Eq. 13)."""

    steps: int = 4
    cfg: float = 1.0
    cfg_position: str = "combo"
    shared_noise: bool = True
    gamma: float = 0.0
    r: float = 1.0
    progress: bool = False  # accepted for a common sampling interface; generation here takes a few passes

    def __post_init__(self) -> None:
        check_choice("cfg_position", self.cfg_position, CFG_POSITIONS)
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")
        if self.gamma < 0 or self.r < 0:
            raise UserError(f"r and gamma must be >= 0, got r = {self.r}, gamma = {self.gamma}")
__all__ = ["SphereEncoder", "SphereEncoderConfig", "SphereEncoderSampling", "CFG_POSITIONS", "stratified_uniform",
           "recalibrate_bn"]


def noise_source(shape: tuple[int, ...], n: int, device, seeds=None, generator=None) -> Callable[[], torch.Tensor]:
    """A function drawing e ~ N(0, I) [n, *shape]; with seeds, sample k uses its own generator only."""
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != n:
            raise UserError(f"got {len(seeds)} seeds for {n} samples; pass one seed per sample")
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        return lambda: torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
    return lambda: torch.randn((n, *shape), generator=generator, device=device)


def cfg_scales(cfg: float, position: str) -> tuple[float, float]:
    """(latent scale, pixel scale) for a CFG position (combo: sqrt(s) at each, Sec. C.1)."""
    if position not in CFG_POSITIONS:
        raise UserError(f"cfg_position must be one of {', '.join(CFG_POSITIONS)}, got {position!r}")
    if position == "pixel":
        return 1.0, cfg
    if position == "latent":
        return cfg, 1.0
    return math.sqrt(cfg), math.sqrt(cfg)


class _PerceptualHolder:
    """Keeps the frozen perceptual network out of the model's state_dict, parameters and EMA."""

    def __init__(self):
        self.module: nn.Module | None = None
        self.built = False


@register_model("sphere_encoder")
class SphereEncoder(PretrainedMixin, nn.Module):
    config_class = SphereEncoderConfig

    def __init__(self, config: SphereEncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.sigma_max = sigma_max(config)
        self._perc = _PerceptualHolder()

    # -- basic maps ---------------------------------------------------------------------------------
    @property
    def null_label(self) -> int:
        return self.config.num_classes

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.config.n_tokens, self.config.latent_dim)

    def _labels(self, labels: torch.Tensor | None, n: int, device) -> torch.Tensor | None:
        """Class ids [B] (long), or soft labels [B, K + 1] (float: weights of the label-table rows, so the
        embedding is sum_k w_k table_k, e.g. a lerp of two classes' embeddings, Fig. 6)."""
        if self.config.num_classes == 0:
            return None
        if labels is None:
            return torch.full((n,), self.null_label, dtype=torch.long, device=device)
        if labels.is_floating_point():
            return labels.to(device=device)
        return labels.to(device=device, dtype=torch.long)

    def _null_like(self, y: torch.Tensor) -> torch.Tensor:
        """The null label for every sample of y, as ids or as one-hot soft labels."""
        if y.is_floating_point():
            return F.one_hot(torch.full(y.shape[:1], self.null_label, device=y.device), y.shape[1]).to(y.dtype)
        return torch.full_like(y, self.null_label)

    def soft_labels(self, weights: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Soft labels [B, K + 1] = sum_j weights[:, j] onehot(classes[:, j]) (classes may hold the null id)."""
        onehot = F.one_hot(classes.long(), self.num_classes + 1).to(weights.dtype)
        return (weights.unsqueeze(-1) * onehot).sum(1)

    def spherify(self, z: torch.Tensor) -> torch.Tensor:
        """f(z): ||f(z)|| = sqrt(L) per sample (Eq. 1)."""
        return spherify(z, self.config.spherify_eps)

    def noisy_spherify(self, v: torch.Tensor, sigma: torch.Tensor | float, e: torch.Tensor) -> torch.Tensor:
        """f(v + sigma e) (Eq. 4); sigma a float or one value per sample."""
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.view(-1, *([1] * (v.dim() - 1))).to(v.dtype)
        return self.spherify(v + sigma * e)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Raw encoder output z = E(x, y) [B, N, d] (labels None = the null label)."""
        return self.encoder(x, self._labels(labels, len(x), x.device))

    def encode_sphere(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """v = f(E(x, y)) on the sphere of radius sqrt(L), [B, N, d]."""
        return self.spherify(self.encode(x, labels))

    def decode(self, v: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x = D(v, y), images in (-1, 1)."""
        return self.decoder(v, self._labels(labels, len(v), v.device))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """D(f(E(x))) with no noise and the null label (Sec. 2.4)."""
        return self.decode(self.encode_sphere(x))

    # -- training (spheregen.models.sphere_encoder_loss) ----------------------------------------------------
    def _drop(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        return drop_labels(self, labels)

    def noise_levels(self, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_N, r_n) per sample, multiples of sigma_max for v_NOISY and v_noisy (Sec. 2.2-2.3)."""
        return noise_levels(self, n, device)

    def _perceptual(self) -> nn.Module | None:
        if not self._perc.built:
            self._perc.module = build_perceptual(self.config.perceptual, self.config.vgg_weights or None)
            self._perc.built = True
        return self._perc.module

    def training_loss(self, batch, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of Eq. 7-9 on one batch (x in [-1, 1], y); returns (loss, unweighted terms)."""
        return training_loss(self, batch, step)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: encoder at enc_lr_scale x the LR; decay only on >= 2-D weights."""
        return param_groups(self, weight_decay)

    # -- generation ---------------------------------------------------------------------------------
    def _guided(self, net: nn.Module, inp: torch.Tensor, labels: torch.Tensor | None, scale: float) -> torch.Tensor:
        """net(inp, y) or, with scale != 1, lerp(net(inp, null), net(inp, y), scale) in one batch."""
        y = self._labels(labels, len(inp), inp.device)
        if y is None or scale == 1.0:
            return net(inp, y)
        null = self._null_like(y)
        cond, uncond = net(torch.cat([inp, inp]), torch.cat([y, null])).chunk(2)
        return uncond + scale * (cond - uncond)

    def _decode_guided(self, v: torch.Tensor, labels, scale: float) -> torch.Tensor:
        x = self._guided(self.decoder, v, labels, scale)
        return x.clamp(-1, 1) if scale != 1.0 and self.config.num_classes > 0 else x

    @staticmethod
    def noise_schedule(loops: int, r: float = 1.0, gamma: float = 0.0) -> list[float]:
        """r_t for loop k = 1..loops (step t = k + 1 of T = loops + 1): r (1 - k / loops)^gamma (Eq. 13)."""
        return [r * (1 - k / loops) ** gamma for k in range(1, loops + 1)]

    @torch.no_grad()
    def refine(self, x: torch.Tensor, labels: torch.Tensor | None, loops: int, r: float = 1.0, gamma: float = 0.0,
               cfg: float = 1.0, cfg_position: str = "combo", shared_noise: bool = True,
               noise: Callable[[], torch.Tensor] | None = None, seeds=None, generator=None,
               trace: list | None = None) -> torch.Tensor:
        """`loops` encode/decode iterations x <- D(f(f(E(x)) + r_k sigma_max e'), y) (Algorithm 1's loop).

        Also the editing primitive (Sec. 4): start from any image x. Returns images clamped to [-1, 1];
        `trace`, if given, receives the images after every loop."""
        if gamma < 0 or r < 0:
            raise UserError(f"r and gamma must be >= 0, got r = {r}, gamma = {gamma}")
        s_lat, s_pix = cfg_scales(cfg, cfg_position)
        noise = noise or noise_source(self.latent_shape, len(x), x.device, seeds, generator)
        e_shared = None
        for r_k in self.noise_schedule(loops, r, gamma) if loops > 0 else []:
            z = self._guided(self.encoder, x, labels, s_lat)
            if shared_noise:
                e_shared = noise() if e_shared is None else e_shared
                e = e_shared
            else:
                e = noise()
            v = self.noisy_spherify(self.spherify(z), r_k * self.sigma_max, e)
            x = self._decode_guided(v, labels, s_pix)
            if trace is not None:
                trace.append(x.clamp(-1, 1))
        return x.clamp(-1, 1)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor | None, steps: int = 1, cfg: float = 1.0, cfg_position: str = "combo",
                 shared_noise: bool = True, gamma: float = 0.0, r: float = 1.0, seeds=None,
                 generator: torch.Generator | None = None, n: int | None = None,
                 noise: Callable[[], torch.Tensor] | None = None, trace: list | None = None) -> torch.Tensor:
        """Algorithm 1: T = `steps` decoder passes from e ~ N(0, I); images [B, C, H, W] in [-1, 1].

        labels: class ids [B] or soft labels [B, K + 1] (None: the null label / unconditional, then pass n).
        seeds: one int per sample (sample k then depends only on seeds[k]); else `generator` (or the global
        RNG) draws the batch; `noise`, if given, returns every draw instead (first e, then e').
        `trace`, if given, receives the image after every step (the 1-step image first).
        """
        if steps < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        device = next(self.parameters()).device
        B = len(labels) if labels is not None else (n or (len(seeds) if seeds is not None else 1))
        self.check_labels(labels)
        noise = noise or noise_source(self.latent_shape, B, device, seeds, generator)
        _, s_pix = cfg_scales(cfg, cfg_position)
        x = self._decode_guided(self.spherify(noise()), labels, s_pix)
        if trace is not None:
            trace.append(x.clamp(-1, 1))
        return self.refine(x, labels, steps - 1, r, gamma, cfg, cfg_position, shared_noise, noise=noise, trace=trace)

    def check_labels(self, labels) -> None:
        """UserError unless every label is a class id in [0, num_classes) (or a soft label [B, K + 1])."""
        if labels is None:
            return
        labels = torch.as_tensor(labels)
        K = self.config.num_classes
        if K == 0:
            raise UserError("this Sphere Encoder is unconditional; do not pass class ids")
        if labels.is_floating_point():
            if labels.dim() != 2 or labels.shape[1] != K + 1:
                raise UserError(f"soft labels must have shape [B, {K + 1}], got {tuple(labels.shape)}")
            return
        check_class_ids(labels.flatten().tolist(), K)

    @torch.no_grad()
    def generate_images(self, labels: torch.Tensor | None, seeds: list[int],
                        options: SphereEncoderSampling | dict | None = None) -> torch.Tensor:
        """The `spheregen sample` entry point (labels are ignored by an unconditional model). options:
        SphereEncoderSampling, or a dict of its fields (an unknown key is an error)."""
        opts = self.sampling_options(options)
        if self.config.num_classes == 0:
            labels = None
        return self.generate(labels, steps=opts.steps, cfg=opts.cfg, cfg_position=opts.cfg_position,
                             shared_noise=opts.shared_noise, gamma=opts.gamma, r=opts.r, seeds=seeds, n=len(seeds))

    @staticmethod
    def sampling_options(options: SphereEncoderSampling | dict | None = None) -> SphereEncoderSampling:
        """SphereEncoderSampling from itself, a dict of its fields, or None (the defaults)."""
        if isinstance(options, SphereEncoderSampling):
            return options
        return from_dict(SphereEncoderSampling, dict(options or {}), "")


# -- BatchNorm recalibration (App. C.4) -------------------------------------------------------------------
@torch.no_grad()
def recalibrate_bn(model: SphereEncoder, images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                   n: int = 500, batch_size: int = 50, steps: int = 4, cfg: float = 1.0,
                   cfg_position: str = "combo", seed: int = 0) -> int:
    """Re-estimate the latent BN statistics: running mean / var = plain averages over the calibration batches.

    With `images` [M, C, H, W] in [-1, 1] (and their labels): encode them. Without: sample n images with
    Algorithm 1 (`steps`, `cfg`; classes cycled, seeds seed + k) and average over every encoder pass inside.
    Returns the number of batches averaged. The model is left in eval mode.
    """
    bn = model.encoder.bn
    if bn is None:
        raise UserError("this Sphere Encoder has no latent BatchNorm (model.latent_bn = false); nothing to "
                        "recalibrate")
    device = next(model.parameters()).device
    model.eval()
    bn.reset_running_stats()
    momentum, bn.momentum = bn.momentum, None  # None: cumulative average over all batches
    bn.train()
    try:
        if images is not None:
            for i in range(0, len(images), batch_size):
                lab = labels[i:i + batch_size].to(device) if labels is not None else None
                model.encode(images[i:i + batch_size].to(device), lab)
        else:
            K = model.config.num_classes
            for i in range(0, n, batch_size):
                k = torch.arange(i, min(i + batch_size, n))
                lab = (k % K).to(device) if K else None
                model.generate(lab, steps=steps, cfg=cfg, cfg_position=cfg_position,
                               seeds=[seed + int(j) for j in k], n=len(k))
    finally:
        bn.momentum = momentum
        model.eval()
    return int(bn.num_batches_tracked)
