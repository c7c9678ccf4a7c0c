"""Lazy image datasets (`spheregen data folder --lazy`), worker decoding in the sampler's order, kill-and-resume
mid-epoch, and the sharded latent cache with K views."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from spheregen.checkpoint import list_checkpoints, load_weights
from spheregen.cli import main as cli_main
from spheregen.data.augment import CropSchedule, center_crop
from spheregen.data.latent_shards import bytes_per_image, shard_path
from spheregen.data.latents import LatentCache, write_sharded_cache
from spheregen.data.lazy import LazyImageDataset, build_lazy_index, open_dataset, read_rgb
from spheregen.data.loader import WorkerBatches
from spheregen.engine.state import EpochSampler
from spheregen.engine.trainer import TrainConfig, Trainer
from spheregen.errors import UserError
from spheregen.images import from_uint8
from spheregen.models.tokenizer import Tokenizer, TokenizerConfig


def make_tree(root, classes=3, per=8, seed=0):
    """JPEGs (and one RGBA PNG) of assorted sizes in one folder per class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per):
            w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"class_{c}" / f"img_{i:03d}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA").save(root / "class_0" / "alpha.png")
    return root


@pytest.fixture(scope="module")
def lazy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy")
    make_tree(root / "src")
    assert cli_main(["data", "folder", str(root / "src"), "--lazy", "--size", "16", "--out", str(root / "idx")]) == 0
    return root / "idx"


def test_index_holds_paths_labels_classes_sizes_and_reads_centre_crops(lazy_dir):
    meta = json.loads((lazy_dir / "meta.json").read_text())
    assert meta["format"] == "lazy" and meta["count"] == 25 and meta["size"] == 16
    ds = open_dataset(lazy_dir)
    assert isinstance(ds, LazyImageDataset) and len(ds) == 25 and ds.classes == ["class_0", "class_1", "class_2"]
    assert ds.labels.tolist() == [0] * 9 + [1] * 8 + [2] * 8
    sizes = np.load(lazy_dir / "sizes.npy")
    for i in (0, 3, 12, 24):
        with Image.open(ds.path(i)) as im:
            assert tuple(sizes[i]) == im.size
    x, y = ds.get_batch(torch.tensor([2, 20]), torch.tensor([False, True]))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 2]
    for row, i, flip in ((0, 2, False), (1, 20, True)):
        ref = from_uint8(np.array(center_crop(read_rgb(ds.path(i)), 16)[None]))[0]
        assert torch.equal(x[row], ref.flip(-1) if flip else ref)
    split = open_dataset(lazy_dir, split="test", test_fraction=0.2)
    assert len(split) == 5 and set(split.indices) <= set(range(25))


def test_tar_shards_in_webdataset_layout(lazy_dir, tmp_path):
    """The same images as tar shards (KEY.jpg + KEY.cls): same labels, same decoded pixels as the folder index."""
    import tarfile

    folder = LazyImageDataset(lazy_dir)
    src = tmp_path / "shards"
    src.mkdir()
    for shard, rows in enumerate((range(0, 13), range(13, 25))):
        with tarfile.open(src / f"train-{shard:04d}.tar", "w") as tf:
            for i in rows:
                ext = folder.path(i).suffix
                tf.add(folder.path(i), arcname=f"sample{i:05d}{ext}")
                label = f"{folder.labels[i]}".encode()
                info = tarfile.TarInfo(f"sample{i:05d}.cls")
                info.size = len(label)
                tf.addfile(info, io.BytesIO(label))
    line = build_lazy_index(src, tmp_path / "idx", 16)
    assert "indexed 25 images (3 classes" in line
    ds = LazyImageDataset(tmp_path / "idx")
    assert ds.labels.tolist() == folder.labels.tolist() and ds.classes == ["0", "1", "2"]
    assert torch.equal(ds.get_batch(range(25))[0], folder.get_batch(range(25))[0])
    assert ds.path(20).name == "train-0001.tar"


def test_bad_files_fail_in_one_line_or_are_skipped(tmp_path):
    src = make_tree(tmp_path / "src", classes=2, per=3)
    (src / "class_1" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="empty.jpg") as err:
        build_lazy_index(src, tmp_path / "idx", 16)
    assert "\n" not in str(err.value) and not (tmp_path / "idx").exists()
    line = build_lazy_index(src, tmp_path / "idx", 16, skip_bad=True)
    assert "skipped 1 unreadable" in line
    # a truncated JPEG passes the header check; --verify drops it, and reading it fails naming the file
    good = next((src / "class_0").glob("*.jpg"))
    data = good.read_bytes()
    (src / "class_1" / "trunc.jpg").write_bytes(data[:len(data) // 2])
    build_lazy_index(src, tmp_path / "idx2", 16, skip_bad=True)
    ds = LazyImageDataset(tmp_path / "idx2")
    bad = [i for i in range(len(ds)) if ds.path(i).name == "trunc.jpg"]
    with pytest.raises(UserError, match="trunc.jpg"):
        ds.get_batch(bad)
    sampler = EpochSampler(len(ds), len(ds), 0, False)
    batches = WorkerBatches(ds, sampler, workers=1)
    with pytest.raises(UserError, match="trunc.jpg") as err:
        batches.next(sampler.next()[0])
    assert "\n" not in str(err.value)
    batches.close()
    build_lazy_index(src, tmp_path / "idx3", 16, skip_bad=True, verify=True)
    good_files = len(list(src.rglob("*.*"))) - 2  # all but empty.jpg and trunc.jpg
    assert json.loads((tmp_path / "idx3" / "meta.json").read_text())["count"] == good_files


def test_worker_batches_follow_the_sampler_and_slice_ranks(lazy_dir):
    ds = LazyImageDataset(lazy_dir)
    ds.set_augment(CropSchedule(1, 2), seed=4)
    one = EpochSampler(len(ds), 8, 4, True)
    ranks = [EpochSampler(len(ds), 8, 4, True, r, 2) for r in range(2)]
    loaders = [WorkerBatches(ds, s, workers=w) for s, w in ((one, 2), (ranks[0], 1), (ranks[1], 0))]
    for _ in range(7):  # past two epoch boundaries (3 batches per epoch)
        idx, flips = one.next()
        x, y = loaders[0].next(idx)
        parts = [loaders[r + 1].next(s.next()[0]) for r, s in enumerate(ranks)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(y, torch.from_numpy(ds.labels[idx.numpy()]))
    for lo in loaders:
        lo.close()


def _tiny_tokenizer():
    torch.manual_seed(0)
    return Tokenizer(TokenizerConfig(image_size=16, in_channels=3, channels=(8, 16, 32), dim=32, enc_depth=1,
                                     dec_depth=1, n_heads=2, mlp_hidden=64, n_registers=2, latent_dim=8,
                                     perceptual="none", disc_weight=0.0))


def test_kill_and_resume_mid_epoch_is_bitwise(lazy_dir, tmp_path):
    """Random crops whose probability decays over epochs 0 -> 2, flips, 2 decoding workers: 4 steps, stop
    (mid-epoch 1), resume in a fresh trainer, 4 more == 8 uninterrupted steps, bit for bit."""
    cfg = TrainConfig(steps=8, batch_size=8, lr=1e-3, flip=True, ckpt_every=100, ema_decay=0.9, random_crop=True,
                      crop_full_until=0, crop_decay_end=2, data_workers=2, log_every=100)

    def trainer(run):
        return Trainer(_tiny_tokenizer(), LazyImageDataset(lazy_dir, split="all"), cfg, tmp_path / run,
                       progress=False)

    trainer("full").fit()
    first = trainer("split")
    first.fit(until=4)
    assert first.sampler.epoch == 1 and 0 < first.sampler.pos < 25
    again = trainer("split")
    assert again.resume()
    again.fit()
    a, b = (load_weights(list_checkpoints(tmp_path / r)[-1]) for r in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_cache_views_resume_and_parallel_ranks(lazy_dir, tmp_path):
    tok = _tiny_tokenizer().eval()
    ds = LazyImageDataset(lazy_dir)
    one = write_sharded_cache(tok, ds, tmp_path / "one", views=3, shard_size=10, seed=2)
    files = sorted((one / "shards").iterdir())
    assert len(files) == 6  # 3 shards x (mu, kappa)
    mu = np.load(shard_path(one, 0, "mu"))
    assert mu.dtype == np.float16 and mu.shape == (10, 3, 2, 16, 8)
    assert np.load(shard_path(one, 2, "kappa")).dtype == np.float32
    data_bytes = sum(np.load(f, mmap_mode="r").nbytes for f in files)
    assert data_bytes == 25 * bytes_per_image(3, 16, 8)
    with torch.no_grad():  # view 0 is the centre crop; index 1 of dim 2 the mirror image
        x, _ = ds.get_batch([4])
        ref = tok.encode(torch.cat([x, x.flip(-1)]))["mu"]
    assert torch.allclose(torch.from_numpy(mu[4, 0].astype(np.float32)), ref, atol=2e-3)
    # resume: a lost shard is re-encoded, the rest kept
    shard_path(one, 1, "mu").unlink()
    stamp = shard_path(one, 0, "mu").stat().st_mtime_ns
    write_sharded_cache(tok, ds, one, views=3, shard_size=10, seed=2)
    assert shard_path(one, 0, "mu").stat().st_mtime_ns == stamp
    # two ranks, each its own shards: the same cache
    for rank in (1, 0):
        write_sharded_cache(tok, ds, tmp_path / "two", views=3, shard_size=10, seed=2, rank=rank, world=2)
    for f in files:
        assert np.array_equal(np.load(f), np.load(tmp_path / "two" / "shards" / f.name)), f.name
    with pytest.raises(UserError, match="other settings"):
        write_sharded_cache(tok, ds, one, views=2, shard_size=10, seed=2)


def test_latent_cache_draws_a_view_and_a_posterior_sample_every_step(lazy_dir, tmp_path):
    tok = _tiny_tokenizer().eval()
    cache = LatentCache(write_sharded_cache(tok, LazyImageDataset(lazy_dir), tmp_path / "c", views=4, shard_size=7))
    assert len(cache) == 25 and cache.views == 4
    idx = torch.arange(25)
    assert torch.equal(cache.draw_views(25), torch.zeros(25, dtype=torch.long))  # no schedule: centre crops
    cache.set_augment(CropSchedule(0, 2), seed=0)
    cache.set_epoch(0)  # p = 1: a random-crop view for every row, redrawn each step
    v1, v2 = cache.draw_views(400), cache.draw_views(400)
    assert v1.min() >= 1 and set(v1.tolist()) == {1, 2, 3} and not torch.equal(v1, v2)
    cache.set_epoch(1)  # p = 0.5
    assert 0.35 < (cache.draw_views(400) == 0).float().mean() < 0.65
    cache.set_epoch(2)
    assert cache.draw_views(100).eq(0).all()
    cache.set_epoch(0)
    seen = []
    for step in range(3):
        torch.manual_seed(step)
        z, y = cache.get_batch(idx)
        assert z.shape == (25, 16, 8) and torch.allclose(z.norm(dim=-1), torch.full((25, 16), cache.radius), atol=1e-4)
        seen.append(z)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    torch.manual_seed(1)
    assert torch.equal(cache.get_batch(idx)[0], seen[1])  # the global RNG decides (exact resume)
    # the same rows with one view differ only by the posterior draw: near the view's mean direction
    one_view = LatentCache(write_sharded_cache(tok, LazyImageDataset(lazy_dir), tmp_path / "c1", views=1))
    with pytest.raises(UserError, match="--views"):
        one_view.set_augment(CropSchedule(), 0)


@pytest.mark.slow
def test_imagenet_layout_tree_trains_tokenizer_and_ar_lazily(tmp_path):
    """benchmarks/lazy_train.py: 2,000 JPEGs in 10 class folders, --lazy index, tokenizer and AR with random crops."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import lazy_train

    out = lazy_train.main(["--files", "2000", "--tokenizer-steps", "6", "--ar-steps", "6", "--work", str(tmp_path),
                           "--out", str(tmp_path / "result.json")])
    assert out["tokenizer_last"]["step"] == 6 and out["ar_last"]["step"] == 6
    assert np.isfinite(out["tokenizer_last"]["loss"]) and np.isfinite(out["ar_last"]["loss"])
    assert len(list((tmp_path / "tree").rglob("*.JPEG"))) == 2000
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["count"] == 2000


def test_ar_on_the_fly_latents_of_a_lazy_dataset(lazy_dir, tmp_path):
    """--no-cache on lazy images: workers decode (random crops on), the main process encodes each micro-batch."""
    from spheregen.data.latents import OnTheFlyLatents
    from spheregen.models.ar import ARConfig, SphereAR

    tok = _tiny_tokenizer()
    source = OnTheFlyLatents(tok, LazyImageDataset(lazy_dir))
    assert source.loader_dataset is not None
    torch.manual_seed(0)
    ar = SphereAR(ARConfig(token_dim=8, grid=(4, 4), radius=tok.radius, num_classes=3, dim=32, n_layers=1, n_heads=2,
                           mlp_multiple_of=8, n_cls_tokens=2, head_depth=1, head_width=32, head_adaln=1))
    cfg = TrainConfig(steps=2, batch_size=8, grad_accum=2, random_crop=True, data_workers=1, ckpt_every=100)
    result = Trainer(ar, source, cfg, tmp_path, progress=False).fit()
    assert np.isfinite(result["loss"])
