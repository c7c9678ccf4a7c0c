"""`spheregen train ar`: SphereAR on a latent cache (or on latents encoded on the fly), and its evaluation (a
grid of guided samples, one row per class)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from spheregen.config import from_dict
from spheregen.data.latents import LatentCache, OnTheFlyLatents
from spheregen.data.lazy import open_dataset
from spheregen.engine.setup import fill_from_data
from spheregen.errors import UserError
from spheregen.generation import load_tokenizer
from spheregen.images import save_grid
from spheregen.models.ar import ARConfig, ARSampling, SphereAR


def training_setup(config: dict, args) -> tuple[SphereAR, object, object]:
    """`spheregen train ar --config NAME --tokenizer CKPT [--latents CACHE | --no-cache]`.

    With a latent cache each step draws a fresh posterior sample from the cached (mu, kappa); --no-cache
    runs the tokenizer's encoder on the images of data.path every step instead (for comparison). The token
    dim, grid, radius and classes come from the latents."""
    source, tokenizer_path = latent_source(config, args)
    found = {"token_dim": int(source.latent_dim), "grid": [int(g) for g in source.grid],
             "radius": float(source.radius), "num_classes": int(source.num_classes)}
    model = fill_from_data(config.get("model", {}), found, "the latents", keep_zero=("num_classes",))
    if tokenizer_path:
        model["tokenizer"] = str(Path(tokenizer_path).resolve())
    return SphereAR(from_dict(ARConfig, model, "model.")), source, make_eval_fn(config.get("eval", {}))


def latent_source(config: dict, args) -> tuple[object, str | None]:
    """(the latent source, the tokenizer checkpoint path) from --latents / --no-cache / --tokenizer."""
    data = config.get("data", {})
    tokenizer_path = getattr(args, "tokenizer", None) or data.get("tokenizer")
    if getattr(args, "no_cache", False):
        if not tokenizer_path:
            raise UserError("--no-cache encodes images on the fly and needs --tokenizer CKPT")
        if not data.get("path"):
            raise UserError("--no-cache needs the image dataset: pass --data DIR or set data.path")
        images = open_dataset(data["path"], split=data.get("split", "train"))
        return OnTheFlyLatents(load_tokenizer(tokenizer_path), images), tokenizer_path
    latents_path = getattr(args, "latents", None) or data.get("latents")
    if not latents_path:
        raise UserError("train ar needs --latents CACHE (a latent cache from the tokenizer), "
                        "or --no-cache with --tokenizer CKPT")
    source = LatentCache(latents_path)
    return source, tokenizer_path or getattr(source, "tokenizer_path", None)


def make_eval_fn(eval_cfg: dict):
    """eval_fn(model, step, out_dir): a grid of samples (one row per class, up to 10 classes) as a PNG; the
    [eval] table holds ARSampling fields (default CFG 3, 25 steps) and per_class."""
    per = int(eval_cfg.get("per_class", 8))
    options = from_dict(ARSampling, {"cfg": 3.0, "steps": 25, **{k: v for k, v in eval_cfg.items()
                                                                  if k != "per_class"}}, "eval.")

    def eval_fn(model: SphereAR, step: int, out_dir: Path) -> dict:
        if not model.config.tokenizer or not Path(model.config.tokenizer).is_dir():
            return {}
        if model._decoder is None:
            model.attach_decoder(load_tokenizer(model.config.tokenizer))
        n_cls = min(max(model.num_classes, 1), 10)
        labels = torch.arange(n_cls).repeat_interleave(per)
        t0 = time.perf_counter()
        images = model.generate_images(labels, list(range(len(labels))), replace(options, progress=False))
        save_grid(images, n_cls, out_dir / f"samples_step{step:08d}.png")
        return {"eval_sample_s": time.perf_counter() - t0}

    return eval_fn
