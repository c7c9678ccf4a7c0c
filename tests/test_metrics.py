"""Evaluation: metric math against brute-force / scipy references, Inception, classifier, inputs, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

from spheregen.data.builders import write_dataset
from spheregen.errors import UserError
from spheregen.eval import evaluate as E
from spheregen.eval import metrics as M
from spheregen.eval.classifier import (
    class_accuracy,
    get_classifier,
    load_classifier,
    predict_logits,
    random_shift,
    save_classifier,
    train_classifier,
)
from spheregen.eval.inception import (
    extract_features,
    load_inception,
    preprocess,
    quantize,
    tf_bilinear_resize,
    tf_resize_matrix,
)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a CPU shared with other jobs, 2 threads ran these small convs 4-25x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quadrant_images(n: int, size: int = 28, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x size x size x C noise images; class = which quadrant is bright."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 4, n)
    images = rng.randint(0, 60, (n, size, size, channels)).astype(np.uint8)
    h = size // 2
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        images[i, r * h:(r + 1) * h, q * h:(q + 1) * h] += 180
    return images, labels


@pytest.fixture(scope="module")
def quad_dir(tmp_path_factory) -> Path:
    images, labels = quadrant_images(240)
    return write_dataset(tmp_path_factory.mktemp("quad") / "ds", images, labels, ["tl", "tr", "bl", "br"], "test")


@pytest.fixture(scope="module")
def inception():
    return load_inception(None, "cpu")


def _rand_feats(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return rng.randn(n, d) @ rng.randn(d, d) * 0.5 + shift


# ------------------------------------------------------------------------------------------ math


def test_frechet_matches_scipy_sqrtm():
    a, b = _rand_feats(400, 24, 0), _rand_feats(300, 24, 1, shift=0.3)
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    ours = M.frechet_distance(mu1, s1, mu2, s2)
    assert ref > 1.0
    assert ours == pytest.approx(ref, rel=1e-6)
    assert M.fid_from_features(a, b) == pytest.approx(ref, rel=1e-6)


def test_fid_of_identical_features_is_zero():
    a = _rand_feats(200, 16, 2)
    assert abs(M.fid_from_features(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))
    low_rank = _rand_feats(10, 64, 3)  # n < d: rank-deficient covariance, where sqrtm goes complex
    assert abs(M.fid_from_features(low_rank, low_rank)) < 1e-8 * np.trace(np.cov(low_rank, rowvar=False))
    assert M.fid_from_features(low_rank, low_rank + 1.0) == pytest.approx(64.0, rel=1e-8)  # |mu shift|^2


def test_fid_low_rank_path_matches_full_path():
    a, b = _rand_feats(300, 40, 11), _rand_feats(25, 40, 12, shift=0.2)  # 25 <= 40: the n x n path
    mu, s = M.mean_cov(a)
    full = M.frechet_distance(mu, s, *M.mean_cov(b))
    assert M.frechet_distance_to_features(mu, s, b) == pytest.approx(full, rel=1e-9)
    assert M.fid_from_features(a, b) == pytest.approx(full, rel=1e-9)
    with pytest.raises(UserError):
        M.frechet_distance_to_features(mu[:5], s[:5, :5], b)


def _kernel(x, y):
    return (float(np.dot(x, y)) / len(x) + 1.0) ** 3


def _mmd_brute(x, y):
    m, n = len(x), len(y)
    xx = sum(_kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(_kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(_kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_brute_force():
    x, y = _rand_feats(7, 5, 4), _rand_feats(9, 5, 5, shift=0.5)
    assert M.mmd2_unbiased(torch.tensor(x), torch.tensor(y)) == pytest.approx(_mmd_brute(x, y), rel=1e-10)
    # one subset of all points: the estimator is permutation invariant, so KID equals the brute force
    x2 = _rand_feats(9, 5, 6)
    mean, std = M.kid(x2, y, subset_size=1000, num_subsets=1)
    assert mean == pytest.approx(_mmd_brute(x2, y), rel=1e-10) and std == 0.0
    # subsets of 5 out of 9: the mean over subsets averages brute-force values of those subsets
    mean, std = M.kid(x2, y, subset_size=5, num_subsets=20, seed=1)
    assert std > 0 and np.isfinite(mean)


def _pr_brute(real, fake, k):
    def radii(s):
        return [sorted(np.linalg.norm(s[i] - s[j]) for j in range(len(s)) if j != i)[k - 1] for i in range(len(s))]

    def cover(manifold, rad, queries):
        hits = [any(np.linalg.norm(q - manifold[i]) <= rad[i] for i in range(len(manifold))) for q in queries]
        return sum(hits) / len(queries)

    return cover(real, radii(real), fake), cover(fake, radii(fake), real)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_match_brute_force(k):
    real, fake = _rand_feats(30, 4, 7), _rand_feats(25, 4, 8, shift=0.8) * 0.6
    p, r = M.precision_recall(real, fake, k=k)
    bp, br = _pr_brute(real, fake, k)
    assert (p, r) == (pytest.approx(bp, abs=1e-12), pytest.approx(br, abs=1e-12))
    assert 0 < p < 1 and 0 < r < 1
    assert M.precision_recall(real, real, k=k) == (1.0, 1.0)


def test_inception_score_from_logits():
    assert M.inception_score(torch.zeros(100, 1008)) == pytest.approx((1.0, 0.0), abs=1e-12)
    confident = torch.full((100, 5), -50.0)
    confident[torch.arange(100), torch.arange(100) % 5] = 50.0  # one-hot, every class equally often per split
    assert M.inception_score(confident)[0] == pytest.approx(5.0, rel=1e-9)
    with pytest.raises(UserError):
        M.inception_score(torch.zeros(5, 10))
    logits = np.random.RandomState(13).randn(23, 7) * 2  # 23 // 2 = 11 per split, the last row unused
    scores = []
    for part in (logits[:11], logits[11:22]):
        p = np.exp(part) / np.exp(part).sum(1, keepdims=True)
        scores.append(np.exp(np.mean([(pi * np.log(pi / p.mean(0))).sum() for pi in p])))
    assert M.inception_score(logits, splits=2) == (pytest.approx(np.mean(scores), rel=1e-10),
                                                   pytest.approx(np.std(scores), rel=1e-8))


# ------------------------------------------------------------------------------------------ Inception


def test_resize_is_tf_legacy_bilinear():
    x = torch.rand(2, 3, 28, 28) * 255
    theta = torch.tensor([[1.0, 0, 1 / 28 - 1 / 299], [0, 1.0, 1 / 28 - 1 / 299]]).expand(2, 2, 3)
    grid = F.affine_grid(theta, [2, 3, 299, 299], align_corners=False)  # pixel j samples j * 28 / 299
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(tf_bilinear_resize(x), ref, atol=2e-3)
    m = tf_resize_matrix(28, 299)
    assert torch.allclose(m.sum(1), torch.ones(299)) and m[0, 0] == 1.0
    assert torch.equal(quantize(torch.tensor([-1.0, 1.0, 0.0])), torch.tensor([0.0, 255.0, 128.0]))
    y = preprocess(torch.zeros(1, 1, 32, 32))
    assert y.shape == (1, 3, 299, 299) and torch.allclose(y, torch.zeros_like(y))  # 128 -> 0


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 28), (1, 64), (3, 64)])
def test_inception_features_shape(inception, channels, size):
    x = torch.rand(1, channels, size, size) * 2 - 1
    f = extract_features(x, inception, device="cpu")
    assert f.shape == (1, 2048) and torch.isfinite(f).all() and f.abs().sum() > 0
    assert not inception.has_logits
    with pytest.raises(UserError, match="logits"):
        inception.logits(f)


def test_fid_end_to_end_through_inception(inception, capsys, monkeypatch):
    monkeypatch.setattr(M, "_warned_few", False)
    images, _ = quadrant_images(16, 32, 3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert M.fid(x, x.clone(), device="cpu") == pytest.approx(0.0, abs=1e-3)
    assert M.rfid(x[:4], -x[:4], device="cpu") > 10.0  # inverted "reconstructions" are far
    err = capsys.readouterr().err
    assert err.count("warning: FID from 16 < 2048") == 1  # warned once, not twice


def test_inception_with_logits_layer(tmp_path):
    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 3, stride=8), torch.nn.AdaptiveAvgPool2d(1))
            self.output = torch.nn.Linear(2048, 1008)

        def forward(self, x):
            return self.layers(x).reshape(-1, 2048)

    path = tmp_path / "fake_inception.pt"
    torch.jit.script(Fake()).save(str(path))
    net = load_inception(str(path), "cpu")
    assert net.has_logits and net.key.startswith("fake_inception-")
    f = extract_features(torch.rand(10, 1, 16, 16) * 2 - 1, net)
    logits = net.logits(f)
    assert logits.shape == (10, 1008)
    assert torch.allclose(logits, f @ net.net.output.weight.T)  # no bias, as the TF IS code
    assert M.inception_score(logits, splits=2)[0] >= 1.0
    x = torch.rand(20, 3, 16, 16) * 2 - 1  # the tensor API of evaluate, with IS available
    res = E.evaluate(x, x, ["fid", "is"], device="cpu", inception=str(path))
    assert res["fid"] == pytest.approx(0.0, abs=1e-6) and res["is_mean"] >= 1.0 and res["is_std"] >= 0.0


# ------------------------------------------------------------------------------------------ classifier


def test_random_shift_translates():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    assert torch.equal(random_shift(x, 0), x)
    y = random_shift(x, 1, torch.Generator().manual_seed(0))
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    for i in range(2):
        assert any(torch.equal(y[i], pad[i, :, dy:dy + 6, dx:dx + 6]) for dy in range(3) for dx in range(3))


def test_classifier_trains_and_roundtrips(quad_dir, tmp_path):
    model, config = train_classifier(quad_dir, epochs=6, batch_size=32, verbose=False)
    assert config["test_accuracy"] >= 0.9
    images, labels = quadrant_images(64, seed=9)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert class_accuracy(x, labels, model) >= 0.9
    assert class_accuracy(x, (labels + 1) % 4, model) <= 0.1
    save_classifier(model, config, tmp_path / "clf")
    loaded, cfg2 = load_classifier(tmp_path / "clf")
    assert cfg2 == json.loads(json.dumps(config))
    assert torch.equal(predict_logits(model, x), predict_logits(loaded, x))
    # get_classifier reuses the checkpoint instead of training again
    again, _, where = get_classifier(quad_dir, tmp_path / "clf")
    assert where == tmp_path / "clf" and torch.equal(predict_logits(again, x), predict_logits(model, x))
    with pytest.raises(UserError):
        load_classifier(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------ inputs


def test_load_images_sources(tmp_path, quad_dir):
    rgb = np.random.RandomState(0).randint(0, 256, (5, 8, 8, 3)).astype(np.uint8)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(rgb):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    got, labels = E.load_images(folder)
    assert np.array_equal(got, rgb) and labels is None
    assert np.array_equal(E.load_images(folder, max_n=2)[0], rgb[:2])

    gray = folder.parent / "gray"
    gray.mkdir()
    for i, im in enumerate(rgb[..., 0]):
        Image.fromarray(im, "L").save(gray / f"{i}.png")
    assert E.load_images(gray)[0].shape == (5, 8, 8, 1)

    np.savez(tmp_path / "s.npz", arr_0=rgb, arr_1=np.arange(5))
    got, labels = E.load_images(tmp_path / "s.npz")
    assert np.array_equal(got, rgb) and labels.tolist() == [0, 1, 2, 3, 4]

    test_imgs, test_labels = E.load_images(quad_dir, split="test")
    all_imgs, all_labels = E.load_images(quad_dir, split="all")
    assert len(test_imgs) == 24 and len(all_imgs) == 240 and test_imgs.shape[1:] == (28, 28, 1)
    assert len(E.load_images(quad_dir, max_n=7, split="train")[0]) == 7

    np.savez(tmp_path / "f.npz", arr_0=rgb.astype(np.float32))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    for bad in (tmp_path / "missing", tmp_path / "f.npz", tmp_path / "stats.npz", tmp_path / "pngs" / "000.png"):
        with pytest.raises(UserError):
            E.load_images(bad)


def test_stats_roundtrip_and_network_key(tmp_path):
    f = _rand_feats(50, 6, 10)
    stats = E.feature_stats(f, "net-a", sample=20)
    assert stats["feats"].shape == (20, 6) and stats["n"] == 50
    E.save_stats(tmp_path / "s.npz", stats)
    back = E.load_stats(tmp_path / "s.npz", "net-a")
    assert np.allclose(back["mu"], f.mean(0)) and back["n"] == 50 and back["network"] == "net-a"
    with pytest.raises(UserError, match="net-a"):
        E.load_stats(tmp_path / "s.npz", "net-b")


def _toy_net(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 7).flatten(1)  # 28 px, 1 channel -> 16 features


def test_reference_stats_sources_and_cache(tmp_path, monkeypatch):
    images, labels = quadrant_images(60)
    ds = write_dataset(tmp_path / "ds", images, labels, ["a", "b", "c", "d"], "test")
    stats = E.reference_stats(ds, _toy_net, "toy", split="train", max_n=30)
    cache = ds / "stats" / "toy-train-30.npz"
    assert cache.is_file() and stats["n"] == 30 and stats["feats"].shape == (30, 16)

    def no_features(*args, **kwargs):
        raise AssertionError("features recomputed although cached")

    monkeypatch.setattr(E, "extract_features", no_features)
    again = E.reference_stats(ds, _toy_net, "toy", split="train", max_n=30)
    assert np.array_equal(again["sigma"], stats["sigma"])
    with pytest.raises(AssertionError, match="recomputed"):
        E.reference_stats(ds, _toy_net, "other-net", split="train", max_n=30)  # not another network's cache
    with pytest.raises(UserError, match="toy"):
        E.load_stats(cache, "other-net")  # and a stats file of another network is refused
    monkeypatch.undo()

    # an ADM-style reference batch: mu/sigma plus an image sample, no feature sample
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    f = _toy_net(x).numpy()
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    adm = E.reference_stats(tmp_path / "ref.npz", _toy_net, "toy")
    assert np.allclose(adm["feats"], f, atol=1e-6) and adm["network"] is None
    from_tensor = E.reference_stats(x, _toy_net, "toy")
    assert np.allclose(from_tensor["mu"], f.mean(0), atol=1e-6)


def test_evaluate_dataset_with_cache(quad_dir, tmp_path):
    out = tmp_path / "res.json"
    argv = ["eval", "--samples", str(quad_dir), "--ref", str(quad_dir), "--metrics", "fid,kid,pr,is,acc,dfid",
            "--max-n", "10", "--device", "cpu", "--json", str(out)]
    from spheregen.cli import main

    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["n_samples"] == 10 and res["n_ref"] == 10
    assert res["fid"] > 0 and res["dfid"] > 0 and np.isfinite(res["kid_mean"])
    assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
    assert res["is_mean"] is None  # the default network has no logits
    # samples = the test split itself: its accuracy is the classifier's held-out accuracy
    full = E.evaluate(quad_dir, quad_dir, ["acc"], device="cpu")
    assert full["acc"] == pytest.approx(full["classifier_test_acc"])
    cached = sorted(p.name for p in (quad_dir / "stats").iterdir())
    assert len(cached) == 2 and any(n.startswith("inception-") for n in cached)
    again = E.evaluate(quad_dir, quad_dir, ["fid", "dfid"], max_n=10, device="cpu")
    assert again["fid"] == pytest.approx(res["fid"]) and again["dfid"] == pytest.approx(res["dfid"])
    # samples as an .npz with a separate labels file; wrong labels lower the accuracy
    images, labels = E.load_images(quad_dir, split="test")
    np.savez(tmp_path / "samples.npz", arr_0=images)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "wrong.npy", (labels + 1) % 4)
    right = E.evaluate(tmp_path / "samples.npz", quad_dir, ["acc"], labels=tmp_path / "labels.npy", device="cpu")
    wrong = E.evaluate(tmp_path / "samples.npz", quad_dir, ["acc"], labels=tmp_path / "wrong.npy", device="cpu")
    assert right["acc"] == pytest.approx(full["acc"]) and wrong["acc"] < right["acc"]
    np.save(tmp_path / "short.npy", labels[:3])
    with pytest.raises(UserError, match="labels"):
        E.evaluate(tmp_path / "samples.npz", quad_dir, ["acc"], labels=tmp_path / "short.npy", device="cpu")


# ------------------------------------------------------------------------------------------ reporting, CLI


def test_markdown_and_plot(tmp_path):
    res = {"samples": "s.npz", "n_samples": 10, "fid": 12.345, "kid_mean": 0.0123, "kid_std": 0.001,
           "is_mean": None, "precision": 0.5, "recall": 0.25}
    table = E.markdown_table(res, ["fid", "kid", "is", "pr"]).splitlines()
    assert table[0] == "| samples | n | FID | KID x1e3 | IS | precision | recall |"
    assert table[2] == "| s.npz | 10 | 12.35 | 12.30 ± 1.00 | n/a | 0.500 | 0.250 |"
    png = E.plot_metric_curve([1, 2, 4], [[3.0, 2.0, 1.5], [4.0, 3.0, 2.0]], "CFG scale", "FID",
                              tmp_path / "plots" / "fid_cfg.png", labels=["a", "b"])
    with Image.open(png) as im:
        assert im.size[0] > 100 and im.format == "PNG"


def test_warns_once(capsys, monkeypatch):
    monkeypatch.setattr(M, "_warned_few", False)
    M._warn_few(100)
    M._warn_few(200)
    M._warn_few(5000)
    assert capsys.readouterr().err.count("warning") == 1


def test_cli_missing_path_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spheregen.cli", "eval", "--samples", str(tmp_path / "nope"),
                           "--ref", str(tmp_path / "nope2")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ MNIST (slow)


@pytest.mark.slow
def test_mnist_classifier_and_fid(tmp_path):
    from spheregen.data.builders import build_mnist

    build_mnist(tmp_path / "mnist", 32)
    model, config = train_classifier(tmp_path / "mnist", verbose=False)
    assert config["test_accuracy"] >= 0.97
    res = E.evaluate(tmp_path / "mnist", tmp_path / "mnist", ["fid"], max_n=200, device="cpu")
    assert 0 < res["fid"] < 100
