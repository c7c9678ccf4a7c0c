"""Tests for spheregen.data.datasets: the three dataset builders, the on-disk format and ImageDataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spheregen import cli, images
from spheregen.data import builders, datasets
from spheregen.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "spheregen.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def main_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI entry point without a new interpreter (torch import costs seconds per subprocess)."""
    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def read_dataset(d: Path) -> tuple[np.ndarray, np.ndarray, list, dict]:
    return (np.load(d / "images.npy"), np.load(d / "labels.npy"),
            json.loads((d / "classes.json").read_text()), json.loads((d / "meta.json").read_text()))


# ------------------------------------------------------------------------------------------ mnist


@pytest.fixture(scope="module")
def mnist_dirs(tmp_path_factory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("mnist")
    out = {}
    for size in (28, 32):
        out[size] = base / f"mnist{size}"
        builders.build_mnist(out[size], size)
    return out


def test_mnist_format(mnist_dirs):
    im28, lab28, classes, meta = read_dataset(mnist_dirs[28])
    im32, lab32, _, meta32 = read_dataset(mnist_dirs[32])
    assert im28.shape == (5000, 28, 28, 1) and im28.dtype == np.uint8
    assert im32.shape == (5000, 32, 32, 1) and im32.dtype == np.uint8
    assert lab28.dtype == np.int64 and np.array_equal(lab28, lab32)
    assert classes == [str(i) for i in range(10)]
    assert np.bincount(lab28).tolist() == [500] * 10
    assert meta == {"source": meta["source"], "size": 28, "count": 5000, "channels": 1, "skipped": []}
    assert meta32["size"] == 32
    # padding is a centred black border that keeps every digit pixel
    assert np.array_equal(im28.sum(axis=(1, 2, 3)), im32.sum(axis=(1, 2, 3)))
    assert np.array_equal(im32[:, 2:30, 2:30], im28)
    assert im32[:, :2].max() == 0 and im32[:, :, 30:].max() == 0
    assert im28.max() == 255 and im28.mean() > 10


def test_mnist_resize_smaller(tmp_path):
    builders.build_mnist(tmp_path / "m16", 16)
    images, labels, _, meta = read_dataset(tmp_path / "m16")
    assert images.shape == (5000, 16, 16, 1) and meta["size"] == 16 and images.max() > 200


def test_dataset_values_and_splits(mnist_dirs):
    full = datasets.ImageDataset(mnist_dirs[32])
    assert (len(full), full.num_classes, full.image_size, full.channels) == (5000, 10, 32, 1)
    x, y = full[3]
    raw = np.load(mnist_dirs[32] / "images.npy")
    assert x.dtype == torch.float32 and x.shape == (1, 32, 32) and isinstance(y, int)
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    assert torch.allclose(x, torch.from_numpy(raw[3]).permute(2, 0, 1).float() / 127.5 - 1)

    train = datasets.ImageDataset(mnist_dirs[32], split="train")
    test = datasets.ImageDataset(mnist_dirs[32], split="test")
    assert len(test) == 500 and len(train) == 4500
    assert not set(train.indices) & set(test.indices)
    assert sorted(np.concatenate([train.indices, test.indices]).tolist()) == list(range(5000))
    # deterministic, and not simply the last 10% of the (class-sorted) file
    assert np.array_equal(datasets.ImageDataset(mnist_dirs[32], split="test").indices, test.indices)
    assert len(set(test.labels.tolist())) == 10
    assert len(datasets.ImageDataset(mnist_dirs[32], split="test", test_fraction=0.2)) == 1000


def test_get_batch_matches_getitem_and_flips(mnist_dirs):
    ds = datasets.ImageDataset(mnist_dirs[28], split="train")
    idx = [17, 3, 4000, 3, 250]
    x, y = ds.get_batch(idx)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    for k, i in enumerate(idx):
        xi, yi = ds[i]
        assert torch.equal(x[k], xi) and y[k].item() == yi
    mask = torch.tensor([True, False, False, True, True])
    xf, yf = ds.get_batch(torch.tensor(idx), flip_mask=mask)
    assert torch.equal(yf, y)
    for k in range(5):
        assert torch.equal(xf[k], x[k].flip(-1) if mask[k] else x[k])
    assert not torch.equal(xf[0], x[0])  # a digit is not mirror-symmetric

    flipping = datasets.ImageDataset(mnist_dirs[28], flip=True)
    torch.manual_seed(0)
    seen = {torch.equal(flipping[7][0], flipping.get_batch([7])[0][0]) for _ in range(20)}
    assert seen == {True, False}


def test_dataset_missing_dir(tmp_path):
    with pytest.raises(UserError, match="spheregen data"):
        datasets.ImageDataset(tmp_path / "nope")
    (tmp_path / "partial").mkdir()
    np.save(tmp_path / "partial" / "images.npy", np.zeros((1, 2, 2, 1), np.uint8))
    with pytest.raises(UserError, match="meta.json"):
        datasets.ImageDataset(tmp_path / "partial")


def test_write_replaces_existing_and_refuses_foreign(tmp_path):
    out = tmp_path / "ds"
    img = np.zeros((2, 4, 4, 3), np.uint8)
    builders.write_dataset(out, img, np.zeros(2), [], "a")
    builders.write_dataset(out, img[:1] + 7, np.zeros(1), [], "b")
    images, _, _, meta = read_dataset(out)
    assert meta["source"] == "b" and images.shape[0] == 1 and images.max() == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp/old dirs left
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        builders.write_dataset(out, img, np.zeros(2), [], "c")


# ------------------------------------------------------------------------------------------ folder


def make_image_tree(root: Path) -> None:
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "nested").mkdir(parents=True)
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[:, :, 0] = 255  # red, but fully transparent everywhere except a centre block
    rgba[10:30, 25:35, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "cats" / "a_rgba.png")
    Image.fromarray(np.full((30, 20), 90, np.uint8), "L").save(root / "cats" / "b_gray.png")
    Image.fromarray(np.full((20, 20, 3), (0, 0, 200), np.uint8)).save(root / "dogs" / "c.jpg", quality=95)
    pal = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L").convert("P")
    pal.save(root / "dogs" / "nested" / "d_pal.png")
    (root / ".hidden.txt").write_text("ignored")


def test_folder_classes_and_conversion(tmp_path):
    make_image_tree(tmp_path / "src")
    summary = builders.build_folder(tmp_path / "src", tmp_path / "out", 16)
    images, labels, classes, meta = read_dataset(tmp_path / "out")
    assert classes == ["cats", "dogs"] and labels.tolist() == [0, 0, 1, 1]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert meta["count"] == 4 and meta["channels"] == 3 and meta["skipped"] == []
    assert "4 images" in summary and "2 classes" in summary and str(tmp_path / "out") in summary
    rgba = images[0].astype(int)
    assert (rgba[0, 0] == 255).all() and (rgba[:, 0] == 255).all()  # transparent -> white
    assert rgba[8, 8, 0] > 200 and rgba[8, 8, 1] < 60  # opaque centre stays red
    assert (images[1] == 90).all()  # grayscale -> RGB
    assert abs(int(images[2, 8, 8, 2]) - 200) < 15 and images[2, 8, 8, 0] < 20
    assert len(set(map(tuple, images[3].reshape(-1, 3).tolist()))) > 10  # palette gradient kept

    ds = datasets.ImageDataset(tmp_path / "out")
    assert (ds.num_classes, ds.channels, ds.image_size) == (2, 3, 16)


def test_center_crop():
    im = Image.fromarray(np.concatenate([np.zeros((10, 10, 3)), np.full((10, 10, 3), 255),
                                         np.zeros((10, 10, 3))], axis=1).astype(np.uint8))
    out = np.asarray(images.center_square_resize(im, 5))
    assert out.shape == (5, 5, 3) and out.min() >= 250  # only the white middle square survives


def test_folder_unconditional(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((12, 8, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
    builders.build_folder(src, tmp_path / "out", 8)
    images, labels, classes, _ = read_dataset(tmp_path / "out")
    assert classes == [] and labels.tolist() == [0, 0, 0] and images.shape == (3, 8, 8, 3)
    assert datasets.ImageDataset(tmp_path / "out").num_classes == 0


@pytest.fixture
def bad_tree(tmp_path) -> Path:
    src = tmp_path / "bad"
    make_image_tree(src)
    buf = tmp_path / "full.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf)
    (src / "cats" / "corrupt.png").write_bytes(buf.read_bytes()[:400])  # valid header, truncated body
    (src / "dogs" / "empty.png").write_bytes(b"")
    (src / "dogs" / "notes.txt").write_text("not an image\n")
    return src


def test_cli_bad_files_fail_then_skip(bad_tree, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("data", "folder", str(bad_tree), "--out", str(out), "--size", "16")
    assert_one_line_error(proc, "corrupt.png", "--skip-bad")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "full.png"]  # no temp dir either

    proc = run_cli("data", "folder", str(bad_tree), "--out", str(out), "--size", "16", "--skip-bad")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = proc.stdout.strip().splitlines()
    assert len(summary) == 1 and "skipped 3" in summary[0] and "4 images" in summary[0]
    images, labels, _, meta = read_dataset(out)
    assert sorted(meta["skipped"]) == ["cats/corrupt.png", "dogs/empty.png", "dogs/notes.txt"]
    assert meta["count"] == 4 == len(images) == len(labels)


@pytest.mark.parametrize("name", ["empty.png", "notes.txt"])
def test_each_bad_file_is_named(bad_tree, tmp_path, name):
    for other in {"cats/corrupt.png", "dogs/empty.png", "dogs/notes.txt"} - {f"dogs/{name}"}:
        (bad_tree / other).unlink()
    with pytest.raises(UserError, match=name) as e:
        builders.build_folder(bad_tree, tmp_path / "o", 8)
    assert "--skip-bad" in str(e.value)


def test_cli_bad_arguments(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "one" / "x.png")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    cases = [
        ([str(tmp_path / "missing")], "missing"),
        ([str(tmp_path / "empty")], "no image files"),
        ([str(tmp_path / "junk"), "--skip-bad"], "no readable images"),
    ]
    for extra, needle in cases:
        proc = main_in_process(capsys, "data", "folder", *extra, "--out", str(tmp_path / "o"), "--size", "8")
        assert_one_line_error(proc, needle)
    for size in ("0", "-3"):
        proc = main_in_process(capsys, "data", "folder", str(tmp_path / "one"), "--out", str(tmp_path / "o"),
                               "--size", size)
        assert_one_line_error(proc, "--size")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ emoji


def emoji_sources() -> tuple[Path, Path] | None:
    found = []
    for rel in (builders.FONT_REL, builders.EMOJI_TEST_REL):
        hits = [p for p in (Path("/") / rel, ROOT / "data" / "debs" / rel) if p.is_file()]
        if not hits:
            return None
        found.append(hits[0])
    return found[0], found[1]


def test_emoji_parse_counts():
    sources = emoji_sources()
    if sources is None:
        pytest.skip("Noto Color Emoji / emoji-test.txt not installed (apt-get install "
                    "fonts-noto-color-emoji unicode-data, or `make emoji-debs`)")
    items, groups = builders.parse_emoji_test(sources[1])
    all_items, _ = builders.parse_emoji_test(sources[1], keep_skin_tones=True)
    assert len(groups) == 9 and "Component" not in groups and groups[0] == "Smileys & Emotion"
    assert len(items) < len(all_items)
    assert not any(0x1F3FB <= ord(c) <= 0x1F3FF for text, _ in items for c in text)
    assert {g for _, g in items} == set(range(9))


def test_emoji_cli_limit(tmp_path):
    sources = emoji_sources()
    if sources is None:
        pytest.skip("Noto Color Emoji / emoji-test.txt not installed (apt-get install "
                    "fonts-noto-color-emoji unicode-data, or `make emoji-debs`)")
    out = tmp_path / "emoji"
    proc = run_cli("data", "emoji", "--size", "32", "--out", str(out), "--limit", "40",
                   "--font", str(sources[0]), "--emoji-test", str(sources[1]))
    assert proc.returncode == 0, proc.stderr
    images, labels, classes, meta = read_dataset(out)
    assert images.shape == (40, 32, 32, 3) and meta["channels"] == 3 and len(classes) == 9
    assert labels.min() >= 0 and labels.max() < 9
    for corner in (images[:, 0, 0], images[:, 0, -1], images[:, -1, 0], images[:, -1, -1]):
        assert corner.min() >= 240
    assert images.reshape(40, -1).std(axis=1).min() > 20  # every image has a drawn glyph
    assert len({im.tobytes() for im in images}) == 40


def test_emoji_missing_font(tmp_path, capsys, monkeypatch):
    proc = main_in_process(capsys, "data", "emoji", "--size", "32", "--out", str(tmp_path / "e"),
                           "--font", str(tmp_path / "nope.ttf"))
    assert_one_line_error(proc, "nope.ttf", "fonts-noto-color-emoji", "make emoji-debs")
    if not Path("/" + builders.FONT_REL).is_file():  # default lookup: system path, then ./data/debs (absent)
        monkeypatch.chdir(tmp_path)
        proc = main_in_process(capsys, "data", "emoji", "--size", "32", "--out", str(tmp_path / "e"))
        assert_one_line_error(proc, "fonts-noto-color-emoji", "make emoji-debs")
    assert not (tmp_path / "e").exists()


def test_cli_refuses_an_existing_dataset_without_overwrite(tmp_path, capsys):
    """`spheregen data ... --out EXISTING` never replaces a dataset silently: one-line error, data untouched;
    --overwrite replaces it. The builders refuse by default too (write_dataset keeps replacing, as above)."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(src / "a" / "x.png")
    out = tmp_path / "ds"
    assert main_in_process(capsys, "data", "folder", str(src), "--out", str(out), "--size", "8").returncode == 0
    before = (out / "images.npy").read_bytes()
    proc = main_in_process(capsys, "data", "folder", str(src), "--out", str(out), "--size", "4")
    assert_one_line_error(proc, "already holds a dataset", "--overwrite")
    assert (out / "images.npy").read_bytes() == before
    with pytest.raises(UserError, match="--overwrite"):
        builders.build_folder(src, out, 4)
    proc = main_in_process(capsys, "data", "folder", str(src), "--out", str(out), "--size", "4", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert read_dataset(out)[0].shape == (1, 4, 4, 3)
    (out / "notes.txt").write_text("mine")  # foreign files are refused even with --overwrite
    proc = main_in_process(capsys, "data", "folder", str(src), "--out", str(out), "--size", "4", "--overwrite")
    assert_one_line_error(proc, "notes.txt")
    (tmp_path / "empty").mkdir()  # an empty directory is not data
    assert main_in_process(capsys, "data", "folder", str(src), "--out", str(tmp_path / "empty"),
                           "--size", "4").returncode == 0
