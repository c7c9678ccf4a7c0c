"""Convert the authors' SphereAR checkpoints (`vae.pt`, `SphereAR_{B,L,H}.pt`, Hub repo guolinke/SphereAR)
into two spheregen checkpoint directories, `tokenizer/` and `ar/`.

File layout (the authors' train.py): `torch.save` of a dict with `model` (the full state dict:
`vae.*` keys for the frozen S-VAE beside the AR and head keys), `ema` (same keys; the authors' sampler
prefers it), `optimizer`, `epochs`, and a pickled `argparse.Namespace` under `args`; `vae.pt` holds only
`vae.*` keys under `model`. A bare state dict is accepted too. Every size is read from the tensors and
cross-checked against `args`; only the head counts are in no tensor: the S-VAE's follow from its RoPE table
(`freqs_cis`, head_dim / 2 pairs), the AR's are dim / 64 (the authors' heads are 64 wide), or `--heads`.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from spheregen.checkpoint import write_dir_atomically
from spheregen.errors import UserError
from spheregen.interop.safe_load import safe_load
from spheregen.models.ar import ARConfig, SphereAR
from spheregen.models.tokenizer import Tokenizer, TokenizerConfig

AUTHORS_HEAD_DIM = 64
# the published sizes (the authors' model.py factories, paper Sec. 4.1): args.model -> (dim, layers)
PUBLISHED = {"SphereAR-B": (768, 24), "SphereAR-L": (1024, 32), "SphereAR-H": (1280, 40)}
TOKENIZER_DIR, AR_DIR = "tokenizer", "ar"

# (authors' name, spheregen name) inside a transformer block, shared by the VAE's ViTs and the AR model
_BLOCK_PARTS = [("attention.wqkv", "attn.qkv"), ("attention.wo", "attn.proj"), ("feed_forward.w1", "mlp.w13"),
                ("feed_forward.w2", "mlp.w2"), ("attention_norm", "norm1"), ("ffn_norm", "norm2")]
_BLOCK_RULES = [(r"layers\.(\d+)\." + re.escape(a) + r"\.", r"blocks.\1." + b + ".") for a, b in _BLOCK_PARTS]
_VAE_RULES = [(r"encoder\.conv_in\.", "conv_in."),
              (r"encoder\.patchify\.0\.net\.(\d+)\.block\.", r"down.\1.main."),
              (r"encoder\.patchify\.0\.net\.(\d+)\.shortcut\.", r"down.\1.skip."),
              (r"(encoder|decoder)\.register_token\.weight", r"\1.registers"),
              *[(r"(encoder|decoder)\.layers\.(\d+)\." + re.escape(a) + r"\.", r"\1.blocks.\2." + b + ".")
                for a, b in _BLOCK_PARTS],
              (r"encoder\.norm\.", "enc_norm."),
              (r"encoder\.output\.", "enc_out."),
              (r"decoder\.conv_in\.1\.", "dec_conv."),
              (r"decoder\.unpatchify\.1\.net\.(\d+)\.block\.", r"up.\1.main."),
              (r"decoder\.unpatchify\.1\.net\.(\d+)\.shortcut\.", r"up.\1.skip."),
              (r"decoder\.unpatchify\.1\.net\.(\d+)\.block2\.", r"up.\1.block2."),
              (r"decoder\.conv_out\.", "conv_out."),
              (r"(quant_proj|post_quant_proj)\.", r"\1.")]
_AR_RULES = [*_BLOCK_RULES,
             (r"head\.net\.time_embed\.mlp\.", "head.time_embed."),
             (r"head\.net\.(cond_embed|input_proj)\.", r"head.\1."),
             (r"head\.net\.res_blocks\.(\d+)\.norm\.", r"head.blocks.\1.norm."),
             (r"head\.net\.res_blocks\.(\d+)\.w1\.", r"head.blocks.\1.mlp.w13."),
             (r"head\.net\.res_blocks\.(\d+)\.w2\.", r"head.blocks.\1.mlp.w2."),
             (r"head\.net\.ada_ln_blocks\.", "head.adaln."),
             (r"head\.net\.final_layer\.ada_ln_modulation\.", "head.final_adaln."),
             (r"head\.net\.final_layer\.linear\.", "head.final_proj."),
             (r"(cls_embedding|proj_in|emb_norm|norm|pos_for_diff)\.", r"\1.")]
# buffers the authors save that spheregen recomputes: checked against ours, not loaded
_VAE_BUFFERS = ("encoder.freqs_cis", "decoder.freqs_cis")


def rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    """The spheregen name of an authors' key (the first rule that matches its start), None if none does."""
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return m.expand(repl) + key[m.end():]
    return None


@dataclass
class AuthorsCheckpoint:
    """The pieces of an authors' file: the chosen weights, split into VAE and AR parts, and its args."""

    vae: dict[str, torch.Tensor]
    ar: dict[str, torch.Tensor]
    args: dict
    weights: str  # "ema", "model" or "state_dict"


def split_state(raw: object, weights: str, path: str) -> AuthorsCheckpoint:
    """Pick `ema` (when present and asked) or `model` from an authors' dict, or take a bare state dict."""
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a {type(raw).__name__}, not a SphereAR checkpoint dict")
    args = vars(raw["args"]) if isinstance(raw.get("args"), argparse.Namespace) else dict(raw.get("args") or {})
    if "model" in raw and isinstance(raw["model"], dict):
        which = "ema" if weights == "ema" and isinstance(raw.get("ema"), dict) else "model"
        state = raw[which]
    elif all(isinstance(v, torch.Tensor) for v in raw.values()):
        which, state = "state_dict", raw
    else:
        raise UserError(f"{path} has neither a 'model' state dict nor only tensors (keys: {sorted(raw)[:6]}); "
                        "is it a SphereAR checkpoint?")
    vae = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
    ar = {k: v for k, v in state.items() if not k.startswith("vae.")}
    return AuthorsCheckpoint(vae, ar, args, which)


def load_authors_file(path: str | Path, weights: str = "ema") -> AuthorsCheckpoint:
    """Safe-load (weights_only, argparse.Namespace allowed) and split an authors' checkpoint file."""
    return split_state(safe_load(path), weights, str(path))


# -- sizes from the tensors ---------------------------------------------------------------------------
def _count(state: dict, pattern: str) -> int:
    return sum(1 for k in state if re.fullmatch(pattern, k))


def _need(state: dict, key: str, what: str) -> torch.Tensor:
    if key not in state:
        raise UserError(f"the {what} lacks the key {key!r}; is this a SphereAR checkpoint of the authors' code?")
    return state[key]


def _check_arg(args: dict, name: str, found: int, what: str) -> None:
    if name in args and args[name] is not None and int(args[name]) != found:
        raise UserError(f"the file's args.{name} = {args[name]}, but its tensors give {what} = {found}; "
                        "the file is inconsistent")


def tokenizer_config(vae: dict[str, torch.Tensor], args: dict) -> TokenizerConfig:
    """The S-VAE's sizes from its tensors: CNN channels, ViT width/depths, registers, latent d, image size."""
    what = "VAE state dict"
    stem = _need(vae, "encoder.conv_in.weight", what)
    stages = _count(vae, r"encoder\.patchify\.0\.net\.\d+\.shortcut\.weight")
    channels = [stem.shape[0]] + [vae[f"encoder.patchify.0.net.{i}.shortcut.weight"].shape[0] for i in range(stages)]
    width = _need(vae, "encoder.output.weight", what).shape[0]
    registers = vae["encoder.register_token.weight"].shape[0] if "encoder.register_token.weight" in vae else 0
    latent_dim = _need(vae, "post_quant_proj.weight", what).shape[1]
    if _need(vae, "quant_proj.weight", what).shape[0] != latent_dim + 1:
        raise UserError(f"quant_proj has {vae['quant_proj.weight'].shape[0]} outputs, not latent_dim + 1 = "
                        f"{latent_dim + 1} (mu and kappa): not a Power Spherical S-VAE")
    rope = vae.get("encoder.freqs_cis")
    head_dim = 2 * rope.shape[1] if rope is not None else AUTHORS_HEAD_DIM
    if rope is not None:
        side = math.isqrt(rope.shape[0] - registers)
        image_size = side * 2 ** stages
    else:
        image_size = int(args.get("image_size") or 256)
    _check_arg(args, "image_size", image_size, "image size")
    _check_arg(args, "latent_dim", latent_dim, "latent dim")
    if width % head_dim:
        raise UserError(f"the VAE width {width} is not a multiple of its RoPE head dim {head_dim}")
    return TokenizerConfig(
        image_size=image_size, in_channels=stem.shape[1], channels=tuple(channels), dim=width,
        enc_depth=_count(vae, r"encoder\.layers\.\d+\.attention\.wqkv\.weight"),
        dec_depth=_count(vae, r"decoder\.layers\.\d+\.attention\.wqkv\.weight"), n_heads=width // head_dim,
        mlp_hidden=_need(vae, "encoder.layers.0.feed_forward.w2.weight", what).shape[1], n_registers=registers,
        latent_dim=latent_dim, posterior="spherical", perceptual="none", disc_weight=0.0, decoder_conv_bias=False)


def ar_config(ar: dict[str, torch.Tensor], args: dict, heads: int | None = None) -> ARConfig:
    """The AR model's sizes from its tensors; the head count is dim / 64 (the authors') unless given."""
    what = "AR state dict"
    dim, token_dim = _need(ar, "proj_in.weight", what).shape
    n_layers = _count(ar, r"layers\.\d+\.attention\.wqkv\.weight")
    rows, width = _need(ar, "cls_embedding.weight", what).shape
    seq_len = _need(ar, "pos_for_diff.weight", what).shape[0]
    side = math.isqrt(seq_len)
    if side * side != seq_len or width % dim:
        raise UserError(f"pos_for_diff has {seq_len} positions (not a square grid) or cls_embedding width {width} "
                        f"is not a multiple of dim {dim}; not a SphereAR checkpoint")
    heads = heads or dim // AUTHORS_HEAD_DIM
    if heads < 1 or dim % heads or (dim // heads) % 4:
        raise UserError(f"{heads} heads do not divide the width {dim} into head dims divisible by 4; pass --heads")
    name = args.get("model")
    if name in PUBLISHED and PUBLISHED[name] != (dim, n_layers):
        raise UserError(f"args.model is {name} {PUBLISHED[name]}, but the tensors give dim {dim}, {n_layers} layers")
    _check_arg(args, "cls_token_num", width // dim, "class tokens")
    _check_arg(args, "num_classes", rows - 1, "classes")
    _check_arg(args, "latent_dim", token_dim, "latent dim")
    head_width = _need(ar, "head.net.input_proj.weight", what).shape[0]
    return ARConfig(
        token_dim=token_dim, grid=(side, side), radius=math.sqrt(token_dim), num_classes=rows - 1,
        tokenizer=f"../{TOKENIZER_DIR}", dim=dim, n_layers=n_layers, n_heads=heads,
        mlp_hidden=_need(ar, "layers.0.feed_forward.w2.weight", what).shape[1], n_cls_tokens=width // dim,
        head_depth=_count(ar, r"head\.net\.res_blocks\.\d+\.norm\.weight"), head_width=head_width,
        head_adaln=_count(ar, r"head\.net\.ada_ln_blocks\.\d+\.weight"), first_token="independent")


# -- key mapping and the strict load ------------------------------------------------------------------
def map_state(model: torch.nn.Module, state: dict[str, torch.Tensor], rules: list[tuple[str, str]],
              label: str, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Rename every key to spheregen's; a key of either side without a partner, or a shape mismatch, is a
    one-line UserError naming it (the strict load)."""
    expected = model.state_dict()
    mapped, source = {}, {}
    for key, tensor in state.items():
        if key in skip:
            continue
        new = rename(key, rules)
        if new is None or new not in expected:
            raise UserError(f"{label}: unexpected key {prefix}{key} (no place for it in spheregen's model); "
                            "the file is not a SphereAR checkpoint this converter knows")
        mapped[new], source[new] = tensor, prefix + key
    for key, ref in expected.items():
        if key not in mapped:
            raise UserError(f"{label}: missing key for {key} (the authors' file lacks it); the file is incomplete")
        if tuple(mapped[key].shape) != tuple(ref.shape):
            raise UserError(f"{label}: {source[key]} has shape {tuple(mapped[key].shape)}, spheregen's {key} expects "
                            f"{tuple(ref.shape)}; pass --heads or check the file")
    return mapped


def check_rope_tables(tokenizer: Tokenizer, vae: dict[str, torch.Tensor]) -> None:
    """The authors' saved RoPE tables (cos, sin per rotated pair) must equal the angles spheregen computes."""
    for name in _VAE_BUFFERS:
        table = vae.get(name)
        if table is None or table.is_meta:
            continue
        vit = getattr(tokenizer, name.split(".")[0])
        angles = vit.rope_table(tokenizer.grid).to(table.dtype)
        ours = torch.stack([angles.cos(), angles.sin()], dim=-1)
        if ours.shape != table.shape or not torch.allclose(ours, table, atol=1e-5):
            raise UserError(f"the file's {name} differs from spheregen's 2D RoPE for this size; "
                            "the converter does not know this variant of the S-VAE")


def build_tokenizer(ckpt: AuthorsCheckpoint, device: str | torch.device = "cpu", label: str = "") -> Tokenizer:
    """The S-VAE as a spheregen Tokenizer holding the authors' weights ("meta": keys and shapes only)."""
    with torch.device(device):
        tokenizer = Tokenizer(tokenizer_config(ckpt.vae, ckpt.args))
    state = map_state(tokenizer, ckpt.vae, _VAE_RULES, label, "vae.", skip=_VAE_BUFFERS)
    if torch.device(device).type != "meta":
        tokenizer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        check_rope_tables(tokenizer, ckpt.vae)
    return tokenizer.eval()


def build_models(ckpt_vae: AuthorsCheckpoint, ckpt_ar: AuthorsCheckpoint, heads: int | None = None,
                 device: str | torch.device = "cpu", label: str = "") -> tuple[Tokenizer, SphereAR]:
    """Tokenizer and AR model holding the authors' weights ("meta": keys and shapes only)."""
    tokenizer = build_tokenizer(ckpt_vae, device, label)
    ar_cfg, tok_cfg = ar_config(ckpt_ar.ar, ckpt_ar.args, heads), tokenizer.config
    if tuple(ar_cfg.grid) != tokenizer.grid or ar_cfg.token_dim != tok_cfg.latent_dim:
        raise UserError(f"the VAE gives a {tokenizer.grid} grid of {tok_cfg.latent_dim}-d tokens, the AR "
                        f"model expects {tuple(ar_cfg.grid)} of {ar_cfg.token_dim}; use the matching vae.pt")
    with torch.device(device):
        model = SphereAR(ar_cfg)
    state = map_state(model, ckpt_ar.ar, _AR_RULES, label)
    if torch.device(device).type != "meta":
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return tokenizer, model.eval()


# -- writing ------------------------------------------------------------------------------------------
def load_pair(ar_path: Path, vae_path: Path | None = None, weights: str = "ema", heads: int | None = None,
              label: str | None = None, sibling=None) -> tuple[Tokenizer, SphereAR | None, dict]:
    """The converted tokenizer and AR model, and a record of where they came from. The VAE keys come from
    `vae_path` when given, else from the AR file's `vae.*` keys, else from `sibling("vae.pt")`. A file with
    only VAE keys (the authors' vae.pt) gives the tokenizer alone (AR model None)."""
    label = label or str(ar_path)
    ckpt_ar = load_authors_file(ar_path, weights)
    if vae_path is None and not ckpt_ar.vae and sibling is not None:
        vae_path = sibling("vae.pt")
    ckpt_vae = load_authors_file(vae_path, "model") if vae_path else ckpt_ar
    if not ckpt_vae.vae:
        raise UserError(f"{label} holds no vae.* keys and no vae.pt was found beside it; pass the authors' "
                        "vae.pt with --vae")
    origin = {"converted_from": {"ar": label, "vae": str(vae_path or label), "weights": ckpt_ar.weights,
                                 "args": _plain(ckpt_ar.args)}}
    if not ckpt_ar.ar:
        return build_tokenizer(ckpt_vae, label=label), None, origin
    tokenizer, model = build_models(ckpt_vae, ckpt_ar, heads, label=label)
    return tokenizer, model, origin


def _plain(args: dict) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in args.items()}


def write_converted(out_dir: Path, parts: tuple[Tokenizer, SphereAR | None, dict]) -> Path:
    """out_dir/tokenizer and out_dir/ar (whose config points at ../tokenizer); returns the generator's
    directory, out_dir/ar (out_dir/tokenizer when there is no AR model)."""
    tokenizer, model, origin = parts
    tokenizer.save_pretrained(out_dir / TOKENIZER_DIR, extra=origin)
    if model is None:
        return out_dir / TOKENIZER_DIR
    model.save_pretrained(out_dir / AR_DIR, extra=origin)
    return out_dir / AR_DIR


def convert(ar_path: str | Path, out: str | Path, vae_path: str | Path | None = None, weights: str = "ema",
            heads: int | None = None, label: str | None = None, sibling=None) -> Path:
    """Convert into `out` as one atomic directory (a kill leaves no half conversion); returns out/ar
    (out/tokenizer for a VAE-only file)."""
    parts = load_pair(Path(ar_path), Path(vae_path) if vae_path else None, weights, heads, label, sibling)
    written = []
    write_dir_atomically(Path(out), lambda tmp: written.append(write_converted(tmp, parts)))
    return Path(out) / written[0].name


def convert_for_cache(source: Path, out_dir: Path, sibling) -> Path:
    """hub.py's entry (EMA weights, dim / 64 heads): convert `source` into out_dir; returns out_dir/ar, or
    out_dir/tokenizer for the authors' vae.pt."""
    return write_converted(out_dir, load_pair(source, sibling=sibling))


