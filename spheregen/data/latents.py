"""Latent caches for AR training: the tokenizer's posterior of every image (and of its mirror image).

`spheregen encode` writes the sharded, memory-mapped format of spheregen.data.latent_shards (K augmented views
per image, written by every torchrun rank in parallel, resumable). `write_latent_cache` writes the single-file
format below (small datasets); LatentCache reads both.
A single-file cache is a directory:
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
from spheregen.data.latent_shards import PLAN, ShardedParams, ViewItems, check_plan, encode_shards
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
    y int64 [B]), z a FRESH posterior sample on every call (torch's global RNG). With K views per image and
    train.random_crop, each row also draws its view on every call: a random crop (views 1..K-1, uniform) with
    probability schedule.prob(epoch) (set_epoch), the centre crop (view 0) otherwise.

    Attributes: radius, grid (h, w), latent_dim, num_classes, classes, posterior, c_sigma, tokenizer_path,
    image_size, channels, meta.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        sharded = (self.path / PLAN).is_file()
        if not (sharded or (self.path / CACHE_FILE).is_file()) or not (self.path / META_FILE).is_file():
            raise UserError(f"{self.path} is not a latent cache (no {CACHE_FILE} / {META_FILE}); "
                            "write one with `spheregen encode --tokenizer CKPT --data DIR --out CACHE`")
        try:
            self.meta = json.loads((self.path / META_FILE).read_text())
            tensors = {"labels": torch.from_numpy(np.load(self.path / "labels.npy"))} if sharded else \
                load_file(str(self.path / CACHE_FILE))
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
        keys = PARAM_KEYS[self.posterior]
        self.store = ShardedParams(self.path, self.meta, keys) if sharded else None
        self.params = {} if sharded else {k: tensors[k] for k in keys}
        self.views = self.store.views if sharded else 1
        self.schedule, self.epoch = None, 0

    def set_augment(self, schedule, seed: int) -> None:
        if schedule is not None and self.views < 2:
            raise UserError(f"{self.path} holds one view per image; re-encode it with `spheregen encode --views K` "
                            "(K >= 2, a lazy dataset) to train with train.random_crop")
        self.schedule = schedule

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draw_views(self, n: int) -> torch.Tensor:
        """Per row: a random-crop view (1..K-1) with probability schedule.prob(epoch), else view 0."""
        if self.schedule is None or self.views < 2:
            return torch.zeros(n, dtype=torch.long)
        crop = torch.rand(n) < self.schedule.prob(self.epoch)
        return torch.where(crop, torch.randint(1, self.views, (n,)), 0)

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices, flip_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `indices` (their mirror images where flip_mask) -> (z [B, T, d], y [B])."""
        idx = _as_index(indices)
        side = torch.zeros_like(idx) if flip_mask is None else flip_mask.to(torch.bool).cpu().long()
        if self.store is None:
            params = {k: v[idx, side] for k, v in self.params.items()}
        else:
            params = self.store.rows(idx.numpy(), self.draw_views(len(idx)).numpy(), side.numpy())
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
        self.loader_dataset = getattr(image_dataset, "loader_dataset", None)  # lazy images: decoded in workers

    def __len__(self) -> int:
        return len(self.dataset)

    def set_augment(self, schedule, seed: int) -> None:
        if hasattr(self.dataset, "set_augment"):
            self.dataset.set_augment(schedule, seed)
        elif schedule is not None:
            raise UserError("train.random_crop with --no-cache needs a lazy dataset (`spheregen data folder SRC "
                            "--lazy`)")

    @torch.no_grad()
    def finish_batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, y) -> (a posterior sample of their latents, y)."""
        x, y = batch
        device = next(self.tokenizer.parameters()).device
        z = self.tokenizer.sample_latent(self.tokenizer.encode(x.to(device)))
        return z.float(), y.to(device)

    def get_batch(self, indices, flip_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish_batch(self.dataset.get_batch(indices, flip_mask))


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


def _check_target(tokenizer: Tokenizer, dataset, out: Path, allowed: set[str]) -> None:
    if len(dataset) == 0:
        raise UserError("the dataset is empty; nothing to encode")
    if (dataset.image_size, dataset.channels) != (tokenizer.config.image_size, tokenizer.config.in_channels):
        raise UserError(f"the dataset holds {dataset.image_size}px images with {dataset.channels} channels, the "
                        f"tokenizer was trained on {tokenizer.config.image_size}px with "
                        f"{tokenizer.config.in_channels}; pick the matching --data")
    if out.exists() and (not out.is_dir() or set(p.name for p in out.iterdir()) - allowed):
        raise UserError(f"--out {out} exists and is not a latent cache; choose another --out (it would be replaced)")


def cache_meta(tokenizer: Tokenizer, dataset, tokenizer_path, extra_meta: dict | None) -> dict:
    cfg = tokenizer.config
    return {
        "posterior": cfg.posterior, "radius": tokenizer.radius, "grid": list(tokenizer.grid),
        "latent_dim": cfg.latent_dim, "num_classes": dataset.num_classes, "classes": list(dataset.classes),
        "tokenizer": str(Path(tokenizer_path).resolve()) if tokenizer_path else None,
        "image_size": cfg.image_size, "channels": cfg.in_channels, "c_sigma": cfg.c_sigma,
        "count": len(dataset), **(extra_meta or {}),
    }


def write_latent_cache(tokenizer: Tokenizer, dataset, out: str | Path, tokenizer_path: str | Path | None = None,
                       batch_size: int = 256, extra_meta: dict | None = None) -> Path:
    """Encode `dataset` and write the single-file cache directory `out` atomically (temp dir + rename)."""
    out = Path(out)
    _check_target(tokenizer, dataset, out, {CACHE_FILE, META_FILE})
    tensors = encode_dataset(tokenizer, dataset, batch_size)
    meta = cache_meta(tokenizer, dataset, tokenizer_path, extra_meta)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / CACHE_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))

    write_dir_atomically(out, write)
    return out


def write_sharded_cache(tokenizer: Tokenizer, dataset, out: str | Path, views: int = 1, shard_size: int = 4096,
                        seed: int = 0, max_scale: float = 1.25, rank: int = 0, world: int = 1,
                        batch_size: int = 256, workers: int = 0, tokenizer_path: str | Path | None = None,
                        extra_meta: dict | None = None, barrier=lambda: None) -> Path:
    """Encode `views` views (and mirrors) of every image into the sharded cache `out` (latent_shards): rank r of
    `world` writes shards r, r + world, ...; complete shards of an earlier run with the same plan are kept;
    rank 0 writes labels.npy and meta.json once `barrier()` says every rank is done."""
    out = Path(out)
    if views < 1 or shard_size < 1:
        raise UserError(f"--views and --shard-size must be >= 1, got {views} and {shard_size}")
    _check_target(tokenizer, dataset, out, {PLAN, META_FILE, "labels.npy", "shards"})
    meta = cache_meta(tokenizer, dataset, tokenizer_path, extra_meta)
    plan = {"tokenizer": meta["tokenizer"], "data": meta.get("data"), "split": meta.get("split"),
            "count": len(dataset), "views": views, "shard_size": shard_size, "seed": seed, "max_scale": max_scale}
    if rank == 0:
        check_plan(out, plan)
    barrier()
    if rank != 0:
        check_plan(out, plan)
    keys = PARAM_KEYS[tokenizer.config.posterior]
    tokenizer.eval()
    encode_shards(tokenizer, ViewItems(dataset, views, seed, max_scale), out, keys, shard_size, rank, world,
                  batch_size, workers)
    barrier()
    if rank == 0:
        meta.update({"format": "sharded", "views": views, "shard_size": shard_size,
                     "shards": -(-len(dataset) // shard_size), "seed": seed})
        np.save(out / "labels.npy", np.asarray(dataset.labels, dtype=np.int64))
        (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))  # last: complete
    barrier()
    return out
