"""Images at the file boundary: uint8 <-> float [-1, 1], grids, reading one file, PSNR.

Inside the library images are float tensors [N, C, H, W] in [-1, 1]; uint8 [N, H, W, C] arrays exist only at
file boundaries, converted with u = clamp(round((x + 1) 127.5), 0, 255) and x = u / 127.5 - 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from spheregen.errors import UserError

LANCZOS = Image.Resampling.LANCZOS


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC."""
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (array or tensor) -> float32 NCHW in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_pil(array: np.ndarray) -> Image.Image:
    """One uint8 HWC array (C = 1 or 3) -> a PIL image (L or RGB)."""
    return Image.fromarray(array[..., 0], "L") if array.shape[-1] == 1 else Image.fromarray(array, "RGB")


def save_grid(images: torch.Tensor, rows: int, path: str | Path, pad: int = 2, scale: int = 1) -> Path:
    """Tile images [N, C, H, W] in [-1, 1] into `rows` rows (row-major, ceil(N / rows) columns) with a black
    `pad`-pixel border, upsample `scale`x (nearest) and write a PNG."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    cols = math.ceil(n / rows)
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    img = to_pil(canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [-1, 1] images on the [0, 1] scale: 10 log10(1 / MSE), MSE floored at 1e-10."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def to_rgb_on_white(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited onto white."""
    if im.mode.startswith(("I", "F")):  # 16/32-bit grayscale: map to 8 bits
        a = np.asarray(im, dtype=np.float64)
        a = a / 257.0 if a.max() > 255 else a
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def center_square_resize(im: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square and resize (LANCZOS) to size x size."""
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s)).resize((size, size), LANCZOS, reducing_gap=3.0)


def read_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """One image file -> [1, C, size, size] in [-1, 1] (composited on white, center crop + resize; RGB or L)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist; pass an image file")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = center_square_resize(to_rgb_on_white(im), size)
    except Exception as e:  # anything Pillow raises for a broken or non-image file
        reason = " ".join(str(e).split())[:100] or type(e).__name__
        raise UserError(f"cannot read image {path} ({reason}); pass a PNG/JPEG/... image file") from None
    if channels == 1:
        im = im.convert("L")
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(1, size, size, channels)
    return from_uint8(t)
