"""Evaluating samples against a reference: reading images (PNG folders, ADM-style .npz, dataset directories),
cached reference statistics, and `evaluate` (every metric of spheregen.eval.metrics on one set), plus the
markdown table and curve plots of the results. The metric definitions are in spheregen.eval.metrics."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from spheregen.data.datasets import ImageDataset
from spheregen.errors import UserError
from spheregen.eval.classifier import accuracy_from_logits, get_classifier, weights_key
from spheregen.eval.inception import extract_features, load_inception, resolve_device
from spheregen.eval.metrics import (
    REF_SAMPLE,
    _warn_few,
    frechet_distance_to_features,
    inception_score,
    kid,
    mean_cov,
    precision_recall,
)


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
        res.update(_inception_metrics(images, ref, metrics, inception, ref_split, ref_max_n, batch_size, dev))
    if {"acc", "dfid"} & set(metrics):
        res.update(_classifier_metrics(images, labels, ref, metrics, classifier_dir, ref_split, ref_max_n,
                                       batch_size, dev))
    res["seconds"] = round(time.time() - start, 1)
    return res


def _inception_metrics(images, ref, metrics: Sequence[str], inception: str | None, ref_split: str,
                       ref_max_n: int | None, batch_size: int, dev: torch.device) -> dict:
    """FID, KID, precision/recall and IS on Inception features of the samples against the reference."""
    net = load_inception(inception, dev)
    feats = extract_features(images, net, batch_size, dev, "inception")
    stats = reference_stats(ref, net, net.key, ref_split, ref_max_n, batch_size, dev,
                            need_feats=bool({"kid", "pr"} & set(metrics)))
    res = {"network": net.key, "n_ref": int(stats["n"])}
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
    return res


def _classifier_metrics(images, labels, ref, metrics: Sequence[str], classifier_dir, ref_split: str,
                        ref_max_n: int | None, batch_size: int, dev: torch.device) -> dict:
    """Class accuracy and the classifier-feature FID (dfid) with the dataset's small classifier."""
    res: dict = {}
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
    return res

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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

METRICS = ("fid", "kid", "is", "pr", "acc", "dfid")

INCEPTION_METRICS = {"fid", "kid", "is", "pr"}
