"""Sharded, memory-mapped latent caches with K augmented views per image (`spheregen encode`).

A sharded cache is a directory holding
  plan.json                    what is being encoded (tokenizer, data, views, shard size, seed): a re-run with
                               the same plan resumes, skipping complete shards
  shards/SSSSS.<key>.npy       per posterior parameter, rows of shard S: [n_S, K, 2, T(, d)], index 1 of dim 2
                               the mirrored image; "mu" float16 (re-normalised to unit length when read), every
                               other parameter (kappa, mean, std) float32; each file written to a temporary name
                               and renamed, so a shard is complete when all its key files exist
  labels.npy                   int64 [N]
  meta.json                    LatentCache's fields plus {"format": "sharded", "views", "shard_size", "shards"},
                               written last by rank 0 once every rank is done
View 0 is ADM's centre crop; views 1..K-1 are the authors' random resize-and-crops (spheregen.data.augment), drawn
from (seed, view, image index), so every rank and every re-run encodes the same pixels.
Disk per image: K x 2 x T x (2 d + 4) bytes for the spherical posterior (fp16 mu, fp32 kappa); at 256 px with
the authors' 16 x 16 grid of d = 16 tokens that is K x 2 x 256 x 36 = K x 18,432 bytes (18 KiB per view).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from spheregen.data.augment import center_crop, item_rng, random_crop
from spheregen.errors import UserError

SHARDS, PLAN = "shards", "plan.json"
VIEW_EPOCH = 1_000_000  # item_rng(seed, VIEW_EPOCH + view, index): apart from the training epochs' draws


def dtype_of(key: str) -> np.dtype:
    return np.dtype(np.float16 if key == "mu" else np.float32)


def bytes_per_image(views: int, tokens: int, dim: int, keys: tuple[str, ...] = ("mu", "kappa")) -> int:
    """Disk cost of one image: views x 2 flips x tokens x (per-key bytes)."""
    per_token = sum(dtype_of(k).itemsize * (dim if k in ("mu", "mean", "std") else 1) for k in keys)
    return views * 2 * tokens * per_token


def shard_path(root: Path, shard: int, key: str) -> Path:
    return root / SHARDS / f"{shard:05d}.{key}.npy"


class ViewItems(torch.utils.data.Dataset):
    """Image position -> [K, C, H, W]: view 0 the dataset's centre crop, views k >= 1 random resize-and-crops
    (a lazy dataset only), for DataLoader workers."""

    def __init__(self, dataset, views: int, seed: int, max_scale: float = 1.25):
        if views > 1 and not hasattr(dataset, "read"):
            raise UserError("--views > 1 needs a lazy dataset (`spheregen data folder SRC --lazy`), which keeps the "
                            "full images to crop from")
        self.dataset, self.views, self.seed, self.max_scale = dataset, views, seed, max_scale

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.views == 1:
            return self.dataset.get_batch([i])[0]  # [1, C, H, W]
        im, j, size = self.dataset.read(i), int(self.dataset.indices[i]), self.dataset.image_size
        crops = [center_crop(im, size)] + [random_crop(im, size, item_rng(self.seed, VIEW_EPOCH + k, j),
                                                       self.max_scale) for k in range(1, self.views)]
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [K, C, H, W]


def _save_atomically(path: Path, array: np.ndarray) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def encode_shard(tokenizer, items: ViewItems, rows: range, keys: tuple[str, ...], batch_size: int,
                 workers: int) -> dict[str, np.ndarray]:
    """Posterior parameters of `rows` for every view and its mirror: {key: [n, K, 2, T(, d)]}."""
    device = next(tokenizer.parameters()).device
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(items, list(rows)), batch_size=batch_size,
                                         num_workers=workers)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for x in loader:  # x [b, K, C, H, W]
        b, K = x.shape[:2]
        flat = x.flatten(0, 1).to(device)  # [b K, C, H, W]
        both = tokenizer.encode(torch.cat([flat, flat.flip(-1)]))  # plain rows first, then their mirrors
        for k in keys:
            v = both[k].float().cpu().unflatten(0, (2, b, K)).movedim(0, 2)  # [b, K, 2, T(, d)]
            parts[k].append(v.numpy().astype(dtype_of(k)))
    return {k: np.concatenate(v) for k, v in parts.items()}


def encode_shards(tokenizer, items: ViewItems, out: Path, keys: tuple[str, ...], shard_size: int, rank: int,
                  world: int, batch_size: int = 256, workers: int = 0) -> int:
    """Encode this rank's shards (shard s belongs to rank s mod world), skipping complete ones; returns how many
    shards it wrote."""
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    n_shards, written = math.ceil(len(items) / shard_size), 0
    for s in range(rank, n_shards, world):
        if all(shard_path(out, s, k).is_file() for k in keys):
            continue
        rows = range(s * shard_size, min(len(items), (s + 1) * shard_size))
        for k, array in encode_shard(tokenizer, items, rows, keys, batch_size, workers).items():
            _save_atomically(shard_path(out, s, k), array)
        written += 1
    return written


def check_plan(out: Path, plan: dict) -> None:
    """Start a cache at `out`, or resume one begun with the same plan (UserError otherwise)."""
    path = out / PLAN
    if path.is_file():
        if json.loads(path.read_text()) != plan:
            raise UserError(f"{out} holds a latent cache begun with other settings ({PLAN}); choose another --out "
                            "or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{PLAN}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(plan, indent=2))
    os.replace(tmp, path)


class ShardedParams:
    """Read side: rows(idx, view, side) -> {key: float32 tensor [B, T(, d)]} from memory-mapped shards."""

    def __init__(self, root: Path, meta: dict, keys: tuple[str, ...]):
        self.root, self.keys = root, keys
        self.shard_size, self.views = int(meta["shard_size"]), int(meta["views"])
        self.maps: dict[tuple[int, str], np.ndarray] = {}

    def _map(self, shard: int, key: str) -> np.ndarray:
        if (shard, key) not in self.maps:
            path = shard_path(self.root, shard, key)
            if not path.is_file():
                raise UserError(f"{self.root} lacks {path.name}; re-run spheregen encode to finish the cache")
            self.maps[(shard, key)] = np.load(path, mmap_mode="r")
        return self.maps[(shard, key)]

    def rows(self, idx: np.ndarray, view: np.ndarray, side: np.ndarray) -> dict[str, torch.Tensor]:
        out = {}
        shard, local = idx // self.shard_size, idx % self.shard_size
        for key in self.keys:
            parts = None
            for s in np.unique(shard):
                sel = np.nonzero(shard == s)[0]
                got = self._map(int(s), key)[local[sel], view[sel], side[sel]].astype(np.float32)
                if parts is None:
                    parts = np.empty((len(idx), *got.shape[1:]), dtype=np.float32)
                parts[sel] = got
            t = torch.from_numpy(parts)
            out[key] = torch.nn.functional.normalize(t, dim=-1) if key == "mu" else t
        return out
