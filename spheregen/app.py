"""The web app of `spheregen serve`: a Gradio page over the pipelines (spheregen.pipelines).

Sampling: choose a checkpoint, classes, guidance, steps, seed and images per class; the page shows the grid (one
row per class) and the time taken. Sphere Encoder checkpoints add editing of uploaded images: move one to
another class, cross two over, or interpolate between them. Gradio is an optional extra
(`pip install 'spheregen[app]'`, or `make app`); this module imports it only when a page is built, and every
error a user can cause (a bad upload, a class out of range) is shown as one line on the page, never a traceback.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from spheregen.errors import UserError
from spheregen.pipelines import SphereEncoderPipeline, SpherePipeline, pipeline_for

MAX_UPLOAD_MB = 20
MAX_UPLOAD_PIXELS = 50_000_000  # also stops decompression bombs before Pillow decodes them
GRID_CELL = 96  # the grid is upscaled (nearest) so that each image is at least this many pixels wide
INSTALL_HINT = "the web app needs Gradio: pip install 'spheregen[app]' (or `make app` in a clone)"


def import_gradio():
    """gradio, or a UserError saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    try:
        import gradio
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return gradio


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def checkpoint_labels(paths: list[str]) -> dict[str, str]:
    """A short unique label per checkpoint (its folder name, or more of its path when names repeat)."""
    labels: dict[str, str] = {}
    for path in paths:
        parts = Path(str(path).rstrip("/")).parts or (str(path),)
        depth = 1
        while "/".join(parts[-depth:]) in labels and depth < len(parts):
            depth += 1
        label = "/".join(parts[-depth:])
        labels[label if label not in labels else str(path)] = str(path)
    return labels


def grid(images: list[Image.Image], rows: int) -> Image.Image:
    """Tile PIL images row-major into `rows` rows with a 2 px black border, upscaled for the page."""
    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    canvas = Image.new(images[0].mode, (cols * (w + 2) + 2, rows * (h + 2) + 2))
    for k, im in enumerate(images):
        canvas.paste(im, (2 + (k % cols) * (w + 2), 2 + (k // cols) * (h + 2)))
    scale = max(1, GRID_CELL // w)
    return canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)


def check_upload(path: str | Path | None, what: str = "image") -> Image.Image:
    """An uploaded file as a loaded PIL image, or a UserError that says what is wrong with it."""
    if not path:
        raise UserError(f"upload {what} first")
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_UPLOAD_MB * 2**20:
        raise UserError(f"{what} is too large ({size / 2**20:.1f} MB); upload one under {MAX_UPLOAD_MB} MB")
    try:
        im = Image.open(path)
        if im.width * im.height > MAX_UPLOAD_PIXELS:
            raise UserError(f"{what} is too large ({im.width} x {im.height} pixels); upload one under "
                            f"{MAX_UPLOAD_PIXELS // 10**6} megapixels")
        im.load()
    except UserError:
        raise
    except Exception:  # whatever Pillow raises for a file that is not an image it can read
        raise UserError(f"{what} ({path.name}) is not an image Pillow can read; upload a PNG, JPEG or WebP") from None
    return im


def parse_classes(text: str, num_classes: int) -> list[int] | None:
    """'3, 7' -> [3, 7]; empty: every class (at most 10); None for an unconditional model."""
    if not num_classes:
        return None
    if not str(text).strip():
        return list(range(min(num_classes, 10)))
    try:
        ids = [int(t) for t in str(text).replace(" ", ",").split(",") if t.strip()]
    except ValueError:
        raise UserError(f"classes must be comma-separated integers, got {text!r}") from None
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"class {bad[0]} is out of range; this model has classes 0 to {num_classes - 1}")
    return ids


class SphereApp:
    """The page's state and callbacks: checkpoints by label, each pipeline loaded on first use and kept."""

    def __init__(self, ckpts: list[str], device: str | torch.device | None = "cpu", max_images: int = 64):
        if not ckpts:
            raise UserError("pass at least one --ckpt")
        self.paths = checkpoint_labels(ckpts)
        self.device = device
        self.max_images = max_images
        self.pipes: dict[str, SpherePipeline] = {}

    def pipeline(self, label: str) -> SpherePipeline:
        if label not in self.paths:
            raise UserError(f"unknown checkpoint {label!r}; choose one of {', '.join(self.paths)}")
        if label not in self.pipes:
            self.pipes[label] = pipeline_for(self.paths[label], device=self.device)
        return self.pipes[label]

    def editor(self, label: str) -> SphereEncoderPipeline:
        pipe = self.pipeline(label)
        if not isinstance(pipe, SphereEncoderPipeline):
            raise UserError(f"{label} is a SphereAR checkpoint; editing needs a Sphere Encoder checkpoint")
        return pipe

    def describe(self, label: str) -> str:
        """One line about a checkpoint: model, classes, image size."""
        pipe = self.pipeline(label)
        kind = "Sphere Encoder (editing below)" if isinstance(pipe, SphereEncoderPipeline) else "SphereAR"
        classes = f"classes 0-{pipe.num_classes - 1}" if pipe.num_classes else "unconditional"
        return f"{label}: {kind}, {classes}"

    def generate(self, label: str, classes: str, guidance: float, steps: int, seed: int, per_class: int):
        """The sample grid (one row per class) and a status line with the time taken."""
        pipe = self.pipeline(label)
        ids = parse_classes(classes, pipe.num_classes)
        n = int(per_class)
        if n < 1 or n * len(ids or [0]) > self.max_images:
            raise UserError(f"at most {self.max_images} images per click (classes x images per class)")
        out = pipe(class_labels=ids, num_images=n, guidance_scale=float(guidance),
                   num_inference_steps=int(steps), seed=int(seed))
        rows = len(ids) if ids else max(1, round(math.sqrt(n)))
        return grid(out.images, rows), f"{len(out.images)} images in {out.elapsed_s:.2f} s (seeds {int(seed)}+)"

    def manipulate(self, label: str, image, cls: int, steps: int, seed: int):
        pipe = self.editor(label)
        im = check_upload(image, "the image")
        out = pipe.manipulate(im, int(cls), num_inference_steps=int(steps), seed=int(seed), return_steps=True)
        return grid([im_ for step in out.images for im_ in step], 1), \
            f"class {int(cls)}, steps 1-{int(steps)} in {out.elapsed_s:.2f} s"

    def crossover(self, label: str, image_a, image_b, mode: str, steps: int, seed: int):
        pipe = self.editor(label)
        a, b = check_upload(image_a, "image A"), check_upload(image_b, "image B")
        out = pipe.crossover(a, b, mode=mode, num_inference_steps=int(steps), seed=int(seed), return_steps=True)
        frames = [step[0] for step in out.images]
        return grid([frames[0], frames[-1]], 1), f"{mode} composite, harmonised in {int(steps)} steps, " \
                                                 f"{out.elapsed_s:.2f} s"

    def interpolate(self, label: str, image_a, image_b, n: int, steps: int):
        pipe = self.editor(label)
        a, b = check_upload(image_a, "image A"), check_upload(image_b, "image B")
        out = pipe.interpolate(a, b, num_images=int(n), num_inference_steps=int(steps))
        return grid(out.images, 1), f"{int(n)} images from A to B in {out.elapsed_s:.2f} s"


def safe(fn: Callable, outputs: int) -> Callable:
    """fn with every error turned into a status line (no image, no traceback on the page); `outputs`: how many
    values fn returns (the last is the status line; 1: fn returns the line itself)."""

    def failed(message: str):
        return message if outputs == 1 else (None,) * (outputs - 1) + (message,)

    def run(*args):
        try:
            return fn(*args)
        except UserError as e:
            return failed(f"Error: {e}")
        except Exception as e:  # a bug or an out-of-memory: still one line, with its type
            return failed(f"Error: {type(e).__name__}: {' '.join(str(e).split())[:300]}")

    run.__name__ = fn.__name__
    return run


def _sampling_tab(gr, app: SphereApp, choice, first: tuple) -> None:
    with gr.Row():
        classes = gr.Textbox(label="classes (comma-separated ids; empty: the first 10)", value="")
        per_class = gr.Slider(1, 16, value=4, step=1, label="images per class")
    with gr.Row():
        guidance = gr.Slider(1.0, 10.0, value=1.0, step=0.25, label="guidance scale (1 = none)")
        steps = gr.Slider(1, 100, value=4, step=1, label="steps (SphereAR: solver steps per token; "
                                                         "Sphere Encoder: decoder passes)")
        seed = gr.Number(value=0, precision=0, label="seed (image k uses seed + k)")
    button = gr.Button("Generate", variant="primary")
    image = gr.Image(first[0], label="samples (one row per class)", type="pil", format="png", elem_id="samples")
    status = gr.Textbox(first[1], label="status", interactive=False, elem_id="sample-status")
    inputs = [choice, classes, guidance, steps, seed, per_class]
    button.click(safe(app.generate, 2), inputs, [image, status], api_name="generate")


def _edit_tab(gr, app: SphereApp, choice) -> None:
    gr.Markdown("Sphere Encoder checkpoints only. Uploads: PNG / JPEG / WebP, under "
                f"{MAX_UPLOAD_MB} MB; they are centre-cropped and resized to the model's size.")
    with gr.Row():
        a = gr.File(label="image A", type="filepath")
        b = gr.File(label="image B (crossover, interpolate)", type="filepath")
    with gr.Row():
        cls = gr.Number(value=0, precision=0, label="target class (manipulate)")
        steps = gr.Slider(1, 12, value=4, step=1, label="steps")
        seed = gr.Number(value=0, precision=0, label="seed")
    with gr.Row():
        mode = gr.Dropdown(["left-right", "top-bottom", "center", "quadrants", "diagonal"], value="left-right",
                           label="crossover stitch")
        n = gr.Slider(3, 16, value=8, step=1, label="interpolation images")
    with gr.Row():
        go_m, go_c, go_i = gr.Button("Manipulate class"), gr.Button("Cross over"), gr.Button("Interpolate")
    image = gr.Image(label="result", type="pil", format="png")
    status = gr.Textbox(label="status", interactive=False, elem_id="edit-status")
    go_m.click(safe(app.manipulate, 2), [choice, a, cls, steps, seed], [image, status], api_name="manipulate")
    go_c.click(safe(app.crossover, 2), [choice, a, b, mode, steps, seed], [image, status], api_name="crossover")
    go_i.click(safe(app.interpolate, 2), [choice, a, b, n, steps], [image, status], api_name="interpolate")


def build_page(app: SphereApp, sample_on_load: bool = True):
    """The Gradio Blocks page (not launched). sample_on_load: the page opens with a grid of the first checkpoint
    (4 images per class, 4 steps, seed 0), drawn here once, so it shows without a round trip."""
    gr = import_gradio()
    labels = list(app.paths)
    first = safe(app.generate, 2)(labels[0], "", 1.0, 4, 0, 4) if sample_on_load else (None, "")
    with gr.Blocks(title="spheregen") as page:
        gr.Markdown("# spheregen\nSamples and training-free edits from SphereAR and Sphere Encoder checkpoints.")
        with gr.Row():
            choice = gr.Dropdown(labels, value=labels[0], label="checkpoint")
            about = gr.Textbox(label="model", interactive=False)
        describe = safe(app.describe, 1)
        choice.change(describe, [choice], [about], api_name="describe")
        with gr.Tab("Sample"):
            _sampling_tab(gr, app, choice, first)
        with gr.Tab("Edit (Sphere Encoder)"):
            _edit_tab(gr, app, choice)
        page.load(describe, [choice], [about], api_name=False)
    return page


def serve(ckpts: list[str], host: str = "127.0.0.1", port: int | None = None, device: str | None = "cpu",
          block: bool = True, sample_on_load: bool = True):
    """Build and launch the page on host:port (127.0.0.1 by default: only this machine can reach it).
    block False: return the running page (close it with page.close())."""
    app = SphereApp(ckpts, device=device)
    page = build_page(app, sample_on_load)
    page.queue(default_concurrency_limit=1)  # one model call at a time: the CPU / GPU is the bottleneck
    page.launch(server_name=host, server_port=port or free_port(host), prevent_thread_lock=not block,
                share=False, inbrowser=False, show_error=False, quiet=not block)
    return page
