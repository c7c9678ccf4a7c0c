"""The flow head's state path for the CPU sampler (issue 20; paper App. G: the head is the bottleneck).

A solver step of `FlowHead.trunk` runs ~10 small matrix products on 2B rows. On a CPU two things dominate:
the products themselves, and torch's per-call overhead around them (`nn.Linear` hands MKL a transposed weight
view, which is ~25% slower at these sizes than a contiguous [in, out] copy). `PackedTrunk` lays the weights out
once per set of weights and runs the same math with fewer, faster calls:

- fp32: every product is `addmm(bias, x, W^T)` on a contiguous W^T, bitwise equal to `F.linear(x, W, bias)`;
- bf16 (the authors' sampling precision, their networks run under bf16 autocast): the weights are prepacked
  for oneDNN once, so each product is one oneDNN call in bf16 (AMX / AVX512-BF16 where the CPU has them);
  the residual stream, LayerNorms, modulations, guidance and solver stay in fp32;
- guidance on the last hidden state: the output layer is affine, so
  W (h_null + s (h_cond - h_null)) + b = v_null + s (v_cond - v_null), and the output product runs on B rows.

`packed_trunk(head, dtype)` returns the cached packing, rebuilt when any weight changes (in-place updates bump
a tensor's version), or None where the module path is the better one (CUDA, a compiled head, fp16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mkldnn_bf16() -> bool:
    """Whether this torch can run prepacked oneDNN bf16 products on this CPU."""
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


class PackedLinear:
    """y = x W^T + b for one nn.Linear, laid out for repeated small-batch calls (see the module docstring)."""

    def __init__(self, layer: nn.Linear, dtype: torch.dtype, rows: int):
        w, b = layer.weight.detach(), layer.bias.detach()
        if dtype == torch.bfloat16 and min(w.shape) < 64:
            dtype = torch.float32  # a oneDNN call costs ~20 us whatever its size: tiny products stay fp32
        self.onednn = dtype == torch.bfloat16 and _mkldnn_bf16()
        if self.onednn:  # oneDNN's blocked layout, chosen for `rows`-row inputs (any row count works)
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype).contiguous(), rows)
            self.bias = b.to(dtype).contiguous()
        else:
            self.weight, self.bias = w.to(dtype).t().contiguous(), b.to(dtype)  # W^T [in, out]
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] -> [M, out] in self.dtype."""
        x = x.to(self.dtype)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return torch.addmm(self.bias, x, self.weight)


class PackedTrunk:
    """`FlowHead.trunk` followed by classifier-free guidance, on packed weights."""

    def __init__(self, head: nn.Module, dtype: torch.dtype, rows: int):
        self.width, self.eps, self.per = head.width, head.final_norm.eps, head.depth // head.n_adaln
        self.hidden = head.blocks[0].mlp.w2.in_features
        self.input_proj = PackedLinear(head.input_proj, dtype, rows)
        self.blocks = [(blk.norm.weight.detach(), blk.norm.bias.detach(), PackedLinear(blk.mlp.w13, dtype, rows),
                        PackedLinear(blk.mlp.w2, dtype, rows)) for blk in head.blocks]
        self.final_proj = PackedLinear(head.final_proj, dtype, rows)

    def __call__(self, x: torch.Tensor, mods: tuple[torch.Tensor, ...], scale: float | None) -> torch.Tensor:
        """Velocity [N, d] (fp32) of state x [N, d] under the K modulations [*rows, N, C] (rows = (2,) for the
        cond and null rows of CFG, sharing x, combined with guidance `scale`; () without guidance)."""
        C, H = self.width, self.hidden
        z = self.input_proj(x).float()  # [N, C], shared by the CFG rows
        for i, (ln_w, ln_b, w13, w2) in enumerate(self.blocks):
            j = 3 * (i // self.per)
            h = torch.addcmul(mods[j + 1], F.layer_norm(z, (C,), ln_w, ln_b, self.eps), mods[j])  # [*rows, N, C]
            u = w13(h.reshape(-1, C))  # [rows * N, 2 H]: SwiGLU's two inputs side by side
            z = torch.addcmul(z, mods[j + 2], w2(F.silu(u[:, :H]).mul_(u[:, H:])).view(h.shape))
        h = torch.addcmul(mods[-1], F.layer_norm(z, (C,), eps=self.eps), mods[-2]).float()
        if scale is not None:  # guidance before the affine output layer: equal to guiding the velocities
            h = torch.lerp(h[1], h[0], scale)  # [2, N, C] -> [N, C]
        return self.final_proj(h).float()


def packed_trunk(head: nn.Module, dtype: torch.dtype, rows: int) -> PackedTrunk | None:
    """The head's PackedTrunk for `dtype` (cached on the head, rebuilt after any weight changes), or None
    where the module path should run: not on CPU, a compiled head, or a dtype other than fp32 / bf16."""
    params = list(head.parameters())
    if dtype not in (torch.float32, torch.bfloat16) or params[0].device.type != "cpu" \
            or getattr(head, "_compiled_call_impl", None) is not None:
        return None
    key = (dtype, tuple((p.data_ptr(), p._version) for p in params))
    cached = head.__dict__.get("_packed_trunk")
    if cached is None or cached[0] != key:
        cached = (key, PackedTrunk(head, dtype, rows))
        head.__dict__["_packed_trunk"] = cached  # a plain attribute: never saved, never a submodule
    return cached[1]
