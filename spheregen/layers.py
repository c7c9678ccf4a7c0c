"""Transformer building blocks shared by the tokenizer, the AR model and the Sphere Encoder.

RMSNorm, SwiGLU, 2D RoPE, attention (SDPA, optional KV cache), a pre-norm block with optional
AdaLN-Zero modulation (DiT), MLP-Mixer, and 2D sin-cos position embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, over the last dimension (computed in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return y * self.weight if self.weight is not None else y


def swiglu_hidden(dim: int, multiple_of: int = 1) -> int:
    """LLaMA sizing: hidden = round_up(8 dim / 3, multiple_of)."""
    hidden = int(8 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class SwiGLU(nn.Module):
    """FFN(x) = W2 (SiLU(W1 x) * W3 x)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


def drop_labels(labels: torch.Tensor, p: float, null_label: int) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each label becomes `null_label` with probability p."""
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


# -- 2D rotary position embedding -----------------------------------------------------------------
def grid_positions(h: int, w: int, offset: float = 0.5) -> torch.Tensor:
    """(x, y) = (col + offset, row + offset) for an h x w grid in raster order: [h*w, 2]."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([cols.flatten(), rows.flatten()], dim=-1).float() + offset


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """2D RoPE angles [T, head_dim/2]: the first half of the rotated pairs turn with x, the second with y.

    With q = head_dim/4 frequencies f_j = theta^(-j/q), angles = [x f, y f]. A token at (0, 0) is not
    rotated, which is how class and register tokens are placed.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    q = head_dim // 4
    freqs = theta ** (-torch.arange(q, dtype=torch.float32) / q)
    return torch.cat([pos[:, :1] * freqs, pos[:, 1:2] * freqs], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x [B, H, T, hd] by angles [T, hd/2] (fp32 math): each pair is the
    complex number a + ib, times e^{i angle}, i.e. (a cos - b sin, a sin + b cos), in one complex product."""
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(s % 2 for s in xf.stride()[:-1]):
        xf = xf.contiguous()  # view_as_complex needs pairs adjacent in memory
    pairs = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # [B, H, T, hd/2] complex
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


# -- attention with an optional KV cache ----------------------------------------------------------
class KVCache:
    """Pre-allocated keys/values for incremental decoding: k, v of shape [B, H, max_len, hd]."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device=None, dtype=torch.float32):
        # uninitialised: `update` returns only the positions written so far
        self.k = torch.empty(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, qkv_bias: bool = False, proj_bias: bool = False):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """x [B, T, C]; rope angles for these T positions; with a cache, x holds positions start..start+T-1."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None and T == 1 and x.device.type == "cpu":
            # one new query over the cache (every decoding step): softmax(q k^T / sqrt(hd)) v as two batched
            # products, ~2x faster on CPU than SDPA's flash kernel, which is built for long queries
            k, v = cache.update(k, v, start)
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.head_dim ** -0.5)  # [B, H, 1, L]
            out = torch.matmul(scores.float().softmax(-1).to(v.dtype), v)  # [B, H, 1, hd]
        elif cache is not None:
            k, v = cache.update(k, v, start)
            # new tokens see every cached token plus the causal part of their own chunk
            mask = None
            if T > 1:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: x (1 + scale) + shift, with per-sample shift/scale [B, C] broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)).

    With `cond_dim`, AdaLN-Zero (DiT): c -> SiLU -> Linear -> (shift, scale, gate) for attention and MLP,
    the Linear zero-initialised so every block starts as the identity.
    """

    def __init__(self, dim: int, n_heads: int, mlp_hidden: int, qkv_bias: bool = False,
                 cond_dim: int | None = None, mlp_bias: bool = False, proj_bias: bool = False):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, n_heads, qkv_bias, proj_bias)
        self.mlp = SwiGLU(dim, mlp_hidden, bias=mlp_bias)
        self.adaln = None
        if cond_dim is not None:
            self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
            nn.init.zeros_(self.adaln[1].weight)
            nn.init.zeros_(self.adaln[1].bias)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, c: torch.Tensor | None = None,
                causal: bool = False, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        if self.adaln is None:
            x = x + self.attn(self.norm1(x), rope, causal, cache, start)
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope, causal, cache, start)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


# -- MLP-Mixer (Sphere Encoder) ---------------------------------------------------------------------
class MixerBlock(nn.Module):
    """x += a1 TokenMLP(RMSNorm(x)); x += a2 ChannelMLP(RMSNorm(x)); a1 = a2 = 0 at init."""

    def __init__(self, n_tokens: int, dim: int):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(n_tokens, n_tokens), nn.SiLU(), nn.Linear(n_tokens, n_tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        self.alpha1 = nn.Parameter(torch.zeros(()))
        self.alpha2 = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.alpha1 * self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.alpha2 * self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    """`depth` mixer blocks over [B, N, C] ending in a learned-affine RMSNorm over channels."""

    def __init__(self, n_tokens: int, dim: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(MixerBlock(n_tokens, dim) for _ in range(depth))
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def sincos_pos_embed_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [h*w, dim]: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs dim divisible by 4, got {dim}")
    pos = grid_positions(h, w, offset=0.0)
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / q)
    parts = []
    for axis in (1, 0):  # rows then columns
        ang = pos[:, axis:axis + 1] * omega
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=-1)
