"""Lazy image datasets: an index over image files (`spheregen data folder SRC --lazy`), decoded when read.

A lazy dataset is a directory holding
  paths.bin     the files' paths relative to meta["root"], UTF-8, concatenated
  offsets.npy   int64 [N + 1]: path i is paths.bin[offsets[i]:offsets[i + 1]]
  labels.npy    int64 [N]
  sizes.npy     int32 [N, 2]: (width, height) of every file as stored
  spans.npy     int64 [N, 2], tar shards only: (offset, length) of the image's bytes inside the tar of its path
  classes.json  list of class names (empty = unconditional)
  meta.json     {"format": "lazy", "root", "source", "size", "count", "channels": 3, "skipped"}; written last.
SRC is an ImageNet-style tree (first-level folders = classes), or a folder of tar shards in webdataset layout
(members KEY.jpg|jpeg|png|webp with an optional KEY.cls holding the class index). Everything per image is
memory-mapped, so a reader's memory does not grow with the number of images; pixels are
decoded (in DataLoader workers when training) and preprocessed with ADM's centre crop or the authors' random
resize-and-crop (spheregen.data.augment).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from spheregen.checkpoint import write_dir_atomically
from spheregen.data.augment import CropSchedule, preprocess
from spheregen.data.builders import bad_image, check_folder_args, folder_files
from spheregen.data.datasets import LAZY_FILES, ImageDataset, split_indices
from spheregen.errors import UserError
from spheregen.images import from_uint8, to_rgb_on_white

LOAD_HINT = "or rebuild the index with `spheregen data folder SRC --lazy --verify --skip-bad` to drop such files"


def is_lazy(root: str | Path) -> bool:
    meta = Path(root) / "meta.json"
    return meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("format") == "lazy"


def open_dataset(root: str | Path, split: str = "all", test_fraction: float = 0.1, flip: bool = False):
    """A dataset directory as an ImageDataset (arrays) or a LazyImageDataset (an index over files)."""
    cls = LazyImageDataset if is_lazy(root) else ImageDataset
    return cls(root, split=split, test_fraction=test_fraction, flip=flip)


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _source(path: Path, span=None):
    """A file path, or the bytes at span = (offset, length) of a tar shard."""
    if (path.stat().st_size if span is None else span[1]) == 0:
        raise OSError("empty file")
    if span is None:
        return path
    with open(path, "rb") as f:
        f.seek(int(span[0]))
        return io.BytesIO(f.read(int(span[1])))


def read_rgb(path: Path, span=None) -> Image.Image:
    """Decode one image fully (so truncation fails here), EXIF-rotated, as RGB (alpha composited on white)."""
    with Image.open(_source(path, span)) as im:
        im.load()
        return to_rgb_on_white(ImageOps.exif_transpose(im))


def _probe(path: Path, verify: bool, span=None) -> tuple[int, int]:
    """(width, height) from the header, or from a full decode when `verify`."""
    if verify:
        return read_rgb(path, span).size
    with Image.open(_source(path, span)) as im:
        return im.size


def tar_entries(src: Path) -> tuple[list[tuple[str, int, tuple[int, int] | None]], list[str]]:
    """(tar path relative to src, label, (offset, length)) of every image in src's *.tar shards (webdataset
    layout: KEY.jpg and KEY.cls), and the class names ("0".."K-1"; none when no .cls files)."""
    entries, labelled = [], False
    for shard in sorted(src.glob("*.tar")):
        with tarfile.open(shard, "r:") as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
            cls = {m.name.rsplit(".", 1)[0]: int(tf.extractfile(m).read().strip()) for m in members
                   if m.name.endswith(".cls")}
        labelled |= bool(cls)
        for m in members:
            key, _, ext = m.name.rpartition(".")
            if ext.lower() in IMAGE_EXTS:
                entries.append((shard.name, cls.get(key, 0), (m.offset_data, m.size)))
    classes = [str(i) for i in range(max(e[1] for e in entries) + 1)] if labelled and entries else []
    return entries, classes


def build_lazy_index(src: str | Path, out: str | Path, size: int, skip_bad: bool = False, verify: bool = False,
                     overwrite: bool = False) -> str:
    """Index an image folder (first-level subfolders = classes) without decoding pixels (headers only, or full
    decodes with `verify`); unreadable files fail with one line or are skipped and counted with `skip_bad`."""
    tars = sorted(Path(src).glob("*.tar")) if Path(src).is_dir() else []
    if tars:
        (src, out), ignored = check_folder_args(src, out, size, overwrite), 0
        entries, classes = tar_entries(src)
    else:
        src, out, files, classes, ignored = folder_files(src, out, size, overwrite)
        entries = [(p.relative_to(src).as_posix(), label, None) for p, label in files]
    blob, offsets, labels, sizes, spans, skipped = bytearray(), [0], [], [], [], []
    for rel, label, span in tqdm(entries, desc="indexing images", disable=None, leave=False):
        try:
            sizes.append(_probe(src / rel, verify, span))
        except Exception as e:  # anything a broken or non-image file makes Pillow raise
            name = rel if span is None else f"{rel} at byte {span[0]}"
            if not skip_bad:
                raise bad_image(src / name, e) from None
            skipped.append(name)
            continue
        blob += rel.encode("utf-8")
        offsets.append(len(blob))
        labels.append(label)
        spans.append(span)
    if not labels:
        raise UserError(f"no readable images in {src} ({len(skipped)} unreadable files skipped)")
    meta = {"format": "lazy", "root": str(src.resolve()), "source": str(src.resolve()), "size": size,
            "count": len(labels), "channels": 3, "skipped": skipped, "verified": verify}

    def write(tmp: Path) -> None:
        (tmp / "paths.bin").write_bytes(bytes(blob))
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        np.save(tmp / "sizes.npy", np.asarray(sizes, dtype=np.int32).reshape(-1, 2))
        if tars:
            np.save(tmp / "spans.npy", np.asarray(spans, dtype=np.int64).reshape(-1, 2))
        (tmp / "classes.json").write_text(json.dumps(list(classes), ensure_ascii=False))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))

    write_dir_atomically(out, write)
    cls = f"{len(classes)} classes" if classes else "unconditional"
    line = f"indexed {len(labels)} images ({cls}, read at {size}x{size}x3) under {src} into {out}"
    if skipped:
        line += f"; skipped {len(skipped)} unreadable files (listed in {out / 'meta.json'})"
    return line + (f"; ignored {ignored} files at the top level of {src}" if ignored else "")


class LazyImageDataset(torch.utils.data.Dataset):
    """A lazy dataset directory as (x, y) like ImageDataset (x float32 3 x size x size in [-1, 1]).

    dataset[i] decodes position i of the split (a random flip when `flip`); dataset[(i, flip, epoch)] is what
    the trainer's DataLoader workers ask for: (i, x, y) preprocessed for that epoch (set_augment), or
    (i, None, message) when the file cannot be read, so the main process raises one line."""

    def __init__(self, root: str | Path, split: str = "all", test_fraction: float = 0.1, flip: bool = False):
        self.root = Path(root)
        missing = [n for n in LAZY_FILES if not (self.root / n).is_file()]
        if missing:
            raise UserError(f"{self.root} is not a complete lazy dataset (missing {', '.join(missing)}); "
                            f"build it with `spheregen data folder SRC --lazy --out {self.root}`")
        self.meta: dict = json.loads((self.root / "meta.json").read_text(encoding="utf-8"))
        self.classes: list[str] = json.loads((self.root / "classes.json").read_text(encoding="utf-8"))
        self.image_root = Path(self.meta["root"])
        self.all_labels = np.load(self.root / "labels.npy", mmap_mode="r")
        self.indices: np.ndarray = split_indices(len(self.all_labels), split, test_fraction)
        self.labels = np.asarray(self.all_labels[self.indices], dtype=np.int64)
        self.num_classes, self.image_size, self.channels = len(self.classes), int(self.meta["size"]), 3
        self.flip, self.schedule, self.seed = flip, None, 0
        self._maps: tuple | None = None

    loader_dataset = property(lambda self: self)  # the trainer decodes it in DataLoader workers

    def set_augment(self, schedule: CropSchedule | None, seed: int) -> None:
        """Random resize-and-crop with probability schedule.prob(epoch) (None: centre crops only)."""
        self.schedule, self.seed = schedule, int(seed)

    def __getstate__(self) -> dict:  # workers reopen the memmaps
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def _open_maps(self) -> tuple:
        if self._maps is None:
            spans = self.root / "spans.npy"
            self._maps = (np.memmap(self.root / "paths.bin", dtype=np.uint8, mode="r"),
                          np.load(self.root / "offsets.npy", mmap_mode="r"),
                          np.load(spans, mmap_mode="r") if spans.is_file() else None)
        return self._maps

    def path(self, i: int) -> Path:
        """The file (or tar shard) of position i of the split."""
        blob, offsets, _ = self._open_maps()
        j = int(self.indices[i])
        return self.image_root / bytes(blob[int(offsets[j]):int(offsets[j + 1])]).decode("utf-8")

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int) -> Image.Image:
        """The RGB image of position i (UserError naming the file if it cannot be read)."""
        path, spans = self.path(i), self._open_maps()[2]
        span = None if spans is None else tuple(int(v) for v in spans[int(self.indices[i])])
        try:
            return read_rgb(path, span)
        except Exception as e:  # anything a broken or missing file makes Pillow raise
            raise bad_image(path if span is None else Path(f"{path} at byte {span[0]}"), e, LOAD_HINT) from None

    def load(self, i: int, flip: bool = False, epoch: int = 0) -> tuple[torch.Tensor, int]:
        """Decode and preprocess position i for `epoch`."""
        im = self.read(i)
        arr = preprocess(im, self.image_size, self.schedule, self.seed, epoch, int(self.indices[i]))
        x = from_uint8(np.array(arr[None]))[0]  # a writable copy
        return (x.flip(-1) if flip else x), int(self.labels[i])

    def __getitem__(self, spec):
        if not isinstance(spec, tuple):
            return self.load(int(spec), self.flip and bool(torch.rand(()) < 0.5))
        i, flip, epoch = spec
        try:
            x, y = self.load(i, flip, epoch)
        except UserError as e:
            return i, None, str(e)
        return i, x, y

    def get_batch(self, indices, flip_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions -> (x [N, 3, S, S], y int64 [N]), decoded here (centre crops unless set_augment)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        flips = [False] * len(indices) if flip_mask is None else flip_mask.to(torch.bool).tolist()
        items = [self.load(int(i), f) for i, f in zip(indices, flips)]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)
