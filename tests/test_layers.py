"""Shared blocks: RoPE is relative, attention with a KV cache equals full causal attention, AdaLN-Zero
starts as the identity."""

import torch

from spheregen.layers import (
    Block,
    KVCache,
    MLPMixer,
    RMSNorm,
    apply_rope,
    grid_positions,
    rope_angles,
    sincos_pos_embed_2d,
)


def test_rope_depends_only_on_relative_offset():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(pq, pk):
        aq = rope_angles(torch.tensor([pq], dtype=torch.float32), 32)
        ak = rope_angles(torch.tensor([pk], dtype=torch.float32), 32)
        return (apply_rope(q, aq) * apply_rope(k, ak)).sum().item()

    assert abs(score((3, 5), (1, 2)) - score((10, 13), (8, 10))) < 1e-4
    assert abs(score((3, 5), (1, 2)) - score((3, 5), (2, 1))) > 1e-3  # x and y are distinguished
    x = torch.randn(2, 3, 4, 32)
    assert torch.equal(apply_rope(x, torch.zeros(4, 16)), x)  # position (0, 0) is the identity
    assert torch.allclose(apply_rope(x, rope_angles(grid_positions(2, 2), 32)).norm(dim=-1), x.norm(dim=-1),
                          atol=1e-5)


def test_kv_cache_matches_full_causal_attention():
    torch.manual_seed(0)
    blk = Block(64, 4, 128).eval()
    x = torch.randn(2, 10, 64)
    rope = rope_angles(grid_positions(2, 5), 16)
    full = blk(x, rope, causal=True)
    cache = KVCache(2, 4, 10, 16)
    prefix = blk(x[:, :4], rope[:4], cache=cache, start=0)  # a chunk, then one token at a time
    steps = [blk(x[:, t:t + 1], rope[t:t + 1], cache=cache, start=t) for t in range(4, 10)]
    assert torch.allclose(torch.cat([prefix, *steps], 1), full, atol=1e-5)


def test_causal_mask_holds():
    torch.manual_seed(0)
    blk = Block(32, 2, 64).eval()
    x = torch.randn(1, 8, 32)
    y = x.clone()
    y[:, 5] += 1.0
    a, b = blk(x, causal=True), blk(y, causal=True)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])


def test_adaln_zero_starts_as_identity_and_mixer_as_norm():
    blk = Block(32, 2, 64, cond_dim=16)
    x = torch.randn(3, 5, 32)
    assert torch.equal(blk(x, c=torch.randn(3, 16)), x)
    mixer = MLPMixer(5, 32, depth=2)
    assert torch.allclose(mixer(x), RMSNorm(32)(x), atol=1e-6)


def test_sincos_embedding_distinct_positions():
    pe = sincos_pos_embed_2d(4, 4, 32)
    assert pe.shape == (16, 32)
    d = torch.cdist(pe, pe) + torch.eye(16)
    assert d.min() > 0.1
