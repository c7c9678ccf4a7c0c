"""`spheregen convert sphere-encoder`: the Sphere Encoder authors' checkpoints -> spheregen checkpoint directories.

The authors' experiment folder is `<job>/{cfg.json, ckpt/epNNNN.pth}`; the .pth holds
`{"model": state_dict, "epoch": int, "ema_model": state_dict}` and nothing names the architecture, so it comes
from cfg.json (`token_channels` -> latent channels, `noise_sigma_max_angle` -> alpha, `vit_enc/dec_model_size`
-> width / depth / heads through the authors' size table or `--size`, the mixer depths, `pixel_head_type`,
`cond_generator` and `num_classes`) plus the tensor shapes (image channels, conv-head channels).

Their layout differs from ours by permutations only, which the converter applies (checked on the reference
fixture to ~1e-6):
- RoPE: their q/k head channels rotate with the row in the first half and the column in the second (ours:
  column first), so the q and k rows of every head swap halves (q.k is unchanged by a common permutation);
- unpatchify: their head writes channels in (c, p1, p2) order, ours (p1, p2, c): the head's rows are permuted;
- positions: their fixed sin-cos table is ours with the column half first (config `pos_order = "col_row"`),
  checked against the stored `pos_embed`; the EMA's `rope` buffers are checked against the head count.
Conv weights are stored channels_last (non-contiguous) and mixer gates as [1]; both are normalised.
The file is read with `safe_load` only (torch.load weights_only=True; no extra classes are needed).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import torch

from spheregen.errors import UserError
from spheregen.interop.safe_load import safe_load
from spheregen.layers import grid_positions, rope_angles
from spheregen.models.sphere_encoder import SphereEncoder
from spheregen.models.sphere_encoder_nets import SphereEncoderConfig, pos_table

# The authors' ViT sizes, (width, layers, heads) per `vit_*_model_size` name (paper Sec. 3 and the authors'
# size table: S (512, 8, 8), B (768, 12, 12), L (1024, 24, 16), XL (1152, 28, 16)). Other names: --size NAME=W,L,H or
# $SPHEREGEN_SPHERE_ENCODER_SIZES="NAME=W,L,H;...". The head count cannot be read from the weights.
SIZE_TABLE: dict[str, tuple[int, int, int]] = {
    "small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16), "xlarge": (1152, 28, 16),
}
SIZES_ENV = "SPHEREGEN_SPHERE_ENCODER_SIZES"
WEIGHTS = {"model": "model", "ema": "ema_model"}
# authors' key pattern -> ours (applied in order, after the decoder head, which is mapped by position)
RENAMES = [
    (r"^(encoder|decoder)\.y_embedder\.embedding_table\.", r"\1.labels.table."),
    (r"^encoder\.x_embedder\.0\.", "encoder.patch."), (r"^encoder\.x_embedder\.1\.", "encoder.proj."),
    (r"^decoder\.x_embedder\.0\.", "decoder.inp."), (r"^decoder\.x_embedder\.1\.", "decoder.mixer."),
    (r"^encoder\.out\.", "encoder.mixer."), (r"\.ffn\.", ".out."), (r"\.adaLN_modulation\.", ".adaln."),
    (r"\.tok_mixer\.mix\.", ".token_mlp."), (r"\.chn_mixer\.mix\.", ".channel_mlp."),
    (r"\.mlp\.w12\.", ".mlp.w13."), (r"\.mlp\.w3\.", ".mlp.w2."),
]
FIXED = re.compile(r"^(encoder|decoder)\.(pos_embed|rope)$")


def parse_size(text: str) -> tuple[str, tuple[int, int, int]]:
    """'NAME=WIDTH,LAYERS,HEADS' -> (NAME, (W, L, H))."""
    name, _, spec = text.partition("=")
    try:
        w, layers, heads = (int(v) for v in spec.split(","))
    except ValueError:
        raise UserError(f"--size {text!r} must look like NAME=WIDTH,LAYERS,HEADS, e.g. large=1024,24,16") from None
    if not name or min(w, layers, heads) < 1:
        raise UserError(f"--size {text!r} must name a size and give positive WIDTH,LAYERS,HEADS")
    return name.strip(), (w, layers, heads)


def size_table(extra: list[str] | None = None) -> dict[str, tuple[int, int, int]]:
    """The authors' table, then $SPHEREGEN_SPHERE_ENCODER_SIZES, then --size entries (later ones win)."""
    table = dict(SIZE_TABLE)
    env = [t for t in os.environ.get(SIZES_ENV, "").split(";") if t.strip()]
    table.update(parse_size(t) for t in env + list(extra or []))
    return table


def read_cfg(path: Path) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the authors' cfg.json {path} ({type(e).__name__}); pass --config cfg.json")\
            from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not the authors' cfg.json (not a JSON object)")
    return cfg


def _get(cfg: dict, key: str):
    if key not in cfg:
        raise UserError(f"the authors' cfg.json has no {key!r}; it is needed to rebuild the model")
    return cfg[key]


def _size(cfg: dict, sizes: dict[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    enc, dec = _get(cfg, "vit_enc_model_size"), _get(cfg, "vit_dec_model_size")
    for name in (enc, dec):
        if name not in sizes:
            raise UserError(f"model size {name!r} is not in the authors' size table ({', '.join(SIZE_TABLE)}); "
                            f"pass --size {name}=WIDTH,LAYERS,HEADS to `spheregen convert sphere-encoder` "
                            f"(or set {SIZES_ENV}={name}=WIDTH,LAYERS,HEADS)")
    if sizes[enc] != sizes[dec]:
        raise UserError(f"encoder size {enc} {sizes[enc]} differs from decoder size {dec} {sizes[dec]}; spheregen "
                        "builds E and D at one size")
    return sizes[enc]


def model_config(cfg: dict, state: dict[str, torch.Tensor], sizes: dict) -> SphereEncoderConfig:
    """Our config from the authors' cfg.json (and image / conv-head channels from the tensor shapes)."""
    for key in ("spherify_model", "halve_model_size"):
        if cfg.get(key):
            raise UserError(f"cfg.json sets {key} = true, which this converter does not support")
    if cfg.get("in_context_size", 0):
        raise UserError("cfg.json sets in_context_size > 0 (in-context tokens), which spheregen does not build")
    width, depth, heads = _size(cfg, sizes)
    head = _get(cfg, "pixel_head_type")
    if head not in ("linear", "conv"):
        raise UserError(f"pixel_head_type {head!r} is not supported (linear or conv)")
    alpha = float(_get(cfg, "noise_sigma_max_angle"))
    max_angle = float(cfg.get("mix_hard_cases_max_angle", alpha + 5))
    conditional = bool(_get(cfg, "cond_generator"))  # num_classes is set even for unconditional runs
    head_w = state.get("decoder.ffn.linear.weight")
    return SphereEncoderConfig(
        image_size=int(_get(cfg, "image_size")), channels=int(state["encoder.x_embedder.0.weight"].shape[1]),
        num_classes=int(_get(cfg, "num_classes")) if conditional else 0, patch_size=int(_get(cfg, "patch_size")),
        latent_dim=int(_get(cfg, "token_channels")), width=width, depth=depth, heads=heads,
        mixer_depth=int(_get(cfg, "vit_enc_latent_mlp_mixer_depth")),
        dec_mixer_depth=int(_get(cfg, "vit_dec_latent_mlp_mixer_depth")), head=head,
        conv_head_channels=int(head_w.shape[0]) if head == "conv" and head_w is not None else 32,
        attn_proj_bias=True, uncond_head_norm=False, head_residual=False, conv_head_authors=True,
        pos_order="col_row", alpha_deg=alpha,
        mix_prob=float(cfg.get("mix_hard_cases_prob", 0.1)) if cfg.get("mix_hard_cases", True) else 0.0,
        mix_extra_deg=max(max_angle - alpha, 0.0), mix_max_deg=max(89.0, max_angle),
        w_recon_dist=float(cfg.get("pix_recon_dist_loss_weight", 1.0)),
        w_recon_perc=float(cfg.get("pix_recon_perc_loss_weight", 1.0)),
        w_con_dist=float(cfg.get("pix_con_dist_loss_weight", 0.5)),
        w_con_perc=float(cfg.get("pix_con_perc_loss_weight", 0.5)),
        w_lat_con=float(cfg.get("lat_con_loss_weight", 0.1)), enc_lr_scale=float(cfg.get("encoder_lr_scaler", 0.1)))


def rope_perm(head_dim: int) -> torch.Tensor:
    """Our q/k channel i takes their channel perm[i]: the two halves (row / column pairs) swap."""
    return torch.arange(head_dim).roll(head_dim // 2)


def unpatchify_perm(patch: int, channels: int) -> torch.Tensor:
    """Our head row (p1, p2, c) takes their row (c, p1, p2)."""
    p1, p2, c = torch.meshgrid(torch.arange(patch), torch.arange(patch), torch.arange(channels), indexing="ij")
    return ((c * patch + p1) * patch + p2).flatten()


def _head_keys(state: dict[str, torch.Tensor], head: str) -> dict[str, str]:
    """decoder.out.I.* (their output Sequential) -> our refine (linear head) or conv, up (conv head), by order."""
    idx = sorted({int(m.group(1)) for k in state if (m := re.match(r"^decoder\.out\.(\d+)\.weight$", k))})
    names = ["refine"] if head == "linear" else ["conv", "up"]
    if len(idx) != len(names):
        found = ", ".join(f"decoder.out.{i}" for i in idx) or "none"
        raise UserError(f"the {head} pixel head should hold {len(names)} conv layer(s) under decoder.out, found "
                        f"{found}; is pixel_head_type in cfg.json right?")
    return {f"decoder.out.{i}.": f"decoder.{n}." for i, n in zip(idx, names)}


def rename(key: str, head_map: dict[str, str]) -> str:
    for theirs, ours in head_map.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    for pattern, repl in RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def check_fixed(state: dict[str, torch.Tensor], config: SphereEncoderConfig) -> None:
    """The stored sin-cos table must equal ours (pos_order col_row); the EMA's RoPE table fixes the head dim."""
    hd = config.width // config.heads
    angles = rope_angles(grid_positions(config.grid, config.grid, 0.0), hd, config.rope_theta)
    theirs = angles.repeat_interleave(2, dim=-1)[:, rope_perm(hd)]  # per-channel angle in their layout
    expect = {"pos_embed": pos_table(config), "rope": torch.cat([theirs.cos(), theirs.sin()], dim=-1)}
    for key, value in state.items():
        m = FIXED.match(key)
        if not m:
            continue
        ref = expect[m.group(2)]
        if m.group(2) == "rope" and value.shape[-1] != ref.shape[-1]:
            raise UserError(f"{key} is a RoPE table for head dim {value.shape[-1] // 2}, but {config.heads} heads of "
                            f"width {config.width} give head dim {hd}; pass --size NAME=WIDTH,LAYERS,HEADS")
        if value.numel() != ref.numel() or (value.reshape(ref.shape).float() - ref).abs().max() > 1e-4:
            raise UserError(f"{key} {tuple(value.shape)} is not the fixed table this converter expects for "
                            f"grid {config.grid} and width {config.width}; check the size and patch_size")


def convert_state(state: dict[str, torch.Tensor], config: SphereEncoderConfig) -> dict[str, torch.Tensor]:
    """The authors' state dict -> ours: renamed, contiguous, gates as scalars, RoPE and unpatchify permuted."""
    head_map = _head_keys(state, config.head)
    hd = config.width // config.heads
    perm = rope_perm(hd)
    check_fixed(state, config)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if FIXED.match(key):
            continue
        value = value.detach().contiguous().clone()
        if key.endswith((".alpha1", ".alpha2")) and value.numel() == 1:
            value = value.reshape(())
        if re.search(r"\.attn\.qkv\.", key) and value.shape[0] == 3 * config.width:
            q, k, v = value.chunk(3)
            heads_first = (config.heads, hd, *value.shape[1:])
            q, k = (t.reshape(heads_first)[:, perm].reshape(t.shape) for t in (q, k))
            value = torch.cat([q, k, v])
        if config.head == "linear" and key.startswith("decoder.ffn.linear."):
            value = value[unpatchify_perm(config.patch_size, config.channels)]
        new = rename(key, head_map)
        if new in out:
            raise UserError(f"two checkpoint keys map to {new}; the file is not a Sphere Encoder checkpoint")
        out[new] = value
    return out


def load_strict(model: SphereEncoder, state: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    """Load every key; a missing, unexpected or mis-shaped one is a one-line UserError naming it."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise UserError(f"unexpected key {names.get(key, key)} in the checkpoint (no place for it in a model "
                            "built from cfg.json); check the cfg.json and --size")
        if own[key].shape != value.shape:
            raise UserError(f"{names.get(key, key)} has shape {tuple(value.shape)} but the model built from "
                            f"cfg.json needs {tuple(own[key].shape)}; check the cfg.json and --size")
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise UserError(f"the checkpoint lacks {missing[0]} (spheregen name; {len(missing)} missing in all), "
                        "which the model built from cfg.json needs; check the cfg.json and --size")
    model.load_state_dict(state, strict=False)


def convert_file(pth: Path, cfg_path: Path, weights: str = "model", sizes: list[str] | None = None) -> SphereEncoder:
    """Read the authors' .pth (safely) and cfg.json; return our model holding `weights` (model or ema)."""
    ckpt = safe_load(pth, allow=())
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{pth} is not a Sphere Encoder checkpoint (no 'model' entry); pass the ckpt/epNNNN.pth "
                        "of the authors' experiment folder")
    entry = WEIGHTS[weights]
    if entry not in ckpt:
        raise UserError(f"{pth} has no {entry!r} weights; use --weights model")
    state = ckpt[entry]
    config = model_config(read_cfg(cfg_path), ckpt["model"], size_table(sizes))
    try:
        config.validate()
    except ValueError as e:
        raise UserError(f"cfg.json gives an invalid model: {e}") from None
    ours = convert_state(state, config)
    names = {rename(k, _head_keys(state, config.head)): k for k in state}
    model = SphereEncoder(config)
    load_strict(model, ours, names)
    return model.eval()


def _epoch_key(path: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", path.stem)
    return (int(digits[-1]) if digits else -1, path.name)


def experiment_files(folder: Path) -> tuple[Path, Path | None]:
    """(latest ckpt/*.pth, cfg.json or None) of the authors' experiment folder."""
    ckpts = sorted((folder / "ckpt").glob("*.pth"), key=_epoch_key) or sorted(folder.glob("*.pth"), key=_epoch_key)
    if not ckpts:
        raise UserError(f"{folder} holds no ckpt/*.pth; pass the authors' experiment folder or a .pth file")
    cfg = folder / "cfg.json"
    return ckpts[-1], cfg if cfg.is_file() else None


def find_cfg(sibling: Callable[[str], Path | None]) -> Path:
    """cfg.json beside the ckpt/ folder (the authors' layout), else beside the file."""
    cfg = sibling("../cfg.json") or sibling("cfg.json")
    if cfg is None:
        raise UserError("no cfg.json found beside the checkpoint's ckpt/ folder; convert it with `spheregen convert "
                        "sphere-encoder FILE.pth --config cfg.json --out DIR`")
    return cfg


def convert_for_cache(source: Path, out_dir: Path, sibling: Callable[[str], Path | None]) -> Path:
    """hub.py's entry for `hf:` paths and local .pth files: convert `model` into out_dir/sphere_encoder."""
    model = convert_file(Path(source), find_cfg(sibling), "model")
    target = Path(out_dir) / "sphere_encoder"
    model.save_pretrained(target, extra={"converted_from": str(source), "weights": "model"})
    return target


