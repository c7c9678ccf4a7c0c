"""Planning a demo run from the data and a time budget (`spheregen demo --data PATH --minutes N`).

1. Data: a spheregen dataset directory is used as it is; a raw image folder (one subfolder per class, or flat for
   an unconditional set) is scanned, then built once into a cached dataset at a standard size (28, 32 or 64 px;
   larger or mixed sizes are centre-cropped and resized, with a warning), grayscale when every image is.
2. Configs: the shipped tiny configs scaled to the data (image size, channels; a third stride-2 tokenizer stage
   and 8 px Sphere Encoder patches at 64 px keep an 8x8 token grid).
3. Budget: each training stage gets a share of the time left; its step time is measured on the first steps of a
   fresh model, and its step count (hence its warmup + cosine schedule) is set to fill that share.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from spheregen.data.builders import build_folder, find_images, write_dataset
from spheregen.errors import UserError
from spheregen.eval.evaluate import is_dataset_dir

SIZES = (28, 32, 64)  # the sizes the tiny configs are scaled to
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# the share of the training time each stage gets (the rest of the budget: data, classifier, encode, sweep, report)
# (grayscale digits reconstruct well early: 510 tokenizer steps gave 29 dB on MNIST; RGB needs longer)
STAGE_SHARES = {"sphere_ar": {"tokenizer": 0.2, "ar": 0.8}, "sphere_ar_rgb": {"tokenizer": 0.35, "ar": 0.65},
                "sphere": {"sphere": 1.0}}
SWEEP_SHARE = 0.15  # of the time left after the data and the classifier: the guidance sweep, grid and report
SAFETY = 0.92  # plan to this fraction of the budget: process start-up, evaluations and checkpoints cost time too


# ------------------------------------------------------------------------------------------------ data


@dataclass
class FolderScan:
    """What a raw image folder holds: file count, image sizes (w, h) -> count, modes, class names."""

    files: int
    sizes: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    classes: list[str] = field(default_factory=list)
    unreadable: int = 0

    @property
    def gray(self) -> bool:
        return bool(self.modes) and all(m in GRAY_MODES for m in self.modes)


def scan_folder(src: str | Path) -> FolderScan:
    """Read the header (size, mode) of every image file under `src` (classes = first-level subfolders)."""
    src = Path(src)
    files, classes, _ = find_images(src)
    scan = FolderScan(files=len(files), classes=classes)
    for path, _label in files:
        try:
            with Image.open(path) as im:
                scan.sizes[im.size] += 1
                scan.modes[im.mode] += 1
        except Exception:  # anything Pillow raises on a non-image file
            scan.unreadable += 1
    return scan


def choose_size(sizes: Counter) -> tuple[int, str | None]:
    """The standard size to build at, and a warning when the images are not all that size and square: the largest
    of 28/32/64 px that fits the smallest side (28 when even that is smaller; 64 for anything larger)."""
    if not sizes:
        raise UserError("no readable images; put .png/.jpg images in the folder (or one subfolder per class)")
    side = min(min(wh) for wh in sizes)
    size = max([s for s in SIZES if s <= side], default=SIZES[0])
    if len(sizes) == 1 and next(iter(sizes)) == (size, size):
        return size, None
    shown = ", ".join(f"{w}x{h}" for (w, h), _ in sizes.most_common(3)) + (", ..." if len(sizes) > 3 else "")
    return size, f"warning: the images are {shown}; centre-cropped and resized to {size}x{size}"


def prepare_dataset(path: str | Path, cache: str | Path, say: Callable[[str], None] = print) -> Path:
    """A dataset directory for `path`: itself when it is one, else `cache`, built once from the image folder
    (a finished cache is reused). Bad input (missing path, no images) is a one-line UserError."""
    path, cache = Path(path), Path(cache)
    if not path.exists():
        raise UserError(f"--data {path} does not exist; pass an image folder or a dataset directory")
    if path.is_dir() and is_dataset_dir(path):
        return path
    if not path.is_dir():
        raise UserError(f"--data {path} is not a folder; pass an image folder or a dataset directory")
    if (cache / "meta.json").is_file():
        say(f"data: using the dataset built earlier in {cache}")
        return cache
    scan = scan_folder(path)
    if scan.files == scan.unreadable:
        raise UserError(f"no readable images in {path}; put .png/.jpg images in it (or one subfolder per class)")
    size, warning = choose_size(scan.sizes)
    if warning:
        say(warning)
    if len(scan.modes) > 1 and not scan.gray:
        say(f"warning: the images mix modes ({', '.join(sorted(scan.modes))}); all converted to RGB")
    build_folder(path, cache, size, skip_bad=True, overwrite=True)
    if scan.gray:  # built as RGB on white; grayscale images have R = G = B, so one channel keeps everything
        images = np.load(cache / "images.npy")[..., :1]
        labels, meta = np.load(cache / "labels.npy"), json.loads((cache / "meta.json").read_text())
        classes = json.loads((cache / "classes.json").read_text())
        write_dataset(cache, images, labels, classes, meta["source"], meta["skipped"], overwrite=True)
    say(f"data: built {cache} from {path} ({scan.files - scan.unreadable} images at {size} px, "
        f"{'grayscale' if scan.gray else 'RGB'}, {len(scan.classes) or 'no'} classes)")
    return cache


# ---------------------------------------------------------------------------------------------- configs


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def write_toml(path: str | Path, config: dict[str, dict]) -> Path:
    """A config of flat tables ([model], [train], ...) as a TOML file that `spheregen train --config` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for table, values in config.items():
        lines += [f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None] + [""]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
