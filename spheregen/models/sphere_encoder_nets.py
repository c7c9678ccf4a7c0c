"""Sphere Encoder networks (Sec. 2.4): a ViT encoder E and a ViT decoder D with MLP-Mixers at the latent end.

Both are pre-norm ViTs (RMSNorm, SwiGLU, 2D RoPE in attention, fixed 2D sin-cos positions added to the tokens),
class-conditioned by AdaLN-Zero on a per-network label table with a null row K (the CFG "unconditional" label).

    E: patchify (Conv P x P, then Conv 1x1) -> +pos -> blocks -> ModulatedLinear(W -> d) (zero-init)
       -> MLP-Mixer(N, d) ending in a learned-affine RMSNorm [-> BatchNorm, optional] -> z [B, N, d]
    D: Linear(d -> W) -> MLP-Mixer(N, W) (this stem is N(0, 1)-initialised) -> +pos -> blocks
       -> head: "linear" ModulatedLinear(W -> P^2 C) (zero-init), unpatchify, residual reflect-Conv3x3, tanh
                "conv"   ModulatedLinear(W -> c), Conv3x3, SiLU, ConvTranspose(c -> C, k = P + 2, stride P), tanh

The latent has N = (H / P)^2 tokens of d channels, L = N d values, spherified to radius sqrt(L) by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spheregen.layers import (
    Block,
    MLPMixer,
    RMSNorm,
    grid_positions,
    modulate,
    rope_angles,
    sincos_pos_embed_2d,
    swiglu_hidden,
)


@dataclass
class SphereEncoderConfig:
    # data
    image_size: int = 32
    channels: int = 3
    num_classes: int = 10  # 0 = unconditional (no label tables, no AdaLN)
    # architecture (shared by E and D; the paper's B / L / XL: (768, 12, 12) / (1024, 24, 16) / (1152, 28, 16))
    patch_size: int = 2
    latent_dim: int = 8  # d, channels per latent token
    width: int = 768
    depth: int = 12
    heads: int = 12
    mixer_depth: int = 4
    dec_mixer_depth: int = -1  # the decoder's mixer depth (-1: mixer_depth, as in every spheregen config)
    qkv_bias: bool = True
    mlp_bias: bool = True
    rope_theta: float = 10000.0
    head: str = "linear"  # decoder output head: "linear" | "conv" (the CIFAR script's head)
    conv_head_channels: int = 32
    stem_init_std: float = 1.0  # std of the decoder stem's Linears (the authors' code uses N(0, 1))
    # the authors' code choices (the paper configs select them; the defaults keep spheregen's own checkpoints)
    attn_proj_bias: bool = False  # a bias on the attention output projection (the authors: yes)
    uncond_head_norm: bool = True  # unconditional models: RMSNorm before the output Linears (the authors: none)
    head_residual: bool = True  # linear head: tanh(x + conv(x)) (spheregen) or tanh(conv(x)) (the authors)
    conv_head_authors: bool = False  # conv head: reflect-padded Conv3x3, xavier gain-0.01 convs (the authors)
    pos_order: str = "row_col"  # sin-cos channel halves: rows then columns, or columns then rows ("col_row")
    # noisy spherify (Sec. 2.2): sigma_max = tan(alpha); hard-case mixing up to min(alpha + extra, max) degrees
    alpha_deg: float = 80.0  # 80 for 32 px, 85 for 256 px
    noisy_max: float = 0.5  # v_noisy uses r * s with s in [0, noisy_max]
    mix_prob: float = 0.1
    mix_extra_deg: float = 5.0
    mix_max_deg: float = 89.0
    mix_mode: str = "code"  # "code": r_N = 1 + u (ratio - 1), the mask's own u; "uniform": angle ~ U[alpha, alpha_mix]
    spherify_eps: float = 1e-6
    # BatchNorm (no affine) on the encoder output before spherify, per latent coordinate (App. C.3, Table 11):
    # every coordinate gets zero batch mean and unit variance, which spreads the posterior over the sphere
    latent_bn: bool = False
    # conditioning
    label_dropout: float = 0.1
    # losses (Eq. 7-10; images in [0, 1]); the official CIFAR-10 weights as defaults
    w_recon_dist: float = 1.0
    w_recon_perc: float = 1.0
    w_con_dist: float = 0.5
    w_con_perc: float = 0.5
    w_lat_con: float = 0.1
    dist_beta: float = 1.0  # smooth-L1 beta: 1 is the paper's (= 0.5 MSE on [0, 1] images), -> 0 is L1
    perceptual: str = "lpips"  # "lpips" | "ssim" | "none" (spheregen.losses.build_perceptual)
    vgg_weights: str = ""  # VGG16 weights file for LPIPS (empty: losses.py falls back)
    enc_lr_scale: float = 0.1  # encoder LR = enc_lr_scale x decoder LR

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def latent_size(self) -> int:
        """L = N d, the dimension of the latent sphere of radius sqrt(L)."""
        return self.n_tokens * self.latent_dim

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise ValueError(f"width {self.width} / heads {self.heads} must give a head dim divisible by 4 (2D RoPE)")
        if self.width % 4:
            raise ValueError(f"width {self.width} must be divisible by 4 (sin-cos positions)")
        if self.head not in ("linear", "conv"):
            raise ValueError(f"head must be 'linear' or 'conv', got {self.head!r}")
        if self.pos_order not in ("row_col", "col_row"):
            raise ValueError(f"pos_order must be 'row_col' or 'col_row', got {self.pos_order!r}")
        if self.mix_mode not in ("code", "uniform"):
            raise ValueError(f"mix_mode must be 'code' or 'uniform', got {self.mix_mode!r}")
        if not 0 < self.alpha_deg < 90:
            raise ValueError(f"alpha_deg must be in (0, 90), got {self.alpha_deg}")


class LabelEmbedder(nn.Module):
    """A table of K + 1 label vectors; row K is the learned null label (CFG / reconstruction)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Rows of the table for ids [B]; for soft labels [B, K + 1] (float) the weighted sum w @ table."""
        if labels.is_floating_point():
            return labels.to(self.table.weight.dtype) @ self.table.weight
        return self.table(labels)


class ModulatedLinear(nn.Module):
    """y = Linear(modulate(RMSNorm(x), shift, scale)), (shift, scale) = Linear(SiLU(c)) (zero-init), Linear zero-init.

    Without cond_dim there is no modulation: y = Linear(RMSNorm(x)), or y = Linear(x) with norm=False.
    """

    def __init__(self, dim: int, out_dim: int, cond_dim: int | None, norm: bool = True):
        super().__init__()
        self.norm = RMSNorm(dim) if norm or cond_dim else None
        self.linear = nn.Linear(dim, out_dim)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim)) if cond_dim else None

    def zero_init(self) -> None:
        for lin in [self.linear] + ([self.adaln[1]] if self.adaln is not None else []):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(x) if self.norm is not None else x
        if self.adaln is not None:
            shift, scale = self.adaln(c).chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return self.linear(h)


class _ViT(nn.Module):
    """Shared trunk: fixed sin-cos positions, RoPE angles and conditioned pre-norm blocks over [B, N, W]."""

    def __init__(self, cfg: SphereEncoderConfig):
        super().__init__()
        W, g = cfg.width, cfg.grid
        self.cond_dim = W if cfg.num_classes > 0 else None
        self.labels = LabelEmbedder(cfg.num_classes, W) if cfg.num_classes > 0 else None
        self.blocks = nn.ModuleList(
            Block(W, cfg.heads, swiglu_hidden(W), cfg.qkv_bias, self.cond_dim, cfg.mlp_bias, cfg.attn_proj_bias)
            for _ in range(cfg.depth)
        )
        self.register_buffer("pos", pos_table(cfg), persistent=False)
        self.register_buffer("rope", rope_angles(grid_positions(g, g), W // cfg.heads, cfg.rope_theta),
                             persistent=False)

    def cond(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        return self.labels(labels) if self.labels is not None else None

    def trunk(self, h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = h + self.pos.to(h.dtype)
        for blk in self.blocks:
            h = blk(h, self.rope, c)
        return h


class Encoder(_ViT):
    """E(x, y): images [B, C, H, W] in [-1, 1] -> raw latents z [B, N, d] (before spherify)."""

    def __init__(self, cfg: SphereEncoderConfig):
        super().__init__(cfg)
        P, W = cfg.patch_size, cfg.width
        self.patch = nn.Conv2d(cfg.channels, W, P, stride=P, bias=False)
        self.proj = nn.Conv2d(W, W, 1)
        self.out = ModulatedLinear(W, cfg.latent_dim, self.cond_dim, cfg.uncond_head_norm)
        self.mixer = MLPMixer(cfg.n_tokens, cfg.latent_dim, cfg.mixer_depth)
        self.bn = nn.BatchNorm1d(cfg.latent_size, affine=False) if cfg.latent_bn else None
        init_linears(self)
        self.out.zero_init()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        c = self.cond(labels)
        h = self.proj(self.patch(x)).flatten(2).transpose(1, 2)  # [B, N, W]
        z = self.mixer(self.out(self.trunk(h, c), c))
        return z if self.bn is None else self.bn(z.flatten(1)).view_as(z)


class Decoder(_ViT):
    """D(v, y): latents [B, N, d] on the sphere -> images [B, C, H, W] in (-1, 1)."""

    def __init__(self, cfg: SphereEncoderConfig):
        super().__init__(cfg)
        P, W, C = cfg.patch_size, cfg.width, cfg.channels
        self.cfg = cfg
        self.inp = nn.Linear(cfg.latent_dim, W)
        self.mixer = MLPMixer(cfg.n_tokens, W, cfg.mixer_depth if cfg.dec_mixer_depth < 0 else cfg.dec_mixer_depth)
        if cfg.head == "linear":
            self.out = ModulatedLinear(W, P * P * C, self.cond_dim, cfg.uncond_head_norm)
            self.refine = nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect")
        else:
            ch = cfg.conv_head_channels
            self.out = ModulatedLinear(W, ch, self.cond_dim, cfg.uncond_head_norm)
            self.conv = nn.Conv2d(ch, ch, 3, padding=1, padding_mode="reflect" if cfg.conv_head_authors else "zeros")
            self.up = nn.ConvTranspose2d(ch, C, P + 2, stride=P, padding=1)
        init_linears(self)
        for lin in [self.inp] + [m for m in self.mixer.modules() if isinstance(m, nn.Linear)]:
            nn.init.normal_(lin.weight, std=cfg.stem_init_std)
            nn.init.zeros_(lin.bias)
        self.out.zero_init()
        small = [self.refine] if cfg.head == "linear" else [self.conv, self.up] if cfg.conv_head_authors else []
        for conv in small:
            nn.init.xavier_uniform_(conv.weight, gain=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, v: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        cfg, c = self.cfg, self.cond(labels)
        h = self.trunk(self.mixer(self.inp(v)), c)
        B, g, P = v.shape[0], cfg.grid, cfg.patch_size
        if cfg.head == "linear":
            x = self.out(h, c).view(B, g, g, P, P, cfg.channels)
            x = x.permute(0, 5, 1, 3, 2, 4).reshape(B, cfg.channels, g * P, g * P)  # unpatchify
            if cfg.head_residual:
                return torch.tanh(x + self.refine(x))  # a near-identity residual smoothing conv at init
            return torch.tanh(self.refine(x))  # the authors' head: the conv output itself
        x = self.out(h, c).transpose(1, 2).reshape(B, -1, g, g)
        return torch.tanh(self.up(F.silu(self.conv(x))))


def init_linears(module: nn.Module) -> None:
    """xavier_uniform weights and zero biases for every Linear / Conv, then re-zero the AdaLN-Zero projections."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, Block) and m.adaln is not None:
            nn.init.zeros_(m.adaln[1].weight)
            nn.init.zeros_(m.adaln[1].bias)


def pos_table(cfg: SphereEncoderConfig) -> torch.Tensor:
    """The fixed 2D sin-cos table [N, W]: [sin, cos](row w), [sin, cos](col w), or col first ("col_row")."""
    table = sincos_pos_embed_2d(cfg.grid, cfg.grid, cfg.width)
    if cfg.pos_order == "col_row":
        table = torch.cat(table.chunk(2, dim=-1)[::-1], dim=-1)
    return table


def sigma_max(cfg: SphereEncoderConfig) -> float:
    """sigma_max = tan(alpha) (Sec. 2.2, Eq. 5)."""
    return math.tan(math.radians(cfg.alpha_deg))
