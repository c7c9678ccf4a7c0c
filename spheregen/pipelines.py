"""Pipelines in the style of diffusers: load a generator once, call it for images.

    pipe = SphereARPipeline.from_pretrained("runs/ar")            # or hf:OWNER/REPO/FILE, an authors' .pt
    images = pipe(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=50, seed=0).images

A call returns a `PipelineOutput` whose `images` are PIL images (or a float tensor [N, C, H, W] in [-1, 1] with
output_type="pt"; uint8 NHWC with "np"); `return_dict=False` gives the tuple (images,). Image k of a call uses
seed `seed + k`, as `spheregen sample` does, so a pipeline and the CLI draw the same images. Options a model
has beyond guidance and steps go in as keywords (SphereAR: cfg_schedule, sampler, temperature, first_token;
Sphere Encoder: cfg_position, shared_noise, gamma, r); an unknown one is a UserError.
`SphereEncoderPipeline` adds training-free editing: `manipulate`, `crossover` and `interpolate`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from spheregen.errors import UserError
from spheregen.generation import load_generator, sample_images
from spheregen.images import center_square_resize, from_uint8, read_image, to_pil, to_rgb_on_white, to_uint8
from spheregen.models import sphere_encoder_edit as edit
from spheregen.runtime import compile_model, default_device, precision_autocast

MODEL_NAMES = {"ar": "SphereAR", "sphere_encoder": "Sphere Encoder"}
ImageInput = Union[str, Path, Image.Image, torch.Tensor]


@dataclass
class PipelineOutput:
    """`images`: PIL images, a float tensor [N, C, H, W] in [-1, 1] ("pt") or uint8 NHWC ("np");
    `elapsed_s`: seconds the call took."""

    images: Any
    elapsed_s: float = 0.0
    labels: list[int] = field(default_factory=list)


def format_images(images: torch.Tensor, output_type: str = "pil") -> Any:
    """[-1, 1] float NCHW -> a list of PIL images ("pil"), the tensor itself ("pt") or uint8 NHWC ("np")."""
    if output_type == "pt":
        return images
    if output_type == "np":
        return to_uint8(images)
    if output_type == "pil":
        return [to_pil(a) for a in to_uint8(images)]
    raise UserError(f"output_type must be pil, pt or np, got {output_type!r}")


def seed_from(seed: int | None, generator: torch.Generator | None) -> int:
    """The base seed of a call: `seed`, else one drawn from `generator` (advancing it), else 0."""
    if seed is not None and generator is not None:
        raise UserError("pass seed or generator, not both")
    if generator is not None:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return 0 if seed is None else int(seed)


class SpherePipeline:
    """What both pipelines share: loading, device and precision, compilation, saving, the sampling call."""

    model_type = ""

    def __init__(self, model: torch.nn.Module, precision: str | None = None):
        if self.model_type and getattr(model, "model_type", None) != self.model_type:
            got = getattr(model, "model_type", type(model).__name__)
            raise UserError(f"{type(self).__name__} needs a {MODEL_NAMES[self.model_type]} checkpoint, this one "
                            f"holds a {MODEL_NAMES.get(got, got)} model; use the other pipeline or pipeline_for")
        self.model = model.eval()
        self.precision = precision  # None: each part's default (SphereAR's networks bf16 on CUDA, else fp32)
        precision_autocast("cpu", precision or "fp32")  # validates the name

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = "cpu", precision: str | None = None,
                        **kwargs) -> SpherePipeline:
        """A checkpoint directory, a run directory (its newest checkpoint), a save_pretrained directory, or an
        authors' file (local, or hf:OWNER/REPO/FILE), with EMA weights. device None: the best available."""
        model = load_generator(path, device=default_device(device), **kwargs)
        return cls(model, precision=precision)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0))

    def to(self, device: str | torch.device | None = None, precision: str | None = None) -> SpherePipeline:
        """Move the model (and an AR's decoder) to `device`; optionally switch precision (fp32 / bf16 / fp16)."""
        if device is not None:
            self.model.to(default_device(device))
        if precision is not None:
            precision_autocast(self.device, precision)
            self.precision = precision
        return self

    def compile(self, mode: str | None = None) -> SpherePipeline:
        """torch.compile the networks of a sampling step in place (runtime.compile_model)."""
        compile_model(self.model, mode)
        return self

    def save_pretrained(self, path: str | Path) -> Path:
        """A directory that `from_pretrained` (and `spheregen sample --ckpt`) loads."""
        self.model.save_pretrained(Path(path))
        return Path(path)

    def _labels(self, class_labels: int | list[int] | torch.Tensor | None, num_images: int | None) -> list[int]:
        if class_labels is None:
            if self.num_classes:
                raise UserError(f"this model is class-conditional: pass class_labels (ids in [0, "
                                f"{self.num_classes}))")
            return [0] * (num_images or 1)
        if not self.num_classes:
            raise UserError("this model is unconditional: drop class_labels and pass num_images")
        labels = torch.as_tensor(class_labels).flatten().tolist()
        if num_images is not None:  # num_images per label, as diffusers' num_images_per_prompt
            labels = [y for y in labels for _ in range(num_images)]
        return [int(y) for y in labels]

    def autocast(self) -> contextlib.AbstractContextManager:
        return precision_autocast(self.device, self.precision or "fp32")

    @torch.no_grad()
    def __call__(self, class_labels: int | list[int] | torch.Tensor | None = None, guidance_scale: float | None = None,
                 num_inference_steps: int | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, num_images: int | None = None, batch_size: int = 64,
                 output_type: str = "pil", return_dict: bool = True, **options) -> PipelineOutput | tuple:
        """Images for `class_labels` (num_images of each when given; for an unconditional model num_images in
        all). guidance_scale: the CFG scale; num_inference_steps: the model's steps; further keywords: the model's
        own sampling options. Unset options take the checkpoint's default_sampling (generation.store_default_sampling),
        else the model's defaults (CFG 1 = none). Image k uses seed `seed + k`."""
        start = time.perf_counter()
        labels = self._labels(class_labels, num_images)
        # the checkpoint's recommended settings (e.g. the demo's guidance sweep) first, then the caller's
        options = {**(getattr(self.model, "default_sampling", None) or {}), **options}
        if guidance_scale is not None:
            options["cfg"] = float(guidance_scale)
        if num_inference_steps is not None:
            options["steps"] = int(num_inference_steps)
        if self.precision and self.model_type == "ar":  # the AR sets its networks' autocast itself
            options.setdefault("precision", self.precision)
        opts = self.model.sampling_options(options)
        with self.autocast():
            images = sample_images(self.model, labels, seed_from(seed, generator), batch_size, opts, progress=False)
        images = format_images(images.float().clamp(-1, 1), output_type)
        if not return_dict:
            return (images,)
        return PipelineOutput(images, time.perf_counter() - start, labels)


class SphereARPipeline(SpherePipeline):
    """SphereAR: a transformer over sphere tokens with a flow-matching head, decoded by its tokenizer.
    `from_pretrained(path, tokenizer=None)` takes the tokenizer recorded in the checkpoint unless one is given;
    num_inference_steps is the flow-head solver's steps per token (default 100)."""

    model_type = "ar"

    def to(self, device: str | torch.device | None = None, precision: str | None = None) -> SphereARPipeline:
        super().to(device, precision)
        decoder = getattr(self.model, "_decoder", None)
        if device is not None and isinstance(decoder, torch.nn.Module):
            decoder.to(self.device)
        return self

    def save_pretrained(self, path: str | Path) -> Path:
        """The AR checkpoint with its tokenizer in path/tokenizer (recorded relative, so the folder moves whole)."""
        path = Path(path)
        decoder = getattr(self.model, "_decoder", None)
        if decoder is None:
            raise UserError("this pipeline has no tokenizer attached; load it with from_pretrained(..., tokenizer=)")
        config = self.model.config
        self.model.config = replace(config, tokenizer="tokenizer")
        try:
            self.model.save_pretrained(path)
        finally:
            self.model.config = config
        decoder.save_pretrained(path / "tokenizer")
        return path


class SphereEncoderPipeline(SpherePipeline):
    """The Sphere Encoder: images from noise in a few decoder passes (num_inference_steps, default 4), and
    training-free editing of given images. Images for editing: a path, a PIL image (composited on white,
    centre-cropped and resized to the model's size) or a float tensor [B, C, H, W] in [-1, 1]."""

    model_type = "sphere_encoder"

    def image_tensor(self, image: ImageInput) -> torch.Tensor:
        """An editing input as [B, C, size, size] in [-1, 1] on the model's device."""
        size, channels = self.model.config.image_size, self.model.config.channels
        if isinstance(image, (str, Path)):
            x = read_image(image, size, channels)
        elif isinstance(image, Image.Image):
            im = center_square_resize(to_rgb_on_white(image), size)
            arr = np.array(im.convert("L"))[..., None] if channels == 1 else np.array(im)
            x = from_uint8(arr[None])
        elif isinstance(image, torch.Tensor):
            x = image[None] if image.dim() == 3 else image
            if tuple(x.shape[1:]) != (channels, size, size):
                raise UserError(f"image tensors must be [B, {channels}, {size}, {size}], got {tuple(image.shape)}")
        else:
            raise UserError(f"an image is a path, a PIL image or a tensor, got {type(image).__name__}")
        return x.float().to(self.device)

    def _class(self, class_label: int | None, n: int) -> torch.Tensor | None:
        if class_label is None or not self.num_classes:
            if class_label is not None:
                raise UserError("this Sphere Encoder is unconditional; drop class_label")
            return None
        return torch.full((n,), int(class_label), dtype=torch.long, device=self.device)

    def _finish(self, steps: list[torch.Tensor], output_type: str, return_steps: bool, start: float):
        images = [format_images(x.float().cpu(), output_type) for x in steps]
        return PipelineOutput(images if return_steps else images[-1], time.perf_counter() - start)

    @torch.no_grad()
    def manipulate(self, image: ImageInput, class_label: int, num_inference_steps: int = 4, r: float = 1.0,
                   gamma: float = 0.0, guidance_scale: float = 1.0, seed: int = 0, output_type: str = "pil",
                   return_steps: bool = False) -> PipelineOutput:
        """Move an image to another class: `num_inference_steps` encode/decode loops conditioned on
        `class_label` (paper Fig. 8). return_steps: images after every loop (a list per step)."""
        start, x = time.perf_counter(), self.image_tensor(image)
        if not self.num_classes:
            raise UserError("manipulating a class needs a class-conditional Sphere Encoder")
        with self.autocast():
            steps = edit.manipulate(self.model, x, self._class(class_label, len(x)), num_inference_steps, r, gamma,
                                    guidance_scale, seed=seed)
        return self._finish(steps, output_type, return_steps, start)

    @torch.no_grad()
    def crossover(self, image_a: ImageInput, image_b: ImageInput, mode: str = "left-right",
                  num_inference_steps: int = 10, r: float = 0.25, gamma: float = 1.0, class_label: int | None = None,
                  seed: int = 0, output_type: str = "pil", return_steps: bool = False) -> PipelineOutput:
        """Stitch A and B (mode: left-right, top-bottom, center, quadrants, diagonal) and harmonise the
        composite in `num_inference_steps` loops (Fig. 9); return_steps starts with the raw composite."""
        start = time.perf_counter()
        xa, xb = self.image_tensor(image_a), self.image_tensor(image_b)
        with self.autocast():
            steps = edit.crossover(self.model, xa, xb, num_inference_steps, r, gamma,
                                   self._class(class_label, len(xa)), seed, mode)
        return self._finish(steps, output_type, return_steps, start)

    @torch.no_grad()
    def interpolate(self, image_a: ImageInput, image_b: ImageInput, num_images: int = 8,
                    class_label: int | None = None, num_inference_steps: int = 1, r: float = 0.25,
                    gamma: float = 1.0, seed: int = 0, output_type: str = "pil") -> PipelineOutput:
        """`num_images` images along the great circle from A's latent to B's (A and B included), decoded and
        refined by num_inference_steps - 1 loops."""
        start = time.perf_counter()
        xa, xb = self.image_tensor(image_a)[:1], self.image_tensor(image_b)[:1]
        with self.autocast():
            x = edit.interpolate(self.model, xa, xb, num_images, self._class(class_label, 1), num_inference_steps,
                                 r, gamma, seed)
        return PipelineOutput(format_images(x.float().cpu(), output_type), time.perf_counter() - start)


def pipeline_for(path: str | Path, device: str | torch.device | None = "cpu", precision: str | None = None,
                 **kwargs) -> SpherePipeline:
    """The right pipeline for whatever model the checkpoint holds."""
    model = load_generator(path, device=default_device(device), **kwargs)
    cls = SphereEncoderPipeline if model.model_type == "sphere_encoder" else SphereARPipeline
    return cls(model, precision=precision)
