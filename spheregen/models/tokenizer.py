"""The SphereAR tokenizer (S-VAE): hybrid CNN + ViT encoder/decoder with a per-token latent posterior.

Encoder (SphereAR Sec. 3.3, App. D): conv3x3 stem, `len(channels) - 1` residual stride-2 stages, then ViT
blocks (RMSNorm, SwiGLU, 2D RoPE, register tokens at RoPE position (0, 0)), RMSNorm, Linear, and a linear
head to the posterior parameters of every token. Decoder: Linear(d, dim), conv3x3, ViT blocks, and residual
up-sampling stages mirroring the encoder (each with an extra residual block), GN-SiLU-conv3x3 to pixels.

Posteriors (`model.posterior`; the paper's ablation arms, Sec. 4.3):
  spherical      u ~ PowerSpherical(mu, kappa), kappa = softplus(.) + 1, z = R u, KL(q || U(S^{d-1})) (Eq. 3-6)
  gaussian       z = mean + std eps, KL(q || N(0, I)) (beta-VAE)
  sigma          z = mean + sigma eps with one fixed, non-learned sigma = C_sigma |n|, n ~ N(0, 1), per image
                 (LatentLM's sigma-VAE); the regulariser is the mean-dependent part of the Gaussian KL, mean^2 / 2
  gaussian_norm  the gaussian posterior, with z projected to radius R before the decoder (Sec. 3.1, App. B)
Every KL is the mean over all elements (batch, tokens and, for Gaussians, channels; paper footnote 2).
R = sqrt(d). Losses: L1/L2 reconstruction + kl_weight KL + perceptual + hinge PatchGAN after disc_start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spheregen.checkpoint import PretrainedMixin, register_model
from spheregen.errors import UserError
from spheregen.layers import Block, RMSNorm, grid_positions, rope_angles
from spheregen.losses import HingeGAN, build_perceptual
from spheregen.sphere import PowerSpherical, project
from spheregen.sphere import project as project_to_sphere

POSTERIORS = ("spherical", "gaussian", "sigma", "gaussian_norm")


@dataclass
class TokenizerConfig:
    image_size: int = 256
    in_channels: int = 3
    channels: tuple[int, ...] = (64, 64, 128, 256, 512)  # stem width, then one stride-2 stage per entry after it
    dim: int = 512  # ViT width
    enc_depth: int = 6
    dec_depth: int = 12
    n_heads: int = 8
    mlp_hidden: int = 1536
    n_registers: int = 4
    rope_theta: float = 10000.0
    latent_dim: int = 16
    posterior: str = "spherical"
    kl_weight: float = 0.004
    c_sigma: float = 0.2  # sigma posterior: sigma = c_sigma |N(0, 1)| per image
    kappa_init: float = 0.0  # spherical: > 0 starts every kappa near this value (bias init); 0 = PyTorch default
    recon_loss: str = "l1"  # "l1" or "l2"
    perceptual: str = "lpips"  # "lpips" | "ssim" | "none"
    perceptual_weight: float = 1.0
    vgg_weights: str = ""  # torchvision vgg16-*.pth; "" = none (the perceptual term is then dropped, loudly)
    disc_weight: float = 0.5  # 0 disables the discriminator entirely
    disc_start: int = 20000
    disc_ndf: int = 64
    disc_layers: int = 3
    decoder_conv_bias: bool = True  # biases on the decoder's stem and output convs (the authors' VAE has none)


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, max(1, c // 4)), c, eps=1e-6)


class ResDown(nn.Module):
    """GN-SiLU-conv3x3/s2-GN-SiLU-conv3x3, plus a conv2x2/s2 shortcut (no biases)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.main = nn.Sequential(_gn(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, 2, 1, bias=False),
                                  _gn(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False))
        self.skip = nn.Conv2d(cin, cout, 2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.skip(x)


class ResUp(nn.Module):
    """GN-SiLU-convT4x4/s2-GN-SiLU-conv3x3 plus a convT2x2/s2 shortcut, then a residual GN-SiLU-conv block pair."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.main = nn.Sequential(_gn(cin), nn.SiLU(), nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
                                  _gn(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False))
        self.skip = nn.ConvTranspose2d(cin, cout, 2, 2, bias=False)
        self.block2 = nn.Sequential(_gn(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                    _gn(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.main(x) + self.skip(x)
        return x + self.block2(x)


class ViT(nn.Module):
    """Register tokens + non-causal Blocks with 2D RoPE on an h x w token grid (registers at (0, 0))."""

    def __init__(self, cfg: TokenizerConfig, depth: int):
        super().__init__()
        self.head_dim, self.theta = cfg.dim // cfg.n_heads, cfg.rope_theta
        self.registers = nn.Parameter(torch.zeros(cfg.n_registers, cfg.dim)) if cfg.n_registers else None
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.n_heads, cfg.mlp_hidden) for _ in range(depth))

    def rope_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """RoPE angles [n_registers + h*w, head_dim/2]: registers at (0, 0), patch centres at (col, row) + 1.5."""
        n_reg = 0 if self.registers is None else self.registers.shape[0]
        pos = torch.cat([torch.zeros(n_reg, 2), grid_positions(*grid, offset=1.5)])
        return rope_angles(pos, self.head_dim, self.theta)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n_reg = 0 if self.registers is None else self.registers.shape[0]
        rope = self.rope_table(grid).to(x.device)
        if n_reg:
            x = torch.cat([self.registers.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x, rope)
        return x[:, n_reg:]


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]


def _image(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return x.transpose(1, 2).unflatten(2, grid)  # [B, h*w, C] -> [B, C, h, w]


# -- posteriors ------------------------------------------------------------------------------------
def sample_posterior(posterior: str, params: dict[str, torch.Tensor], radius: float, c_sigma: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One reparameterised draw z [B, T, d] from the posterior parameters (torch's global RNG by default)."""
    if posterior == "spherical":
        # on the sphere by construction: a unit sample u ~ PowerSpherical(mu, kappa), scaled to radius R (Eq. 3)
        return radius * PowerSpherical(params["mu"], params["kappa"]).rsample(generator=generator)
    mean = params["mean"]
    eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
    if posterior in ("gaussian", "gaussian_norm"):
        z = mean + params["std"] * eps
        # gaussian_norm: the Gaussian sample projected to radius R (the N-x arm, paper Sec. 3.1, App. B)
        return project(z, radius) if posterior == "gaussian_norm" else z
    if posterior == "sigma":
        n = torch.randn(mean.shape[0], 1, 1, device=mean.device, dtype=mean.dtype, generator=generator)
        return mean + c_sigma * n.abs() * eps
    raise UserError(f"unknown posterior {posterior!r}; use one of {', '.join(POSTERIORS)}")


def posterior_mode(posterior: str, params: dict[str, torch.Tensor], radius: float) -> torch.Tensor:
    """The deterministic latent: R mu (spherical), mean (gaussian, sigma), N_R(mean) (gaussian_norm)."""
    if posterior == "spherical":
        return radius * params["mu"]
    # gaussian_norm's mode: the mean projected to radius R
    return project(params["mean"], radius) if posterior == "gaussian_norm" else params["mean"]


def kl_term(posterior: str, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over all elements of KL(q || prior): spherical -> uniform on S^{d-1}; Gaussians -> N(0, I)
    = (mean^2 + std^2 - 1 - log std^2) / 2; sigma -> mean^2 / 2 (the only part that depends on the encoder)."""
    if posterior == "spherical":
        return PowerSpherical(params["mu"], params["kappa"]).kl_to_uniform().float().mean()
    mean = params["mean"].float()
    if posterior == "sigma":
        return 0.5 * mean.pow(2).mean()
    std = params["std"].float()
    return 0.5 * (mean.pow(2) + std.pow(2) - 1 - 2 * std.log()).mean()


@register_model("tokenizer")
class Tokenizer(PretrainedMixin, nn.Module):
    """S-VAE. encode(x) -> posterior params; sample_latent(params) -> z [B, T, d]; decode(z) -> x in [-1, 1]."""

    config_class = TokenizerConfig

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        cfg = self.config = config
        if cfg.posterior not in POSTERIORS:
            raise UserError(f"unknown model.posterior {cfg.posterior!r}; use one of {', '.join(POSTERIORS)}")
        if cfg.recon_loss not in ("l1", "l2"):
            raise UserError(f"model.recon_loss must be \"l1\" or \"l2\", got {cfg.recon_loss!r}")
        stages = len(cfg.channels) - 1
        if stages < 1 or cfg.image_size % 2 ** stages:
            raise UserError(f"model.image_size {cfg.image_size} is not divisible by 2^{stages} "
                            f"({stages} stride-2 stages from model.channels)")
        self.radius = math.sqrt(cfg.latent_dim)
        self.grid = (cfg.image_size // 2 ** stages,) * 2
        self.downsample = 2 ** stages
        ch, d = cfg.channels, cfg.latent_dim
        n_out = {"spherical": d + 1, "gaussian": 2 * d, "gaussian_norm": 2 * d, "sigma": d}[cfg.posterior]
        # encoder
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, 1, 1, bias=False)
        self.down = nn.Sequential(*(ResDown(ch[i], ch[i + 1]) for i in range(stages)))
        self.enc_in = nn.Linear(ch[-1], cfg.dim, bias=False) if ch[-1] != cfg.dim else nn.Identity()
        self.encoder = ViT(cfg, cfg.enc_depth)
        self.enc_norm = RMSNorm(cfg.dim)
        self.enc_out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.quant_proj = nn.Linear(cfg.dim, n_out)
        # decoder
        self.post_quant_proj = nn.Linear(d, cfg.dim, bias=False)
        self.dec_conv = nn.Conv2d(cfg.dim, cfg.dim, 3, 1, 1, bias=cfg.decoder_conv_bias)
        self.decoder = ViT(cfg, cfg.dec_depth)
        self.dec_out = nn.Conv2d(cfg.dim, ch[-1], 1, bias=False) if ch[-1] != cfg.dim else nn.Identity()
        rev = ch[::-1]
        self.up = nn.Sequential(*(ResUp(rev[i], rev[i + 1]) for i in range(stages)))
        self.conv_out = nn.Sequential(_gn(ch[0]), nn.SiLU(),
                                      nn.Conv2d(ch[0], cfg.in_channels, 3, 1, 1, bias=cfg.decoder_conv_bias))
        self._init_weights()
        if cfg.disc_weight > 0:
            if cfg.image_size // 2 ** cfg.disc_layers < 3:
                raise UserError(f"model.disc_layers {cfg.disc_layers} is too deep for {cfg.image_size}px images; "
                                f"use at most {int(math.log2(cfg.image_size / 3))}")
            self.gan = HingeGAN(cfg.in_channels, cfg.disc_ndf, cfg.disc_layers, cfg.disc_start)
        else:
            self.gan = None
        self._perceptual: list = []  # [module or None] once built; kept out of state_dict / parameters()

    def _init_weights(self) -> None:
        """Linear ~ N(0, 0.02), zero bias; registers ~ N(0, 0.02); the three latent-facing linears keep
        PyTorch's default init; convs keep theirs (as the authors' code). Optional kappa_init (not in the
        reference): short runs start with concentrated posteriors, since Adam grows kappa only ~lr per step."""
        keep = {self.quant_proj, self.post_quant_proj, self.enc_out}
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in keep:
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for vit in (self.encoder, self.decoder):
            if vit.registers is not None:
                nn.init.normal_(vit.registers, 0.0, 0.02)
        if self.config.posterior == "spherical" and self.config.kappa_init > 1:
            # kappa = softplus(b) + 1 = kappa_init at init: b = log(expm1(kappa_init - 1)) ~ kappa_init - 1
            with torch.no_grad():
                k = self.config.kappa_init - 1
                self.quant_proj.bias[-1] = k if k > 20 else math.log(math.expm1(k))

    @property
    def on_sphere(self) -> bool:
        """True when every latent the decoder sees has norm R (spherical, gaussian_norm)."""
        return self.config.posterior in ("spherical", "gaussian_norm")

    # -- public API ----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, C, H, W] in [-1, 1] -> posterior params per token (raster order), T = (H/s)(W/s):
        spherical {"mu" [B, T, d] unit, "kappa" [B, T] >= 1}; gaussian / gaussian_norm {"mean", "std"};
        sigma {"mean"}."""
        cfg = self.config
        s = self.downsample
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % s or x.shape[3] % s:
            raise UserError(f"the tokenizer takes [B, {cfg.in_channels}, H, W] images with H, W divisible by "
                            f"{self.downsample}; got {tuple(x.shape)}")
        h = self.down(self.conv_in(x))
        grid = (h.shape[2], h.shape[3])
        h = self.enc_out(self.enc_norm(self.encoder(self.enc_in(_tokens(h)), grid)))
        out = self.quant_proj(h).float()
        d = cfg.latent_dim
        if cfg.posterior == "spherical":
            # the posterior's mean direction: the encoder output normalised to the unit sphere (Eq. 3)
            return {"mu": project(out[..., :d], 1.0), "kappa": F.softplus(out[..., d]) + 1.0}
        if cfg.posterior == "sigma":
            return {"mean": out}
        logvar = out[..., d:].clamp(-30.0, 20.0)
        return {"mean": out[..., :d], "std": torch.exp(0.5 * logvar)}

    def sample_latent(self, params: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh posterior draw z [B, T, d] (norm R per token for spherical / gaussian_norm)."""
        return sample_posterior(self.config.posterior, params, self.radius, self.config.c_sigma, generator)

    def mode_latent(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return posterior_mode(self.config.posterior, params, self.radius)

    def kl(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return kl_term(self.config.posterior, params)

    def decode(self, z: torch.Tensor, clamp: bool = True, project: bool | None = None) -> torch.Tensor:
        """z [B, T, d] (T = h*w of the tokenizer's grid, or a square number) -> x [B, C, H, W] in [-1, 1].

        project: N_R(z) first. None: for the posteriors whose latents live on the sphere (spherical,
        gaussian_norm), renormalising the tokenizer's own latents in fp32 (a no-op up to rounding); callers
        with latents of their own say what they want (the AR passes its project_outputs, so its no-projection
        ablation reaches the decoder off the sphere)."""
        B, T, d = z.shape
        if d != self.config.latent_dim:
            raise UserError(f"latents have dimension {d}, the tokenizer expects {self.config.latent_dim}")
        grid = self.grid
        if T != grid[0] * grid[1]:
            side = math.isqrt(T)
            if side * side != T:
                raise UserError(f"cannot decode {T} tokens: not the tokenizer grid {grid} and not a square")
            grid = (side, side)
        if self.on_sphere if project is None else project:
            # N_R before decoding: the tokenizer's own latents (renormalised) or a caller's explicit request
            z = project_to_sphere(z, self.radius)
        dtype = self.post_quant_proj.weight.dtype
        h = self.dec_conv(_image(self.post_quant_proj(z.to(dtype)), grid))
        h = _image(self.decoder(_tokens(h), grid), grid)
        x = self.conv_out(self.up(self.dec_out(h)))
        return x.clamp(-1, 1) if clamp else x

    def reconstruct(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """decode(encode(x)) with the posterior mode (or a posterior sample), clamped to [-1, 1]."""
        params = self.encode(x)
        return self.decode(self.sample_latent(params) if sample else self.mode_latent(params))

    # -- training -----------------------------------------------------------------------------------
    def perceptual_module(self) -> nn.Module | None:
        """Built once per model from config.perceptual / vgg_weights (prints its warning once)."""
        if not self._perceptual:
            self._perceptual.append(build_perceptual(self.config.perceptual, self.config.vgg_weights or None))
        module = self._perceptual[0]
        if module is not None:
            module.to(self.conv_in.weight.device)  # a no-op once it is there
        return module

    @property
    def second_objective(self) -> HingeGAN | None:
        """The GAN loss module: the trainer steps its discriminator with a second optimizer."""
        return self.gan

    @classmethod
    def upgrade_state(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoints written before the GAN loss module owned the discriminator kept it at `discriminator.`."""
        return {("gan." + k if k.startswith("discriminator.") else k): v for k, v in state.items()}

    def training_loss(self, batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        """L = rec(x, x_hat) + kl_weight KL + perceptual_weight P(x, x_hat) + disc_weight [step >= disc_start] L_G;
        the context {"real": x, "fake": x_hat} feeds the discriminator's own step."""
        cfg = self.config
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        params = self.encode(x)
        x_hat = self.decode(self.sample_latent(params), clamp=False)
        rec = (x_hat - x).abs().mean() if cfg.recon_loss == "l1" else (x_hat - x).pow(2).mean()
        kl = self.kl(params)
        loss = rec + cfg.kl_weight * kl
        terms = {"rec": rec.detach(), "kl": kl.detach()}
        if cfg.posterior == "spherical":
            terms["kappa"] = params["kappa"].detach().mean()
        perceptual = self.perceptual_module()
        if perceptual is not None and cfg.perceptual_weight > 0:
            p = perceptual(x_hat, x)
            loss = loss + cfg.perceptual_weight * p
            terms["perceptual"] = p.detach()
        if self.gan is not None and self.gan.active(step):
            g = self.gan.generator_loss(x_hat)
            loss = loss + cfg.disc_weight * g
            terms["gen"] = g.detach()
        return loss, terms, {"real": x, "fake": x_hat.detach()}


