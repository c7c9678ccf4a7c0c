"""The authors' SphereAR sampling loop, re-implemented for side-by-side speed measurements (sampling_speed.py).

Written from the paper (Sec. 3.2, App. G) and ../shared/research/sphereAR_code.md (their `model.sample`,
`head_sample` and `sampling.euler_maruyama`); none of their code is copied (it has no license). It runs on the
weights of a spheregen SphereAR with the authors' operations and per-call structure:
- KV cache (LlamaGen style): per layer K/V [2B, H, 16 + T - 1, hd] preallocated; the class tokens in one causal
  call, then one token per call written at its position; every cached call attends over the whole cache with a
  boolean mask, in plain matmul-softmax attention (no fused kernel), RoPE as the real form of the complex product;
- the flow head: every solver step calls the whole MLP-AdaLN network on [x; x] with t as a [2B] tensor:
  sinusoidal time embedding and its MLP, condition embedding, the AdaLN linears, the ResBlocks, the final layer;
- Euler-Maruyama, 100 steps of dt = 0.96 / 100 and a last Euler step of 0.04, CFG on the velocity (chunk into
  cond / uncond), noise from the global RNG (torch.randn_like) at every step; at token 0 (s_0 = 1) every row is
  solved on its own; the guided token is projected (l2_norm * R) and copied to both halves;
- the decoder (the same S-VAE network as spheregen's Tokenizer) on the cond half.
Where the notes leave a detail open, the cheaper choice is taken: the shared AdaLN linear runs once per group of
blocks, as spheregen's head does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spheregen.models.flow_head import EM_LAST_STEP, timestep_embedding


def _rope_table(model) -> torch.Tensor:
    """freqs_cis as [positions, hd/2, 2] (cos, sin), precomputed once like the authors' buffer."""
    return torch.stack([model.rope.cos(), model.rope.sin()], dim=-1)


def _apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, hd] rotated by freqs [T, hd/2, 2], pairs (2i, 2i+1), in fp32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.view(1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


def _attention(blk, x, freqs, cache, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    attn = blk.attn
    B, T, C = x.shape
    q, k, v = attn.qkv(x).split([C, C, C], dim=-1)
    q, k, v = (y.view(B, T, attn.n_heads, attn.head_dim) for y in (q, k, v))
    q, k = _apply_rotary(q, freqs), _apply_rotary(k, freqs)
    q, k, v = (y.transpose(1, 2) for y in (q, k, v))
    k_cache, v_cache = cache
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    scores = torch.matmul(q, k_cache.transpose(2, 3)) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v_cache)
    return attn.proj(out.transpose(1, 2).contiguous().view(B, T, C))


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """LlamaGen's RMSNorm as separate ops: x * rsqrt(mean(x^2) + eps) in fp32, cast back, times the weight."""
    y = x.float()
    return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps)).type_as(x) * norm.weight


def _forward_model(model, x, caches, pos: torch.Tensor, freqs, mask) -> torch.Tensor:
    """emb_norm -> blocks (KV cache) -> norm for the positions `pos`."""
    x = _rms_norm(model.emb_norm, x)
    for blk, cache in zip(model.blocks, caches):
        h = x + _attention(blk, _rms_norm(blk.norm1, x), freqs[pos], cache, pos, mask)
        x = h + blk.mlp(_rms_norm(blk.norm2, h))
    return _rms_norm(model.norm, x)


def _head(head, x, t, c) -> torch.Tensor:
    """The authors' MLP-AdaLN forward, called once per solver step."""
    t_emb = head.time_embed(timestep_embedding(t).to(x.dtype))
    y = F.silu(t_emb + head.cond_embed(c))
    x = head.input_proj(x)
    per = head.depth // head.n_adaln
    for i, blk in enumerate(head.blocks):
        if i % per == 0:
            scale, shift, gate = head.adaln[i // per](y).chunk(3, dim=-1)
        h = blk.norm(x) * (1 + scale) + shift
        x = x + gate * blk.mlp(h)
    scale, shift = head.final_adaln(y).chunk(2, dim=-1)
    return head.final_proj(head.final_norm(x) * (1 + scale) + shift)


def euler_maruyama(head, c, cfg: float, steps: int, randn=torch.randn_like) -> torch.Tensor:
    """One token: c [2B, C] = [cond; null] conditions; cfg 1: every row on its own (-> [2B, d]), else the
    guided velocity on [x; x] (-> [B, d])."""
    rows = len(c) if cfg == 1.0 else len(c) // 2
    x = randn(torch.empty(rows, head.token_dim, device=c.device))
    dt = (1 - EM_LAST_STEP) / steps

    def velocity(x, t):
        x_in = x if cfg == 1.0 else torch.cat([x, x])
        out = _head(head, x_in, torch.ones(len(x_in), device=x.device) * t, c).float()
        if cfg == 1.0:
            return out
        cond, uncond = out.chunk(2)
        return uncond + cfg * (cond - uncond)

    t = 0.0
    for _ in range(steps):
        v = velocity(x, t)
        score = (t * v - x) / (1 - t)
        drift = v + (1 - t) * score
        x = x + drift * dt + math.sqrt(2 * (1 - t) * dt) * randn(x)
        t += dt
    return x + EM_LAST_STEP * velocity(x, 1 - EM_LAST_STEP)


@torch.no_grad()
def authors_sample(model, labels: torch.Tensor, cfg: float = 4.5, steps: int = 100,
                   randn=torch.randn_like, amp: torch.dtype | None = None) -> torch.Tensor:
    """Tokens [B, T, d] of the class labels [B] with the linear CFG schedule s_k = 1 + (cfg - 1) k / T; amp: the
    networks' autocast dtype (the authors sample under bf16 autocast on GPU), KV cache in that dtype."""
    with torch.autocast(model.rope.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        return _sample(model, labels, cfg, steps, randn, amp)


def _sample(model, labels, cfg, steps, randn, amp) -> torch.Tensor:
    c, device = model.config, model.rope.device
    B, T = len(labels), model.seq_len
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)]).to(device)
    max_len = c.n_cls_tokens + T - 1
    hd = c.dim // c.n_heads
    dtype = amp or model.proj_in.weight.dtype
    caches = [(torch.zeros(2 * B, c.n_heads, max_len, hd, device=device, dtype=dtype),
               torch.zeros(2 * B, c.n_heads, max_len, hd, device=device, dtype=dtype)) for _ in model.blocks]
    causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=device))
    freqs = _rope_table(model)
    x = model.cls_embedding(rows).view(2 * B, c.n_cls_tokens, c.dim)
    pos = torch.arange(c.n_cls_tokens, device=device)
    preds = []
    for k in range(T):
        h = _forward_model(model, x, caches, pos, freqs, causal[pos][None, None])[:, -1]
        h = h + model.pos_for_diff.weight[k]
        scale = 1 + (cfg - 1) * k / T
        pred = euler_maruyama(model.head, h, scale, steps, randn)
        pred = F.normalize(pred, dim=-1, eps=1e-7) * c.radius  # l2_norm * R, after the solve and CFG
        if scale != 1.0:
            pred = torch.cat([pred, pred])
        preds.append(pred[:B])
        x = model.proj_in(pred)[:, None]
        pos = torch.tensor([c.n_cls_tokens + k], device=device)
    return torch.stack(preds, dim=1)
