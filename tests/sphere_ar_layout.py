"""The key and shape layout of the authors' SphereAR checkpoints, written from the rules read off their files
(research/sphereAR_code.md Sec. 2-4, the fixture README): tensors on the meta device, so the B / L / H
sizes cost no memory. Used to check that the converter covers every key of every size."""

from __future__ import annotations

import math

import torch

# SphereAR-B/L/H: (dim, layers, head depth, shared AdaLN linears); the head is as wide as the transformer
SIZES = {"B": (768, 24, 6, 2), "L": (1024, 32, 8, 2), "H": (1280, 40, 12, 3)}
PAPER_VAE = dict(channels=(64, 64, 128, 256, 512), width=512, enc_depth=6, dec_depth=12, registers=4, head_dim=64)


def _ffn_hidden(dim: int) -> int:
    return 256 * math.ceil(int(8 * dim / 3) / 256)


def _t(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def _block(prefix: str, dim: int) -> dict[str, torch.Tensor]:
    h = _ffn_hidden(dim)
    return {f"{prefix}.attention.wqkv.weight": _t(3 * dim, dim), f"{prefix}.attention.wo.weight": _t(dim, dim),
            f"{prefix}.feed_forward.w1.weight": _t(2 * h, dim), f"{prefix}.feed_forward.w2.weight": _t(dim, h),
            f"{prefix}.attention_norm.weight": _t(dim), f"{prefix}.ffn_norm.weight": _t(dim)}


def _linear(prefix: str, n_out: int, n_in: int, bias: bool = True) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.weight": _t(n_out, n_in)}
    if bias:
        out[f"{prefix}.bias"] = _t(n_out)
    return out


def _gn(prefix: str, c: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": _t(c), f"{prefix}.bias": _t(c)}


def ar_state(dim: int, layers: int, head_depth: int, head_adaln: int, cls_tokens: int = 16,
             num_classes: int = 1000, latent_dim: int = 16, grid: int = 16) -> dict[str, torch.Tensor]:
    """The AR part (no vae.* keys) of an authors' state dict."""
    s = {"cls_embedding.weight": _t(num_classes + 1, cls_tokens * dim), **_linear("proj_in", dim, latent_dim),
         "emb_norm.weight": _t(dim), "norm.weight": _t(dim), "pos_for_diff.weight": _t(grid * grid, dim)}
    for i in range(layers):
        s.update(_block(f"layers.{i}", dim))
    w, net = dim, "head.net"
    s.update({**_linear(f"{net}.time_embed.mlp.0", w, 256), **_linear(f"{net}.time_embed.mlp.2", w, w),
              **_linear(f"{net}.cond_embed", w, dim), **_linear(f"{net}.input_proj", w, latent_dim)})
    for i in range(head_depth):
        hidden = int(1.5 * w)
        s.update({**_gn(f"{net}.res_blocks.{i}.norm", w), **_linear(f"{net}.res_blocks.{i}.w1", 2 * hidden, w),
                  **_linear(f"{net}.res_blocks.{i}.w2", w, hidden)})
    for i in range(head_adaln):
        s.update(_linear(f"{net}.ada_ln_blocks.{i}", 3 * w, w))
    s.update({**_linear(f"{net}.final_layer.ada_ln_modulation", 2 * w, w),
              **_linear(f"{net}.final_layer.linear", latent_dim, w)})
    return s


def _vit(prefix: str, width: int, depth: int, registers: int, tokens: int, head_dim: int) -> dict:
    s = {f"{prefix}.freqs_cis": _t(registers + tokens, head_dim // 2, 2)}
    if registers:
        s[f"{prefix}.register_token.weight"] = _t(registers, width)
    for i in range(depth):
        s.update(_block(f"{prefix}.layers.{i}", width))
    return s


def vae_state(image_size: int = 256, channels=PAPER_VAE["channels"], width: int = 512, enc_depth: int = 6,
              dec_depth: int = 12, registers: int = 4, head_dim: int = 64, latent_dim: int = 16) -> dict:
    """The vae.* keys of an authors' state dict (freqs_cis buffers included, as they save them)."""
    stages = len(channels) - 1
    tokens = (image_size // 2 ** stages) ** 2
    s = {"encoder.conv_in.weight": _t(channels[0], 3, 3, 3)}
    for i in range(stages):
        cin, cout, p = channels[i], channels[i + 1], f"encoder.patchify.0.net.{i}"
        s.update({**_gn(f"{p}.block.0", cin), f"{p}.block.2.weight": _t(cout, cin, 3, 3), **_gn(f"{p}.block.3", cout),
                  f"{p}.block.5.weight": _t(cout, cout, 3, 3), f"{p}.shortcut.weight": _t(cout, cin, 2, 2)})
    s.update(_vit("encoder", width, enc_depth, registers, tokens, head_dim))
    s.update({"encoder.norm.weight": _t(width), **_linear("encoder.output", width, width, bias=False),
              **_linear("quant_proj", latent_dim + 1, width), **_linear("post_quant_proj", width, latent_dim, False),
              "decoder.conv_in.1.weight": _t(width, width, 3, 3)})
    s.update(_vit("decoder", width, dec_depth, registers, tokens, head_dim))
    rev = channels[::-1]
    for i in range(stages):
        cin, cout, p = rev[i], rev[i + 1], f"decoder.unpatchify.1.net.{i}"
        s.update({**_gn(f"{p}.block.0", cin), f"{p}.block.2.weight": _t(cin, cout, 4, 4), **_gn(f"{p}.block.3", cout),
                  f"{p}.block.5.weight": _t(cout, cout, 3, 3), f"{p}.shortcut.weight": _t(cin, cout, 2, 2)})
        for j in (0, 3):
            s.update(_gn(f"{p}.block2.{j}", cout))
        for j in (2, 5):
            s[f"{p}.block2.{j}.weight"] = _t(cout, cout, 3, 3)
    s.update({**_gn("decoder.conv_out.0", channels[0]), "decoder.conv_out.2.weight": _t(3, channels[0], 3, 3)})
    return {f"vae.{k}": v for k, v in s.items()}


def parameter_count(state: dict[str, torch.Tensor]) -> int:
    """Parameters only: the saved RoPE tables are buffers."""
    return sum(v.numel() for k, v in state.items() if not k.endswith("freqs_cis"))
