"""Generating images from checkpoints: load a generator (any model type, an authors' file, an hf: path) with
its decoder, and sample seeded images in batches, in memory or to a directory of PNGs (resumable, sharded
over torchrun ranks).

A generator has `generate_images(labels [B], seeds: list[int], options) -> float [B, C, H, W] in [-1, 1]`
(options: the model's sampling settings, `ARSampling` or `SphereEncoderSampling`, or a dict of their fields)
and `num_classes` (0 = unconditional). Image k of a run uses seed `seed + k`, whatever the batch size.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from spheregen.checkpoint import CONFIG_FILE, latest_checkpoint, read_config
from spheregen.engine import dist
from spheregen.errors import UserError
from spheregen.images import to_pil, to_uint8
from spheregen.interop.hub import resolve_checkpoint as resolve_foreign
from spheregen.models import load_model

DEFAULT_SAMPLING_KEY = "default_sampling"  # config.json: the sampling settings a checkpoint recommends


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, the newest checkpoint of a run directory, or an authors' file (a path
    or hf:OWNER/REPO/FILE) converted once into the cache (interop/hub.py)."""
    return latest_checkpoint(resolve_foreign(path))


def class_labels(classes: list[int], n: int, mode: str = "balanced", seed: int = 0) -> list[int]:
    """balanced: n of each class, class by class; random: n * len(classes) labels drawn uniformly from
    `classes` by a generator seeded with `seed` (the same list on every rank and for any batch size)."""
    if mode == "balanced":
        return [c for c in classes for _ in range(n)]
    g = torch.Generator().manual_seed(int(seed))
    picks = torch.randint(len(classes), (n * len(classes),), generator=g)
    return [classes[i] for i in picks.tolist()]


def load_tokenizer(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A Tokenizer in eval mode from a checkpoint dir, a save_pretrained dir, a run dir (its newest checkpoint),
    or the authors' vae.pt (a path or hf:); `source_path` records the checkpoint used."""
    ckpt = resolve_checkpoint(path)
    if not (ckpt / CONFIG_FILE).is_file():
        raise UserError(f"{path} is neither a tokenizer checkpoint nor a run directory with checkpoints; "
                        "train one with `spheregen train tokenizer --config ...`")
    model = load_model(ckpt, use_ema=use_ema, expect="tokenizer")
    model.source_path = str(ckpt)
    return model.to(device).eval()


def load_generator(ckpt: str | Path, tokenizer: str | None = None,
                   device: str | torch.device = "cpu") -> torch.nn.Module:
    """Any generator checkpoint or run directory (EMA weights), or an authors' file, with its decoder attached
    when it needs one (the tokenizer recorded in the checkpoint, relative to it, unless `tokenizer` is given)."""
    ckpt = resolve_checkpoint(ckpt)
    model = load_model(ckpt).eval().to(device)
    model.default_sampling = dict(read_config(ckpt).get(DEFAULT_SAMPLING_KEY) or {})
    if not hasattr(model, "generate_images"):
        raise UserError(f"{ckpt} holds a {model.model_type} model, which does not generate images; pass an AR or "
                        "Sphere Encoder checkpoint")
    if hasattr(model, "attach_decoder"):
        if tokenizer:  # given: a directory, or an authors' vae.pt (a path or hf:)
            path = resolve_checkpoint(tokenizer)
        elif model.config.tokenizer:  # recorded, relative to the checkpoint for converted ones
            path = ckpt / model.config.tokenizer
            if not path.is_dir():
                raise UserError(f"tokenizer {path} (recorded in {ckpt}) does not exist; pass --tokenizer CKPT")
        else:
            raise UserError(f"{ckpt} does not record its tokenizer; pass --tokenizer CKPT")
        model.attach_decoder(load_tokenizer(path, device=device))
    return model


def store_default_sampling(ckpt: str | Path, options: dict) -> Path:
    """Record sampling settings (fields of the model's sampling dataclass) in a checkpoint's config.json as its
    defaults: `load_generator` attaches them as `model.default_sampling` and `spheregen sample` starts from
    them (flags still override). The file is replaced atomically."""
    ckpt = resolve_checkpoint(ckpt)
    config = read_config(ckpt)
    config[DEFAULT_SAMPLING_KEY] = dict(options)
    tmp = ckpt / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, ckpt / CONFIG_FILE)
    return ckpt


def sample_images(model, labels: list[int], seed: int, batch_size: int, options,
                  progress: bool = True) -> torch.Tensor:
    """All images for `labels` in order, in batches; image k uses seed `seed + k`."""
    out = []
    starts = range(0, len(labels), batch_size)
    for s in tqdm(starts, disable=not progress, desc="batches", dynamic_ncols=True):
        lab = torch.tensor(labels[s:s + batch_size], dtype=torch.long)
        seeds = [seed + k for k in range(s, s + len(lab))]
        out.append(model.generate_images(lab, seeds, _with_progress(model, options, progress)).float().cpu())
    return torch.cat(out)


def sample_to_dir(model, labels: list[int], seed: int, batch_size: int, options, out_dir: Path,
                  num_classes: int, progress: bool = True) -> np.ndarray | None:
    """Write image k (seed `seed + k`) to out_dir/k.png for every k not already there; under torchrun rank r
    takes k = r mod world. Each PNG is written under a temporary name and renamed, so a killed run leaves
    only complete images and a rerun finishes the rest, bit-identical to an uninterrupted run.
    Returns all images as uint8 NHWC on rank 0 (None on the other ranks)."""
    dist.init_from_env()
    rank, world = dist.rank(), dist.world_size()
    names = [f"{k:06d}_class{y}.png" if num_classes else f"{k:06d}.png" for k, y in enumerate(labels)]
    todo = [k for k in range(rank, len(labels), world) if not (out_dir / names[k]).is_file()]
    for s in tqdm(range(0, len(todo), batch_size), disable=not progress or rank, desc="batches"):
        ks = todo[s:s + batch_size]
        lab = torch.tensor([labels[k] for k in ks], dtype=torch.long)
        opts = _with_progress(model, options, progress and not rank)
        batch = model.generate_images(lab, [seed + k for k in ks], opts)
        for k, a in zip(ks, to_uint8(batch.float().cpu())):
            tmp = out_dir / f".{names[k]}.tmp"
            to_pil(a).save(tmp, format="PNG")
            os.replace(tmp, out_dir / names[k])
    dist.shutdown()
    if rank != 0:
        return None
    arrays = [np.asarray(Image.open(out_dir / n)) for n in names]
    return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])


def _with_progress(model, options, progress: bool):
    """The model's sampling settings (from a dict or its dataclass) with the progress flag set."""
    return replace(model.sampling_options(options), progress=progress)
