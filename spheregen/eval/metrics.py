"""Sample-quality metrics: FID, KID, Inception Score, precision/recall, rFID, class accuracy, domain FID.

All Inception metrics use the pool features of `spheregen.eval.inception` (see there for the exact
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
  acc   = class accuracy of conditional samples under the dataset's small CNN (spheregen.eval.classifier)
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

import sys

import numpy as np
import torch

from spheregen.errors import UserError
from spheregen.eval.inception import inception_features

REF_SAMPLE = 10_000
FID_MIN_SAMPLES = 2048
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


