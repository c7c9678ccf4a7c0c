"""The transformer's one-token decoding step for the CPU sampler (issue 20).

After the class tokens, SphereAR decodes one position per row at a time over the KV cache: per block two
RMSNorms, four small products, RoPE on q and k, the cache writes and a one-query attention. At sampling
batch sizes (tens of rows) each op is small, and on a CPU the Python between them costs as much as the ops:
at 32 rows, about half of a token's transformer time goes outside the products (1 thread, tiny config).
`PackedDecoder` runs the same math for one token through every block as one TorchScript function:

- the products as `mm` / `addmm` on contiguous W^T copies (~30% faster than the transposed view `nn.Linear`
  hands to MKL at 32 rows; the same sums, though MKL rounds a few small shapes differently);
- RoPE as one complex product on q and k together, with e^{i angle} of the position computed once for all
  blocks (the module path forms it per block: the same numbers);
- the attention as the module path's two batched products over the cache (models/layers.py).

It equals `SphereAR._run` over the caches up to float rounding (tested; bitwise at most sizes), and runs only
where it applies and pays: on CPU, fp32 without autocast, plain pre-norm blocks without biases (SphereAR's).
`packed_decoder(model)` returns the cached packing, rebuilt when any weight changes, or None where the module
path runs.
"""

from __future__ import annotations

import warnings
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from spheregen.layers import KVCache
from spheregen.models.head_engine import cached_by_weights
from spheregen.models.kernels import native_op


def _decode(x: torch.Tensor, rot: torch.Tensor, weights: List[torch.Tensor], keys: List[torch.Tensor],
            values: List[torch.Tensor], pos: int, n_heads: int, eps: float) -> torch.Tensor:
    """emb_norm -> blocks -> norm for one new position `pos` per row: x [N, C] -> [N, C]; writes k, v of
    `pos` into the caches keys / values [N, H, L, hd]. rot: e^{i angle} [hd/2] of the position (complex).
    weights: emb_norm, then per block [norm1, Wqkv^T, Wproj^T, norm2, W13^T, W2^T], then norm."""
    N, C = x.shape[0], x.shape[1]
    hd = C // n_heads
    scale = float(hd) ** -0.5
    x = F.rms_norm(x, [C], weights[0], eps)
    for i in range(len(keys)):
        norm1, w_qkv, w_proj, norm2, w13, w2 = weights[1 + 6 * i:7 + 6 * i]
        # [N, 3C] -> [N, 3 (q, k, v), H, hd/2, 2]: each head's channels as interleaved pairs
        qkv = torch.mm(F.rms_norm(x, [C], norm1, eps), w_qkv).view(N, 3, n_heads, hd // 2, 2)
        # RoPE on q and k at once: the pairs as complex numbers times e^{i angle} -> [N, 2, H, 1, hd]
        qk = torch.view_as_real(torch.view_as_complex(qkv[:, :2]) * rot).view(N, 2, n_heads, 1, hd)
        keys[i][:, :, pos:pos + 1] = qk[:, 1]
        values[i][:, :, pos:pos + 1] = qkv[:, 2].reshape(N, n_heads, 1, hd)
        # one query over the cache: softmax(q k^T / sqrt(hd)) v, as in layers.Attention
        scores = torch.matmul(qk[:, 0], keys[i][:, :, :pos + 1].transpose(-1, -2)).mul_(scale)  # [N, H, 1, L]
        out = torch.matmul(scores.softmax(-1), values[i][:, :, :pos + 1])  # [N, H, 1, hd]
        x = torch.addmm(x, out.view(N, C), w_proj)
        u = torch.mm(F.rms_norm(x, [C], norm2, eps), w13)  # [N, 2 hidden]: SwiGLU's two inputs side by side
        hidden = u.shape[1] // 2
        x = torch.addmm(x, F.silu(u[:, :hidden]) * u[:, hidden:], w2)
    return F.rms_norm(x, [C], weights[-1], eps)


_COMPILED: dict = {}


def _scripted():
    """`_decode` TorchScript'ed once per process, or the eager function where scripting fails."""
    if not _COMPILED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.script is deprecated, still the leanest CPU loop here
                _COMPILED["fn"] = torch.jit.script(_decode)
        except Exception:  # noqa: BLE001 - any scripting failure: run the same math eagerly
            _COMPILED["fn"] = _decode
    return _COMPILED["fn"]


class PackedDecoder:
    """One decoding step of a SphereAR's transformer on packed weights (see the module docstring)."""

    def __init__(self, model: nn.Module):
        def t(linear: nn.Linear) -> torch.Tensor:
            return linear.weight.detach().t().contiguous()  # W^T [in, out]

        self.n_heads, self.eps = model.config.n_heads, model.norm.eps
        self.weights = [model.emb_norm.weight.detach()]
        for blk in model.blocks:
            self.weights += [blk.norm1.weight.detach(), t(blk.attn.qkv), t(blk.attn.proj), blk.norm2.weight.detach(),
                             t(blk.mlp.w13), t(blk.mlp.w2)]
        self.weights.append(model.norm.weight.detach())
        self.rotations = torch.polar(torch.ones_like(model.rope), model.rope)  # e^{i angle} [positions, hd/2]
        self.cos_sin = torch.view_as_real(self.rotations).contiguous()  # [positions, hd/2, 2], the native kernel's
        self.kernel = native_op("decode_step")

    def __call__(self, x: torch.Tensor, start: int, caches: list[KVCache]) -> torch.Tensor:
        """The final hidden state [N, C] of position `start` from its input x [N, C], the caches holding
        positions 0..start-1 (and taking `start`)."""
        keys, values = [c.k for c in caches], [c.v for c in caches]
        if self.kernel is not None and all(k.is_contiguous() for k in keys + values):
            return self.kernel(x.contiguous(), self.cos_sin[start], self.weights, keys, values, start, self.n_heads,
                               self.eps)
        return _scripted()(x, self.rotations[start], self.weights, keys, values, start, self.n_heads, self.eps)


def _supported(model: nn.Module) -> bool:
    """SphereAR's blocks as the engine computes them: fp32 on CPU, RMSNorm weights, no biases, no AdaLN."""
    norms = [model.emb_norm, model.norm, *(n for b in model.blocks for n in (b.norm1, b.norm2))]
    linears = [lin for b in model.blocks for lin in (b.attn.qkv, b.attn.proj, b.mlp.w13, b.mlp.w2)]
    return (model.rope.device.type == "cpu" and all(n.weight is not None for n in norms)
            and all(lin.bias is None and lin.weight.dtype == torch.float32 for lin in linears)
            and all(b.adaln is None for b in model.blocks) and model.emb_norm.weight.dtype == torch.float32
            and getattr(model, "_compiled_call_impl", None) is None)


def packed_decoder(model: nn.Module) -> PackedDecoder | None:
    """The model's PackedDecoder (cached on it, rebuilt after any weight changes), or None where the module
    path should run: not on CPU, not fp32, biases or AdaLN in the blocks, a compiled model."""
    if not _supported(model):
        return None
    return cached_by_weights(model, "_packed_decoder", (), lambda: PackedDecoder(model))
