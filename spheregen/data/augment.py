"""Image preprocessing for lazy datasets: ADM's centre crop and the authors' random resize-and-crop schedule.

Centre crop (ADM, used by the SphereAR authors' dataset code): halve the image with a BOX filter while its short
side is at least twice the target, then resize with BICUBIC so the short side equals `size`, then cut the central
size x size square.

Random crop (the authors' training augmentation, research/sphereAR_code.md Sec. 2 and 4): the same BOX-then-BICUBIC
resize, but to a short side s drawn uniformly from the integers [size, ceil(size * max_scale)] (256 -> [256, 320]
at max_scale 1.25), then a size x size window at a uniformly random position.

Schedule: an item of epoch e is random-cropped with probability p(e) = 1 for e <= full_until, decaying linearly to
0 at decay_end (p = (decay_end - e) / (decay_end - full_until) in between), and centre-cropped otherwise; the
authors use 350 -> 375 for the AR model (400 epochs) and p = 1 throughout for the S-VAE.
Every random choice comes from a generator seeded by (seed, epoch, index), so it does not depend on which
DataLoader worker decodes the item, and a resumed run repeats it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

BOX, BICUBIC = Image.Resampling.BOX, Image.Resampling.BICUBIC


@dataclass(frozen=True)
class CropSchedule:
    """Random resize-and-crop with probability `prob(epoch)`; max_scale bounds the random short side."""
    full_until: float = 350.0
    decay_end: float = 375.0
    max_scale: float = 1.25

    def __post_init__(self) -> None:
        if self.decay_end < self.full_until or self.full_until < 0:
            raise ValueError(f"crop schedule needs 0 <= full_until <= decay_end, got {self.full_until} -> "
                             f"{self.decay_end}")
        if self.max_scale < 1.0:
            raise ValueError(f"crop max_scale must be >= 1, got {self.max_scale}")

    def prob(self, epoch: float) -> float:
        """p(e): 1 up to full_until, linear to 0 at decay_end, 0 after."""
        if epoch <= self.full_until:
            return 1.0
        if epoch >= self.decay_end:
            return 0.0
        return (self.decay_end - epoch) / (self.decay_end - self.full_until)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item's random choices: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


def resize_short_side(im: Image.Image, short: int) -> Image.Image:
    """BOX-halve while the short side is >= 2 * short, then BICUBIC so the short side is `short` (ADM)."""
    while min(im.size) >= 2 * short:
        im = im.resize((im.width // 2, im.height // 2), resample=BOX)
    scale = short / min(im.size)
    return im.resize((max(short, round(im.width * scale)), max(short, round(im.height * scale))), resample=BICUBIC)


def center_crop(im: Image.Image, size: int) -> np.ndarray:
    """ADM centre crop: size x size (x C) uint8."""
    arr = np.asarray(resize_short_side(im, size))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def crop_window(im: Image.Image, size: int, rng: np.random.Generator,
                max_scale: float = 1.25) -> tuple[np.ndarray, int, int]:
    """The image resized to a random short side s ~ U{size..ceil(size max_scale)} (BOX, then BICUBIC), and the
    (top, left) corner of a uniformly random size x size window inside it."""
    s = int(rng.integers(size, math.ceil(size * max_scale) + 1))
    arr = np.asarray(resize_short_side(im, s))
    return arr, int(rng.integers(0, arr.shape[0] - size + 1)), int(rng.integers(0, arr.shape[1] - size + 1))


def random_crop(im: Image.Image, size: int, rng: np.random.Generator, max_scale: float = 1.25) -> np.ndarray:
    """The authors' random resize-and-crop: size x size (x C) uint8."""
    arr, top, left = crop_window(im, size, rng, max_scale)
    return arr[top:top + size, left:left + size]


def preprocess(im: Image.Image, size: int, schedule: CropSchedule | None, seed: int, epoch: int,
               index: int) -> np.ndarray:
    """One training item: a random crop with probability schedule.prob(epoch), else the centre crop."""
    if schedule is None:
        return center_crop(im, size)
    rng = item_rng(seed, epoch, index)
    if rng.random() < schedule.prob(epoch):
        return random_crop(im, size, rng, schedule.max_scale)
    return center_crop(im, size)
