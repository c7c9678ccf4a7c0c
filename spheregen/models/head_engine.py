"""The flow head's state path for the CPU sampler (issue 20; paper App. G: the head is the bottleneck).

A solver step of `FlowHead.trunk` runs ~10 small matrix products and ~25 small elementwise ops on 2B rows.
On a CPU three costs dominate: the products, the per-op overhead of calling them from Python, and the
transposed weight views `nn.Linear` hands to MKL (~25% slower at these sizes than a contiguous [in, out]
copy). `PackedTrunk` lays the weights out once per set of weights and runs the same math leaner:

- fp32: every product is `addmm(bias, x, W^T)` on a contiguous W^T: `F.linear(x, W, bias)` up to float
  rounding (bitwise at most sizes; MKL picks another kernel for a few small shapes);
- bf16 (the authors' sampling precision: their networks run under bf16 autocast): the ResBlocks' products
  are prepacked for oneDNN once, one oneDNN call each (AMX / AVX512-BF16 where the CPU has them); the tiny
  input and output products, the residual stream, LayerNorms, modulations, guidance and solver stay fp32;
- guidance on the last hidden state: the output layer is affine, so
  W (h_null + s (h_cond - h_null)) + b = v_null + s (v_cond - v_null), and the output product runs on B rows;
- `steps` runs whole chunks of solver steps x <- a x + b v(x) + c xi (Euler, Euler-Maruyama) as one
  TorchScript loop, so no Python runs between the ops of a token's solve (plain Python where TorchScript is
  missing: the same functions, eager).

In fp32 where the native kernel builds (models/kernels: `flow_steps.cpp`, compiled once per machine), the chunks
of solver steps and single evaluations run there instead: the same products through ATen, the elementwise work
between them fused per row in C++, and the batch rows split between the threads, each solving its rows alone
(no thread waits on another between the small ops). Otherwise the TorchScript functions here run.

`packed_trunk(head, dtype, rows)` returns the cached packing, rebuilt when any weight changes (in-place
updates bump a tensor's version), or None where the module path is the better one (CUDA, a compiled head,
fp16).
"""

from __future__ import annotations

import warnings
from typing import Callable, List, Optional, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from spheregen.models.kernels import native_op

T = TypeVar("T")


def _mkldnn_bf16() -> bool:
    """Whether this torch can run prepacked oneDNN bf16 products on this CPU."""
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, onednn: bool) -> torch.Tensor:
    """x [M, in] -> x W^T + b [M, out] in b's dtype; w is W^T [in, out], or oneDNN's packing of W."""
    x = x.to(b.dtype)
    if onednn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", torch.jit.annotate(
            List[Optional[Union[int, float, complex]]], []), "")
    return torch.addmm(b, x, w)


def _trunk(x: torch.Tensor, m: torch.Tensor, weights: List[torch.Tensor], onednn: bool, per: int, hidden: int,
           eps: float, scale: Optional[float]) -> torch.Tensor:
    """FlowHead.trunk + guidance: state x [N, d], modulations m [K, *rows, N, C] (fp32) -> velocity [N, d] fp32.
    weights: [W_in^T, b_in, W_out^T, b_out] then per ResBlock [ln_w, ln_b, W13, b13, W2, b2]."""
    C = weights[0].shape[1]
    z = torch.addmm(weights[1], x, weights[0])  # [N, C], shared by the CFG rows
    for k in range((len(weights) - 4) // 6):
        ln_w, ln_b, w13, b13, w2, b2 = weights[4 + 6 * k:10 + 6 * k]
        j = 3 * (k // per)
        h = torch.addcmul(m[j + 1], F.layer_norm(z, [C], ln_w, ln_b, eps), m[j])  # [*rows, N, C]
        u = _linear(h.reshape(-1, C), w13, b13, onednn)  # [rows * N, 2 H]: SwiGLU's two inputs side by side
        g = F.silu(u[:, :hidden]).mul_(u[:, hidden:])
        z = torch.addcmul(z, m[j + 2], _linear(g, w2, b2, onednn).view(h.shape))
    h = torch.addcmul(m[-1], F.layer_norm(z, [C], None, None, eps), m[-2])
    if scale is not None:  # guidance before the affine output layer: equal to guiding the velocities
        h = torch.lerp(h[1], h[0], scale)  # [2, N, C] -> [N, C]
    return torch.addmm(weights[3], h, weights[2])


def _steps(x: torch.Tensor, mods: torch.Tensor, coefs: List[List[float]], noise: Optional[torch.Tensor],
           weights: List[torch.Tensor], onednn: bool, per: int, hidden: int, eps: float,
           scale: Optional[float]) -> torch.Tensor:
    """Solver steps x <- a x + b v(x) + c xi_i in place; mods [n, K, ...], coefs n x [a, b, c], noise [N, n, d]."""
    for i in range(len(coefs)):
        a, b, c = coefs[i][0], coefs[i][1], coefs[i][2]
        v = _trunk(x, mods[i], weights, onednn, per, hidden, eps, scale)
        if a != 1.0:
            x.mul_(a)
        x.add_(v, alpha=b)
        if c != 0.0 and noise is not None:
            x.add_(noise[:, i], alpha=c)
    return x


_COMPILED: dict = {}


def _scripted() -> tuple:
    """(trunk, steps): TorchScript'ed once per process, or the eager functions where scripting fails."""
    if not _COMPILED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.script is deprecated, still the leanest CPU loop here
                _COMPILED["fns"] = (torch.jit.script(_trunk), torch.jit.script(_steps))
        except Exception:  # noqa: BLE001 - any scripting failure: run the same math eagerly
            _COMPILED["fns"] = (_trunk, _steps)
    return _COMPILED["fns"]


class PackedTrunk:
    """`FlowHead.trunk` followed by classifier-free guidance, on packed weights (see the module docstring)."""

    def __init__(self, head: nn.Module, dtype: torch.dtype, rows: int):
        self.per, self.eps = head.depth // head.n_adaln, head.final_norm.eps
        self.hidden = head.blocks[0].mlp.w2.in_features
        self.onednn = dtype == torch.bfloat16 and _mkldnn_bf16()
        self.kernel = native_op("flow_steps") if dtype == torch.float32 else None  # the native fp32 loop, where built
        block_dtype = dtype if dtype == torch.bfloat16 else torch.float32

        def pack(w: torch.Tensor, b: torch.Tensor, onednn: bool, dt: torch.dtype) -> list[torch.Tensor]:
            w, b = w.detach().to(dt), b.detach().to(dt)
            if onednn:  # oneDNN's blocked layout, chosen for `rows`-row inputs (any row count works)
                return [torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows), b.contiguous()]
            return [w.t().contiguous(), b]  # W^T [in, out]

        fp32, onednn = torch.float32, self.onednn
        self.weights = pack(head.input_proj.weight, head.input_proj.bias, False, fp32) + \
            pack(head.final_proj.weight, head.final_proj.bias, False, fp32)
        for blk in head.blocks:
            w13, w2 = blk.mlp.w13, blk.mlp.w2
            self.weights += [blk.norm.weight.detach(), blk.norm.bias.detach(),
                             *pack(w13.weight, w13.bias, onednn, block_dtype),
                             *pack(w2.weight, w2.bias, onednn, block_dtype)]
        # the AdaLN linears stacked, the 1s of (1 + scale) in the bias: the table product (FlowHead.modulations)
        layers = [*head.adaln, head.final_adaln]
        self.mod_shape = tuple(head.scale_one.shape)  # (K, C)
        self.mod_weights = pack(torch.cat([a.weight for a in layers]),
                                torch.cat([a.bias for a in layers]) + head.scale_one.flatten(), onednn, block_dtype)

    def modulations(self, y: torch.Tensor) -> torch.Tensor:
        """The AdaLN outputs of y = SiLU(t_emb + c_emb) [e, *rows, C] as fp32 [e, K, *rows, C], each step's K
        slices contiguous (FlowHead.modulations' numbers, laid out for the solver)."""
        with torch.autocast(y.device.type, enabled=False):
            out = _linear(y.reshape(-1, y.shape[-1]), *self.mod_weights, self.onednn).float()  # [e * rows, K * C]
        table = out.view(*y.shape[:-1], *self.mod_shape).movedim(-2, 1)  # -> [e, K, *rows, C]
        return table if self.kernel is not None else table.contiguous()  # the kernel reads any strides

    def __call__(self, x: torch.Tensor, mods: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Velocity [N, d] (fp32) of state x [N, d] under the modulations [K, *rows, N, C] (rows = (2,): the
        cond and null rows of CFG, sharing x, combined with guidance `scale`; (): no guidance)."""
        if self.kernel is not None:  # one step x <- 0 x + 1 v(x): the velocity
            return self.steps(x.clone(), mods.unsqueeze(0), [(0.0, 1.0, 0.0)], None, scale)
        with torch.autocast(x.device.type, enabled=False):  # the engine casts for itself
            return _scripted()[0](x, mods.contiguous(), self.weights, self.onednn, self.per, self.hidden, self.eps,
                                  scale)

    def steps(self, x: torch.Tensor, mods: torch.Tensor, coefs: list[tuple[float, float, float]],
              noise: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        """len(coefs) solver steps x <- a x + b v(x) + c noise[:, i] on the modulations mods [n, K, ...]."""
        if self.kernel is not None:  # mods [n, K, R, N, C]: R = 2 (cond, null) with guidance, R = 1 without
            table = mods if scale is not None else mods.unsqueeze(2)
            return self.kernel(x.float().contiguous(), table, [v for step in coefs for v in step], noise,
                               self.weights, self.per, self.hidden, self.eps, scale)
        with torch.autocast(x.device.type, enabled=False):
            return _scripted()[1](x, mods.contiguous(), [list(c) for c in coefs], noise, self.weights, self.onednn,
                                  self.per, self.hidden, self.eps, scale)


def packed_trunk(head: nn.Module, dtype: torch.dtype, rows: int) -> PackedTrunk | None:
    """The head's PackedTrunk for `dtype` (cached on the head, rebuilt after any weight changes), or None
    where the module path should run: not on CPU, a compiled head, or a dtype other than fp32 / bf16."""
    params = list(head.parameters())
    if dtype not in (torch.float32, torch.bfloat16) or params[0].device.type != "cpu" \
            or getattr(head, "_compiled_call_impl", None) is not None:
        return None
    return cached_by_weights(head, "_packed_trunk", (dtype,), lambda: PackedTrunk(head, dtype, rows))


def cached_by_weights(module: nn.Module, attr: str, extra: tuple, build: Callable[[], T]) -> T:
    """build(), cached on the module under `attr` (a plain attribute: never saved, never a submodule), made again
    when `extra` differs or any parameter's storage or version changes (in-place updates bump the version)."""
    key = (extra, tuple((p.data_ptr(), p._version) for p in module.parameters()))
    cached = module.__dict__.get(attr)
    if cached is None or cached[0] != key:
        cached = (key, build())
        module.__dict__[attr] = cached
    return cached[1]
