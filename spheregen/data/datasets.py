"""Reading datasets: `ImageDataset` over a dataset directory (built by `spheregen data`, spheregen.data.builders).

A dataset is a directory holding
  images.npy    uint8, N x H x W x C (C=1 for MNIST, 3 otherwise)
  labels.npy    int64, N (all zeros when unconditional)
  classes.json  list of class names (empty = unconditional)
  meta.json     {"source", "size", "count", "channels", "skipped"}; written last, so it marks completeness.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from spheregen.errors import UserError
from spheregen.images import from_uint8

DATASET_FILES = ("images.npy", "labels.npy", "classes.json", "meta.json")
LAZY_FILES = ("paths.bin", "offsets.npy", "labels.npy", "sizes.npy", "classes.json", "meta.json")  # data/lazy.py
LAZY_OPTIONAL = ("spans.npy",)  # lazy indexes over tar shards


def split_indices(n: int, split: str, test_fraction: float) -> np.ndarray:
    """Sorted positions of `split` among n items: the last round(n test_fraction) entries of a fixed permutation
    (numpy seed 0) are the test set."""
    if split not in ("all", "train", "test"):
        raise UserError(f"split must be 'all', 'train' or 'test', got {split!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if split == "all":
        return np.arange(n)
    perm = np.random.RandomState(0).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[: n - n_test] if split == "train" else perm[n - n_test:])


class ImageDataset(torch.utils.data.Dataset):
    """A dataset directory as (x, y): x float32 C x H x W in [-1, 1], y an int class id.

    split: "all", or "train"/"test" from a fixed permutation (numpy seed 0) whose last
    round(N * test_fraction) entries are the test set. flip: random horizontal flips in __getitem__
    (torch's global RNG); get_batch flips only where the caller's flip_mask says so.
    """

    def __init__(self, root: str | Path, split: str = "all", test_fraction: float = 0.1, flip: bool = False):
        self.root = Path(root)
        missing = [n for n in DATASET_FILES if not (self.root / n).is_file()]
        if missing:
            raise UserError(f"{self.root} is not a complete spheregen dataset "
                            f"(missing {', '.join(missing)}); "
                            f"build it with `spheregen data mnist|emoji|folder ... --out {self.root}`")
        self.classes: list[str] = json.loads((self.root / "classes.json").read_text(encoding="utf-8"))
        self.meta: dict = json.loads((self.root / "meta.json").read_text(encoding="utf-8"))
        self.all_labels = np.load(self.root / "labels.npy")
        n, h, w, c = self._memmap().shape
        if len(self.all_labels) != n:
            raise UserError(f"{self.root}: images.npy and labels.npy disagree "
                            f"({n} vs {len(self.all_labels)}); rebuild it with `spheregen data ...`")
        self.num_classes, self.image_size, self.channels, self.flip = len(self.classes), h, c, flip
        self.indices: np.ndarray = split_indices(n, split, test_fraction)
        self.labels: np.ndarray = self.all_labels[self.indices]

    def _memmap(self) -> np.ndarray:
        if getattr(self, "_images", None) is None:
            self._images = np.load(self.root / "images.npy", mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memmap instead of pickling it
        return {k: v for k, v in self.__dict__.items() if k != "_images"}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        x = from_uint8(np.array(self._memmap()[j])[None])[0]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.all_labels[j])

    def get_batch(self, indices, flip_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions within this split -> (x float32 N x C x H x W in [-1, 1], y int64 N), in order."""
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = self.indices[np.asarray(indices, dtype=np.int64)]
        order = np.argsort(idx, kind="stable")
        data = np.empty((len(idx), *self._memmap().shape[1:]), dtype=np.uint8)
        data[order] = self._memmap()[idx[order]]  # sorted reads from the memmap, then restore order
        x = from_uint8(data)
        if flip_mask is not None:
            x = torch.where(flip_mask.to(torch.bool).view(-1, 1, 1, 1), x.flip(-1), x)
        return x, torch.from_numpy(self.all_labels[idx].astype(np.int64))
