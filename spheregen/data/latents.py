"""Latent caches for AR training: the tokenizer's posterior of every image (and of its mirror image).

A cache is a directory written by `spheregen encode`:
  latents.safetensors   labels int64 [N]; per posterior, with index 1 of dim 1 = the horizontally flipped image:
                          spherical               mu float32 [N, 2, T, d] (unit), kappa float32 [N, 2, T]
                          gaussian, gaussian_norm mean, std float32 [N, 2, T, d]
                          sigma                   mean float32 [N, 2, T, d]  (C_sigma is in meta.json)
  meta.json             {"posterior", "radius", "grid": [h, w], "latent_dim", "num_classes", "classes",
                         "tokenizer", "image_size", "channels", "c_sigma", "count", "data", "split"}
Storing the posterior rather than one sample lets every epoch see a fresh draw z ~ q(z | x), as the
authors' AR trainer does by re-encoding each step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from spheregen.checkpoint import write_dir_atomically
from spheregen.errors import UserError
from spheregen.models.tokenizer import Tokenizer, sample_posterior

CACHE_FILE, META_FILE = "latents.safetensors", "meta.json"
PARAM_KEYS = {"spherical": ("mu", "kappa"), "gaussian": ("mean", "std"), "gaussian_norm": ("mean", "std"),
              "sigma": ("mean",)}


def _as_index(indices) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        return indices.long().cpu()
    return torch.as_tensor(np.asarray(indices, dtype=np.int64))


class LatentCache:
    """A latent cache directory as an AR dataset: get_batch(indices, flip_mask) -> (z [B, T, d] float32,
    y int64 [B]), z a FRESH posterior sample on every call (torch's global RNG).

    Attributes: radius, grid (h, w), latent_dim, num_classes, classes, posterior, c_sigma, tokenizer_path,
    image_size, channels, meta.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / CACHE_FILE).is_file() or not (self.path / META_FILE).is_file():
            raise UserError(f"{self.path} is not a latent cache (no {CACHE_FILE} / {META_FILE}); "
                            "write one with `spheregen encode --tokenizer CKPT --data DIR --out CACHE`")
        try:
            self.meta = json.loads((self.path / META_FILE).read_text())
            tensors = load_file(str(self.path / CACHE_FILE))
        except Exception as e:  # JSON / safetensors errors come in several types
            raise UserError(f"{self.path} is a corrupt latent cache ({type(e).__name__}); "
                            "re-run spheregen encode") from None
        self.posterior: str = self.meta["posterior"]
        if self.posterior not in PARAM_KEYS:
            raise UserError(f"{self.path}: unknown posterior {self.posterior!r}")
        self.radius = float(self.meta["radius"])
        self.grid = tuple(self.meta["grid"])
        self.latent_dim = int(self.meta["latent_dim"])
        self.num_classes = int(self.meta["num_classes"])
        self.classes = list(self.meta.get("classes", []))
        self.c_sigma = float(self.meta.get("c_sigma", 0.0))
        self.tokenizer_path = self.meta.get("tokenizer")
        self.image_size, self.channels = self.meta.get("image_size"), self.meta.get("channels")
        self.labels = tensors["labels"].long()
        self.params = {k: tensors[k] for k in PARAM_KEYS[self.posterior]}

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices, flip_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `indices` (their mirror images where flip_mask) -> (z [B, T, d], y [B])."""
        idx = _as_index(indices)
        side = torch.zeros_like(idx) if flip_mask is None else flip_mask.to(torch.bool).cpu().long()
        params = {k: v[idx, side] for k, v in self.params.items()}
        z = sample_posterior(self.posterior, params, self.radius, self.c_sigma)
        return z.float(), self.labels[idx]


class OnTheFlyLatents:
    """LatentCache's interface over an image dataset: each get_batch encodes the images (and mirrors) with
    `tokenizer` (no grad, eval mode) and draws a fresh posterior sample (for `--no-cache`)."""

    def __init__(self, tokenizer: Tokenizer, image_dataset):
        self.tokenizer, self.dataset = tokenizer.eval(), image_dataset
        cfg = tokenizer.config
        self.posterior, self.radius, self.grid = cfg.posterior, tokenizer.radius, tuple(tokenizer.grid)
        self.latent_dim, self.c_sigma = cfg.latent_dim, cfg.c_sigma
        self.num_classes = image_dataset.num_classes
        self.classes = list(getattr(image_dataset, "classes", []))
        self.image_size, self.channels = cfg.image_size, cfg.in_channels
        self.tokenizer_path = getattr(tokenizer, "source_path", None)

    def __len__(self) -> int:
        return len(self.dataset)

    @torch.no_grad()
    def get_batch(self, indices, flip_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.dataset.get_batch(indices, flip_mask)
        device = next(self.tokenizer.parameters()).device
        z = self.tokenizer.sample_latent(self.tokenizer.encode(x.to(device)))
        return z.float(), y.to(device)


@torch.no_grad()
def encode_dataset(tokenizer: Tokenizer, dataset, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Posterior parameters of every image of `dataset` and of its mirror image: {key: [N, 2, ...]}, labels."""
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    keys = PARAM_KEYS[tokenizer.config.posterior]
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    labels = []
    for start in range(0, len(dataset), batch_size):
        x, y = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))))
        x = x.to(device)
        both = tokenizer.encode(torch.cat([x, x.flip(-1)]))
        for k in keys:
            plain, flipped = both[k].float().cpu().chunk(2)
            parts[k].append(torch.stack([plain, flipped], dim=1))
        labels.append(y.long().cpu())
    out = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    out["labels"] = torch.cat(labels)
    return out


def write_latent_cache(tokenizer: Tokenizer, dataset, out: str | Path, tokenizer_path: str | Path | None = None,
                       batch_size: int = 256, extra_meta: dict | None = None) -> Path:
    """Encode `dataset` and write the cache directory `out` atomically (temp dir + rename)."""
    if len(dataset) == 0:
        raise UserError("the dataset is empty; nothing to encode")
    if (dataset.image_size, dataset.channels) != (tokenizer.config.image_size, tokenizer.config.in_channels):
        raise UserError(f"the dataset holds {dataset.image_size}px images with {dataset.channels} channels, the "
                        f"tokenizer was trained on {tokenizer.config.image_size}px with "
                        f"{tokenizer.config.in_channels}; pick the matching --data")
    out = Path(out)
    if out.exists() and (not out.is_dir() or set(p.name for p in out.iterdir()) - {CACHE_FILE, META_FILE}):
        raise UserError(f"--out {out} exists and is not a latent cache; choose another --out (it would be replaced)")
    tensors = encode_dataset(tokenizer, dataset, batch_size)
    cfg = tokenizer.config
    meta = {
        "posterior": cfg.posterior, "radius": tokenizer.radius, "grid": list(tokenizer.grid),
        "latent_dim": cfg.latent_dim, "num_classes": dataset.num_classes, "classes": list(dataset.classes),
        "tokenizer": str(Path(tokenizer_path).resolve()) if tokenizer_path else None,
        "image_size": cfg.image_size, "channels": cfg.in_channels, "c_sigma": cfg.c_sigma,
        "count": len(dataset), **(extra_meta or {}),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / CACHE_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))

    write_dir_atomically(out, write)
    return out


