"""A small per-dataset CNN classifier: class accuracy of conditional samples and a fast "domain FID".

Architecture (any size >= 16 px, 1 or 3 channels; width w = 16 by default):
  conv3x3(C -> w) [stride 2 when the images are >= 48 px] - conv3x3(w -> w) - maxpool2
  - conv3x3(w -> 2w) - conv3x3(2w -> 2w) - maxpool2 - conv3x3(2w -> 4w) - global average pool
  -> features (4w = 64 numbers, the penultimate layer used by the domain FID) -> dropout -> linear(K).
Every conv is followed by BatchNorm and ReLU.

Trained once on a dataset's train split (Adam, cosine learning rate, random +-2 px shifts), then
checkpointed to DIR/classifier/{model.safetensors, config.json}; `get_classifier` reuses the checkpoint.
The config records the held-out test-split accuracy. Cost on 2 idle CPU cores: about 25 s for
the 5,000-digit MNIST at 32 px (98.8% test accuracy); prediction runs at thousands of images per second.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from spheregen.data.datasets import ImageDataset
from spheregen.errors import UserError

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def _block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """forward(x in [-1, 1] NCHW) -> logits [N, K]; features(x) -> penultimate [N, 4 * width]."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 16):
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes,
                       "image_size": image_size, "width": width}
        w = width
        self.body = nn.Sequential(
            *_block(in_channels, w, 2 if image_size >= 48 else 1), *_block(w, w), nn.MaxPool2d(2),
            *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config["in_channels"]
        if x.ndim != 4 or x.shape[1] != c:
            raise UserError(f"the classifier expects N x {c} x H x W images, got shape {tuple(x.shape)}; "
                            "use a classifier trained on a dataset with the same number of channels")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, max_shift: int = 2, gen: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift] (edge pixels repeated)."""
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # [N, H]
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # [N, W]
    idx = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@torch.no_grad()
def predict_logits(model: SmallCNN, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits [N, K] for float [-1, 1] NCHW images, in eval mode, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.config["num_classes"])


@torch.no_grad()
def classifier_features(model: SmallCNN, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features [N, 4 * width] for float [-1, 1] NCHW images."""
    model.eval()
    device = next(model.parameters()).device
    out = [model.features(images[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    """mean_i [argmax_k logits_ik == y_i]."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    if len(labels) != len(logits):
        raise UserError(f"{len(labels)} labels for {len(logits)} images; pass one label per image")
    if len(labels) == 0:
        raise UserError("no images to classify")
    return float((logits.argmax(1).cpu() == labels).double().mean())


def class_accuracy(images: torch.Tensor, labels: torch.Tensor | np.ndarray, classifier: SmallCNN,
                   batch_size: int = 256) -> float:
    """Fraction of float [-1, 1] NCHW images whose argmax class equals its label."""
    if len(labels) != len(images):
        raise UserError(f"{len(labels)} labels for {len(images)} images; pass one label per image")
    return accuracy_from_logits(predict_logits(classifier, images, batch_size), labels)


def train_classifier(dataset_dir: str | Path, epochs: int = 12, batch_size: int = 128, lr: float = 3e-3,
                     width: int = 16, device: str | torch.device = "cpu", seed: int = 0,
                     verbose: bool = True) -> tuple[SmallCNN, dict]:
    """Train on the dataset's train split; returns the model and its config (with test accuracy)."""
    train, test = ImageDataset(dataset_dir, "train"), ImageDataset(dataset_dir, "test")
    if train.num_classes < 2:
        raise UserError(f"{dataset_dir} has {train.num_classes} classes; the classifier (acc, dfid) "
                        "needs a labelled dataset with at least 2 classes")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # seeded init and dropout; the caller's global RNG state is untouched
        torch.manual_seed(seed)
        model = SmallCNN(train.channels, train.num_classes, train.image_size, width).to(device)
        seconds = _fit(model, train, epochs, batch_size, lr, gen, device, verbose)
    test_acc = None
    if len(test):
        x, y = test.get_batch(np.arange(len(test)))
        test_acc = class_accuracy(x, y, model)
    config = dict(model.config, classes=train.classes, dataset=str(Path(dataset_dir).resolve()),
                  epochs=epochs, test_accuracy=test_acc, train_seconds=round(seconds, 1))
    if verbose:
        print(f"classifier: test accuracy {test_acc} after {seconds:.0f} s", file=sys.stderr)
    return model.eval(), config


def _fit(model: SmallCNN, train: ImageDataset, epochs: int, batch_size: int, lr: float, gen: torch.Generator,
         device: str | torch.device, verbose: bool) -> float:
    """Adam + cosine decay per step, cross-entropy on randomly shifted batches; returns seconds."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(train), batch_size):
            x, y = train.get_batch(perm[i:i + batch_size])
            x = random_shift(x, 2, gen).to(device)
            loss = F.cross_entropy(model(x), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
        if verbose:
            print(f"classifier epoch {epoch + 1}/{epochs}: loss {loss_sum / len(train):.4f}", file=sys.stderr)
    return time.time() - start


def save_classifier(model: SmallCNN, config: dict, out_dir: str | Path) -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return out


def load_classifier(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> tuple[SmallCNN, dict]:
    """Read a checkpoint written by save_classifier; returns (model in eval mode, config)."""
    d = Path(ckpt_dir)
    if not (d / WEIGHTS).is_file() or not (d / CONFIG).is_file():
        raise UserError(f"{d} holds no classifier ({WEIGHTS} + {CONFIG}); train one with "
                        "`spheregen eval --metrics acc --ref DATASET_DIR`")
    try:
        config = json.loads((d / CONFIG).read_text())
        model = SmallCNN(config["in_channels"], config["num_classes"], config["image_size"], config["width"])
        model.load_state_dict(load_file(str(d / WEIGHTS)))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:120]
        raise UserError(f"cannot read the classifier in {d} ({reason}); delete it to retrain") from None
    return model.to(device).eval(), config


def weights_key(ckpt_dir: str | Path) -> str:
    """A short hash of the classifier weights, to key cached domain-FID statistics."""
    return "classifier-" + hashlib.sha1((Path(ckpt_dir) / WEIGHTS).read_bytes()).hexdigest()[:10]


def get_classifier(dataset_dir: str | Path | None, ckpt_dir: str | Path | None = None,
                   device: str | torch.device = "cpu") -> tuple[SmallCNN, dict, Path]:
    """Load ckpt_dir (default dataset_dir/classifier) or, if it is empty, train on dataset_dir and save."""
    if ckpt_dir is None:
        if dataset_dir is None:
            raise UserError("acc and dfid need a classifier: pass --classifier DIR, or a dataset dir as --ref")
        ckpt_dir = Path(dataset_dir) / "classifier"
    ckpt_dir = Path(ckpt_dir)
    if not ((ckpt_dir / WEIGHTS).is_file() and (ckpt_dir / CONFIG).is_file()):
        if dataset_dir is None:
            raise UserError(f"{ckpt_dir} holds no classifier; pass a dataset dir as --ref to train one there")
        print(f"training a classifier on {dataset_dir} (once; saved to {ckpt_dir})", file=sys.stderr)
        model, config = train_classifier(dataset_dir, device=device)
        save_classifier(model, config, ckpt_dir)
    model, config = load_classifier(ckpt_dir, device)
    return model, config, ckpt_dir
