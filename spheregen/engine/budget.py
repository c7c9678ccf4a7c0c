"""Fitting a demo's training stages into a time budget: the shipped tiny configs scaled to the data, the step time
of each stage measured on the first steps of a fresh model (in a scratch directory, with the real Trainer, so
logging, EMA and checkpoint writes are counted), and step counts and schedules set to fill each stage's share."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spheregen.config import from_dict, load_config, parse_override
from spheregen.data.datasets import ImageDataset
from spheregen.engine.trainer import TrainConfig, Trainer
from spheregen.errors import UserError
from spheregen.models.ar import ARConfig, SphereAR
from spheregen.models.sphere_encoder import SphereEncoder
from spheregen.models.sphere_encoder_nets import SphereEncoderConfig
from spheregen.models.tokenizer import Tokenizer, TokenizerConfig

PROBE_WARM, PROBE_STEPS = 3, 12  # untimed steps (allocations, first-call costs), then timed ones
MIN_STEPS = 30
CKPT_SECONDS = 60  # a checkpoint about once a minute: a killed run loses at most that


@dataclass
class StagePlan:
    """One training stage: its measured seconds per step and the steps that fill `seconds`."""

    name: str
    seconds: float
    step_s: float
    steps: int

    @property
    def expected_s(self) -> float:
        return self.steps * self.step_s


def apply_overrides(configs: dict[str, dict], overrides: list[str]) -> dict[str, dict]:
    """`stage.section.key=value` (TOML values) applied to the derived configs, e.g. ar.train.batch_size=64."""
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) != 3 or keys[0] not in configs:
            raise UserError(f"--set {text}: use STAGE.SECTION.KEY=VALUE with STAGE one of {', '.join(configs)}")
        configs[keys[0]].setdefault(keys[1], {})[keys[2]] = value
    return configs


def derive_configs(model: str, size: int, channels: int, data_dir: str | Path) -> dict[str, dict]:
    """{stage: config} from the shipped tiny configs: grayscale data starts from the MNIST ones, RGB from the
    emoji ones; at 64 px the tokenizer gets a third stride-2 stage and the Sphere Encoder 8 px patches, so both
    keep an 8 x 8 token grid. image_size, channels, classes and the token shape are read off the data later."""
    base = "mnist_tiny" if channels == 1 else "emoji32_tiny"
    data = {"path": str(data_dir)}
    if model == "sphere":
        cfg = load_config("sphere", base)
        if size == 64:
            cfg["model"]["patch_size"] = 8
        cfg["data"] = data
        return {"sphere": cfg}
    tok = load_config("tokenizer", base)
    tok["model"].update(image_size=size, in_channels=channels)
    if size == 64:
        ch = list(tok["model"]["channels"])
        tok["model"]["channels"] = [ch[0]] + ch
    tok["data"] = {**tok.get("data", {}), **data}
    ar = load_config("ar", "demo_tiny")
    ar["data"] = {**data, "split": "train"}
    return {"tokenizer": tok, "ar": ar}


def fit_schedule(train: dict, steps: int, step_s: float) -> dict:
    """The [train] table for `steps` steps: warmup at most a tenth of them, the cosine over the rest (the Trainer
    decays to min_lr at train.steps), a checkpoint about once a minute, ~40 log points, evaluation at the end."""
    out = dict(train)
    out["steps"] = int(steps)
    out["warmup_steps"] = min(int(train.get("warmup_steps", 0)), max(1, steps // 10))
    out["ckpt_every"] = max(10, int(CKPT_SECONDS / max(step_s, 1e-6)))
    out["log_every"] = max(1, min(int(train.get("log_every", 25)), steps // 40))
    out["eval_every"] = 0
    return out


def steps_to_fit(seconds: float, step_s: float) -> int:
    return max(MIN_STEPS, int(seconds / max(step_s, 1e-6)))


class _RandomTokens:
    """A stand-in latent cache for timing the AR: random tokens of radius R on the tokenizer's grid."""

    def __init__(self, n: int, tokens: int, dim: int, radius: float, num_classes: int):
        self.n, self.shape, self.radius, self.k = n, (tokens, dim), radius, max(num_classes, 1)

    def __len__(self) -> int:
        return self.n

    def get_batch(self, indices, flip_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(len(indices), *self.shape)
        return self.radius * z / z.norm(dim=-1, keepdim=True), torch.randint(self.k, (len(indices),))


def stage_model(stage: str, cfg: dict, data: ImageDataset, tokenizer: Tokenizer | None = None):
    """A fresh model of `stage` as `spheregen train` would build it for this data, and its training items."""
    found = {"image_size": data.image_size, "num_classes": data.num_classes}
    if stage == "tokenizer":
        return Tokenizer(from_dict(TokenizerConfig, cfg["model"], "model.")), data
    if stage == "sphere":
        mcfg = from_dict(SphereEncoderConfig, {**cfg["model"], **found, "channels": data.channels}, "model.")
        return SphereEncoder(mcfg), data
    grid = tuple(tokenizer.grid)
    model = {**cfg["model"], "token_dim": tokenizer.config.latent_dim, "grid": list(grid),
             "radius": float(tokenizer.radius), "num_classes": data.num_classes}
    tokens = _RandomTokens(len(data), grid[0] * grid[1], tokenizer.config.latent_dim, tokenizer.radius,
                           data.num_classes)
    return SphereAR(from_dict(ARConfig, model, "model.")), tokens


def probe_step_seconds(model: torch.nn.Module, items, train: dict) -> float:
    """Seconds per optimizer step of `model` on `items` with the real Trainer: PROBE_WARM untimed steps, then
    the mean over PROBE_STEPS steps (a checkpoint write included, as in training)."""
    cfg = from_dict(TrainConfig, {**train, "steps": PROBE_WARM + PROBE_STEPS, "log_every": PROBE_STEPS,
                                  "ckpt_every": 10 ** 9, "eval_every": 0, "logger": "csv"}, "train.")
    scratch = Path(tempfile.mkdtemp(prefix="spheregen-probe-"))
    try:
        trainer = Trainer(model, items, cfg, scratch, progress=False)
        trainer.fit(until=PROBE_WARM)
        t0 = time.perf_counter()
        trainer.fit()
        return (time.perf_counter() - t0) / PROBE_STEPS
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@torch.no_grad()
def probe_sample_seconds(model: torch.nn.Module, options: dict, n: int = 20) -> float:
    """Seconds per generated image of `model` (any weights: the cost does not depend on them) at batch n."""
    labels = torch.zeros(n, dtype=torch.long)
    model.eval()
    t0 = time.perf_counter()
    model.generate_images(labels, list(range(n)), options)
    return (time.perf_counter() - t0) / n


def plan_stages(configs: dict[str, dict], data: ImageDataset, train_seconds: float, shares: dict[str, float],
                fixed_steps: dict[str, int | None]) -> tuple[list[StagePlan], dict]:
    """Measure each stage's step time on a fresh model and give it steps for its share of `train_seconds`
    (or `fixed_steps[stage]` when set). Returns the plans and the fresh models (the sweep's cost is timed
    on them)."""
    plans, models = [], {}
    torch.manual_seed(0)
    for stage, share in shares.items():
        cfg = configs[stage]
        model, items = stage_model(stage, cfg, data, models.get("tokenizer"))
        step_s = probe_step_seconds(model, items, cfg["train"])
        models[stage] = model
        seconds = share * train_seconds
        steps = fixed_steps.get(stage) or steps_to_fit(seconds, step_s)
        plans.append(StagePlan(stage, seconds, step_s, steps))
        cfg["train"] = fit_schedule(cfg["train"], steps, step_s)
    return plans, models


def rescale_steps(plan: StagePlan, seconds_left: float, slowdown: float) -> int:
    """Steps for a stage about to start when the earlier stages ran `slowdown` x their measured speed (a busier
    machine): never more than planned, never fewer than MIN_STEPS."""
    if not math.isfinite(slowdown):
        return plan.steps
    fit = steps_to_fit(seconds_left, plan.step_s * max(slowdown, 1.0))
    return max(min(MIN_STEPS, plan.steps), min(plan.steps, fit))
