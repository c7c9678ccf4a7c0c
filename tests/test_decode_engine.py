"""The packed one-token decoding step (models/decode_engine.py): the module path over the KV cache up to float
rounding (outputs and cache writes), the same samples through `generate`, and the module path wherever the engine
does not apply (bf16, biases, a compiled model), rebuilt after the weights change."""

import pytest
import torch

import spheregen.models.ar as ar_module
from spheregen.layers import KVCache
from spheregen.models.ar import ARConfig, SphereAR
from spheregen.models.decode_engine import packed_decoder


def random_ar(dim: int, heads: int, layers: int, seed: int, grid=(3, 3), cls_tokens: int = 2) -> SphereAR:
    torch.manual_seed(seed)
    model = SphereAR(ARConfig(token_dim=4, grid=grid, radius=2.0, num_classes=3, dim=dim, n_layers=layers,
                              n_heads=heads, n_cls_tokens=cls_tokens, mlp_multiple_of=8, head_depth=2, head_width=16,
                              head_adaln=1)).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and all: nothing left at its trivial init
            p.add_(torch.randn_like(p) * 0.2)
    return model


def caches_for(model: SphereAR, rows: int) -> list[KVCache]:
    c = model.config
    return [KVCache(rows, c.n_heads, c.n_cls_tokens + model.seq_len - 1, c.dim // c.n_heads) for _ in model.blocks]


@pytest.mark.parametrize("dim,heads,layers", [(32, 2, 1), (48, 3, 2), (64, 4, 3)])
@pytest.mark.parametrize("native,rows,threads", [(False, 5, 2), (True, 5, 2), (True, 1, 2), (True, 7, 1)])
def test_one_token_step_equals_the_module_path(dim, heads, layers, native, rows, threads, monkeypatch):
    """The TorchScript step and the native kernel (models/kernels/decode_step.cpp, rows split between threads)."""
    from spheregen.models import decode_engine, kernels

    if native and kernels.native_op("decode_step") is None:
        pytest.skip("the native kernels are not built here (no C++ compiler)")
    if not native:
        monkeypatch.setattr(decode_engine, "native_op", lambda name: None)
    model = random_ar(dim, heads, layers, seed=dim + layers)
    step = packed_decoder(model)
    assert step is not None and (step.kernel is not None) == native
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_steps(model, step, rows, dim)
    finally:
        torch.set_num_threads(before)


def check_steps(model: SphereAR, step, rows: int, dim: int) -> None:
    ref_caches, caches = caches_for(model, rows), caches_for(model, rows)
    with torch.no_grad():
        first = model._class_tokens(torch.tensor([0, 1, 2, 3, 1, 2, 0][:rows]))
        model._run(first, 0, ref_caches)
        model._run(first, 0, caches)
        start = first.shape[1]
        for _ in range(model.seq_len - 1):  # every later position, the cache growing
            x = torch.randn(rows, 1, dim)
            ref = model._run(x, start, ref_caches)[:, -1]
            out = step(x[:, 0], start, caches)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            start += 1
    for a, b in zip(caches, ref_caches):
        torch.testing.assert_close(a.k[:, :, :start], b.k[:, :, :start], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.v[:, :, :start], b.v[:, :, :start], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [None, 2.5])
@pytest.mark.parametrize("sampler,steps", [("euler_maruyama", 3), ("euler", 1)])
def test_generate_with_the_engine_equals_the_module_path(cfg, sampler, steps, monkeypatch):
    model = random_ar(32, 2, 2, seed=7, grid=(2, 3))
    labels, seeds = [0, 2, 1], [4, 5, 6]
    fast = model.generate(labels, seeds, sampler=sampler, steps=steps, cfg=cfg)
    monkeypatch.setattr(ar_module, "packed_decoder", lambda m: None)
    slow = model.generate(labels, seeds, sampler=sampler, steps=steps, cfg=cfg)
    assert (fast - slow).abs().max() <= 1e-3  # rounding, carried through later tokens (radius 2)
    assert (fast[0] - fast[1]).abs().max() > 1e-2  # different classes and seeds really differ
    norms = fast.norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, model.config.radius), atol=1e-5)


def test_engine_is_used_only_in_fp32_on_plain_blocks(monkeypatch):
    model = random_ar(32, 2, 1, seed=1, grid=(2, 2))
    calls = []
    real = ar_module.packed_decoder
    monkeypatch.setattr(ar_module, "packed_decoder", lambda m: calls.append(1) or real(m))
    model.generate([0], [1], sampler="euler", steps=2, precision="bf16")
    assert not calls  # under autocast the module path runs
    model.generate([0], [1], sampler="euler", steps=2, use_cache=False)
    assert not calls  # recomputation is the reference: the module path
    model.generate([0], [1], sampler="euler", steps=2)
    assert calls
    with_bias = random_ar(32, 2, 1, seed=1, grid=(2, 2))
    with_bias.blocks[0].attn.qkv.bias = torch.nn.Parameter(torch.zeros(96))
    assert packed_decoder(with_bias) is None
    half = random_ar(32, 2, 1, seed=1, grid=(2, 2)).to(torch.bfloat16)
    assert packed_decoder(half) is None


def test_packing_is_rebuilt_when_the_weights_change():
    model = random_ar(32, 2, 1, seed=3, grid=(2, 2))
    first = packed_decoder(model)
    assert packed_decoder(model) is first
    before = model.generate([1], [2], sampler="euler", steps=2)
    with torch.no_grad():
        model.blocks[0].mlp.w2.weight.mul_(1.5)  # an in-place update, as an optimizer step makes
    assert packed_decoder(model) is not first
    after = model.generate([1], [2], sampler="euler", steps=2)
    model.blocks[0].mlp.w2.weight.data.div_(1.5)
    assert not torch.equal(before, after)
