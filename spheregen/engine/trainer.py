"""One training loop for every model: AdamW, warmup + cosine, EMA, grad clip, accumulation, AMP, resume.

A model plugs in by defining
    training_loss(batch, step) -> (loss, {"term": tensor, ...}) or (loss, terms, context)
and, optionally,
    param_groups(weight_decay) -> list[dict]          custom optimizer groups (default: decay on >= 2-D weights)
    second_objective: nn.Module with loss(context, step) -> (loss, terms), trained by a second AdamW
                      (train.disc_lr) after each main step on the contexts of its micro-batches (a GAN's
                      discriminator); its parameters stay out of the main optimizer and the EMA; its optional
                      active(step) -> bool says whether its loss has gradients at that step
A dataset plugs in with `__len__` and `get_batch(indices, flip_mask) -> batch` (tensors or tuples of them), and
optionally `set_epoch(epoch)` (called before each get_batch) and `set_augment(CropSchedule | None, seed)`
(train.random_crop). A dataset with a `loader_dataset` (lazy image files) is instead decoded in train.data_workers
DataLoader workers, `loader_dataset[(index, flip, epoch)] -> (index, x, y)`, in the sampler's order
(spheregen.data.loader), then passed through its `finish_batch(batch)` if it has one (encoding on the fly).
Under torchrun the loss runs through DistributedDataParallel (spheregen.engine.dist.wrap_ddp).

Exact resume: the data order is a pure function of (seed, epoch), the position is saved, and the torch,
numpy and python RNG states travel in train_state.pt, so k steps + resume gives bitwise the same weights
as one uninterrupted run on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from spheregen.config import to_dict
from spheregen.data.augment import CropSchedule
from spheregen.data.loader import WorkerBatches
from spheregen.engine import dist
from spheregen.engine.logger import MetricsLogger
from spheregen.engine.state import EpochSampler, resume_checkpoint, save_checkpoint
from spheregen.errors import UserError
from spheregen.runtime import default_device


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global batch per optimizer step (split over grad_accum micro-batches)
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0  # cosine decays from lr to min_lr
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    ema_decay: float = 0.0  # 0 disables the EMA
    disc_lr: float = 1e-4
    flip: bool = False  # random horizontal flips (drawn from the data generator)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    eval_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    max_bad_steps: int = 20  # consecutive non-finite steps before aborting
    logger: str = "csv"  # "csv", "tensorboard" or "wandb" (offline unless WANDB_MODE is set); always writes the CSV
    fsdp: bool = False  # shard parameters, gradients and optimizer state over ranks (SphereAR-L/H)
    activation_checkpointing: bool = False  # recompute every transformer block's activations in backward
    sync_batchnorm: bool = True  # under torchrun, BatchNorm statistics over the global batch (as one process)
    data_workers: int = 2  # DataLoader workers decoding lazy datasets (0: in the training process)
    random_crop: bool = False  # the authors' random resize-and-crop (lazy datasets, or latent caches with views)
    crop_full_until: float = 350.0  # random crops with p = 1 up to this epoch ...
    crop_decay_end: float = 375.0  # ... then p decays linearly to 0 (centre crops) at this epoch
    crop_max_scale: float = 1.25  # random short side in [size, ceil(size * crop_max_scale)] (256 -> 320)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from 0 to 1 over warmup_steps, then cosine decay to min_lr / lr at cfg.steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def default_param_groups(module: torch.nn.Module, weight_decay: float, skip: set[int] = frozenset()) -> list[dict]:
    """AdamW groups: weight decay only on parameters with >= 2 dimensions (matrices, conv kernels);
    parameters whose id() is in `skip` (another optimizer's) are left out."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad and id(p) not in skip:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    """Runs `cfg.steps` optimizer steps of `model` on `dataset`, writing checkpoints and logs to `run_dir`."""

    def __init__(self, model: torch.nn.Module, dataset: Any, cfg: TrainConfig, run_dir: str | Path,
                 config_dict: dict | None = None, eval_fn: Callable[[torch.nn.Module, int, Path], dict] | None = None,
                 device: str | torch.device | None = None, progress: bool = True):
        dist_device = dist.init_from_env()
        self.rank, self.world = dist.rank(), dist.world_size()
        self.cfg, self.run_dir, self.eval_fn = cfg, Path(run_dir), eval_fn
        self.progress = progress and self.rank == 0
        self.device = dist_device or default_device(device)
        if cfg.batch_size % (cfg.grad_accum * self.world):
            raise UserError(f"train.batch_size {cfg.batch_size} must be divisible by grad_accum x ranks "
                            f"= {cfg.grad_accum} x {self.world}")
        # per-rank seeds: the model's own noise (posterior draws, flow t, dropout) differs across ranks
        torch.manual_seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        self.model = model.to(self.device)
        dist.broadcast_module(self.model)
        self.fsdp = cfg.fsdp and self.world > 1
        if cfg.activation_checkpointing:
            dist.checkpoint_blocks(self.model)
        if cfg.sync_batchnorm and self.world > 1:
            dist.global_batchnorm(self.model)
        second = self.second = getattr(model, "second_objective", None)
        if self.fsdp:
            if second is not None:
                raise UserError("train.fsdp does not support models with a second objective (a GAN discriminator); "
                                "use plain data parallel")
            dist.shard_model(self.model)
        self.dataset = dataset
        self.config_dict = dict(config_dict or {})
        self.config_dict["train"] = to_dict(cfg)
        own = {id(p) for p in second.parameters()} if second is not None else set()
        self.opt, self.disc_opt = make_optimizers(model, second, cfg, own)
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema_names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]
            self.ema = {n: p.detach().clone() for n, p in model.named_parameters() if n in set(self.ema_names)}
        self.sampler = EpochSampler(len(dataset), cfg.batch_size, cfg.seed, cfg.flip, self.rank, self.world)
        set_augment(dataset, cfg)
        self.workers: WorkerBatches | None = None
        # DDP around the loss methods (FSDP does its own reductions); a discriminator may sit out a step
        self.ddp = None if self.fsdp else dist.wrap_ddp(self.model, "training_loss", ignore=own)
        self.disc_ddp = dist.wrap_ddp(second, "loss") if second is not None else None
        self.step, self.bad_steps = 0, 0
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))

    # -- checkpoints ------------------------------------------------------------------------------
    def ema_model(self) -> torch.nn.Module:
        """A copy of the model carrying the EMA weights (the model itself when there is no EMA)."""
        if self.fsdp:
            raise RuntimeError("with train.fsdp, evaluate the saved checkpoint instead of the live model")
        if self.ema is None:
            return self.model
        m = copy.deepcopy(self.model)
        with torch.no_grad():
            params = dict(m.named_parameters())
            for n, v in self.ema.items():
                params[n].copy_(v)
        return m

    def save(self) -> Path:
        """Rank 0 writes run_dir/checkpoints/step_N atomically (with every rank's RNG state); old ones pruned."""
        return save_checkpoint(self)

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore from `path` or the newest loadable checkpoint of run_dir; False if there is none."""
        self.close_workers()  # the workers restart from the restored data position
        return resume_checkpoint(self, path)

    def close_workers(self) -> None:
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    # -- the loop ---------------------------------------------------------------------------------
    def _set_lr(self) -> float:
        f = lr_factor(self.step, self.cfg)
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * g.get("lr_scale", 1.0) * f
        return self.cfg.lr * f

    def _micro_batches(self) -> list:
        n, source = self.cfg.grad_accum, getattr(self.dataset, "loader_dataset", None)
        if source is not None and self.workers is None:  # started here, after any resume
            self.workers = WorkerBatches(source, self.sampler, self.cfg.data_workers, self.device.type == "cuda")
        idx, flips = self.sampler.next()
        if self.workers is None:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.sampler.epoch)
            return [to_device(self.dataset.get_batch(i, f), self.device) for i, f in zip(idx.chunk(n), flips.chunk(n))]
        x, y = self.workers.next(idx)
        parts = [to_device((a, b), self.device) for a, b in zip(x.chunk(n), y.chunk(n))]
        finish = getattr(self.dataset, "finish_batch", None)
        return [finish(p) for p in parts] if finish else parts

    def _optimize(self, opt, loss_fn, params, batches, ddp=None) -> tuple[dict[str, float], float, bool, list]:
        """Accumulate gradients over micro-batches (through `ddp`, which all-reduces on the last one, when
        given), clip, and step; skip the step if anything is non-finite. Also returns the context each loss_fn
        call gave (None when it gave none)."""
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        contexts = []
        for k, batch in enumerate(batches):
            quiet = ddp is not None and k < len(batches) - 1
            with ddp.no_sync() if quiet else contextlib.nullcontext():
                with self.autocast:
                    loss, terms, *context = (ddp or loss_fn)(batch, self.step)
                (loss / self.cfg.grad_accum).backward()
            contexts.append(context[0] if context else None)
            for name, v in {"loss": loss, **terms}.items():
                totals[name] = totals.get(name, 0.0) + float(v.detach()) / self.cfg.grad_accum
        totals = dist.average_scalars(totals, self.device)
        bad = [k for k, v in totals.items() if not math.isfinite(v)]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        gnorm = dist.full_tensor(gnorm)
        if not torch.isfinite(gnorm):
            bad.append("grad_norm")
        if bad:
            opt.zero_grad(set_to_none=True)
            return totals, float(gnorm), False, contexts
        opt.step()
        return totals, float(gnorm), True, contexts

    def fit(self, until: int | None = None) -> dict[str, float]:
        """Train until cfg.steps (or stop early after step `until`, with a checkpoint, as a kill would);
        returns the last logged scalars."""
        cfg, model = self.cfg, self.model
        self.run_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(self.run_dir, cfg.logger, enabled=self.rank == 0)
        model.train()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        # in a log file (not a terminal) one refresh every 30 s keeps the file readable
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True, desc="train",
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)
        last: dict[str, float] = {}
        t0, seen0 = time.perf_counter(), self.step
        stop = min(until, cfg.steps) if until is not None else cfg.steps
        while self.step < stop:
            lr = self._set_lr()
            batches = self._micro_batches()
            terms, gnorm, ok, contexts = self._optimize(self.opt, model.training_loss, params, batches, self.ddp)
            if ok and self.disc_opt is not None:  # a GAN's discriminator steps on the same micro-batches
                d_params = list(self.second.parameters())
                active = getattr(self.second, "active", lambda step: True)(self.step)  # idle: no grads to sync
                d_terms, _, _, _ = self._optimize(self.disc_opt, self.second.loss, d_params, contexts,
                                                  self.disc_ddp if active else None)
                terms.update({f"disc_{k}": v for k, v in d_terms.items()})
            if ok:
                self.bad_steps = 0
                if self.ema is not None:
                    self._update_ema()
            else:
                self.bad_steps += 1
                culprit = [k for k, v in terms.items() if not math.isfinite(v)] or ["grad_norm"]
                tqdm.write(f"step {self.step}: non-finite {', '.join(culprit)}; step skipped "
                           f"({self.bad_steps}/{cfg.max_bad_steps})")
                if self.bad_steps >= cfg.max_bad_steps:
                    raise RuntimeError(f"training diverged: {self.bad_steps} consecutive non-finite steps "
                                       f"(last: {', '.join(culprit)}); the last good checkpoint is kept")
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                rate = (self.step - seen0) / max(time.perf_counter() - t0, 1e-9)
                last = {**terms, "lr": lr, "grad_norm": gnorm, "steps_per_s": rate, "wall_s": time.perf_counter() - t0,
                        "samples_per_s": rate * cfg.batch_size}
                logger.log(self.step, last)
                bar.set_postfix(loss=f"{terms.get('loss', float('nan')):.4f}", img_s=f"{rate * cfg.batch_size:.1f}")
            if (self.eval_fn and self.rank == 0 and not self.fsdp and cfg.eval_every
                    and self.step % cfg.eval_every == 0 and self.step < cfg.steps):
                logger.log(self.step, self._evaluate())
            if self.step % cfg.ckpt_every == 0 or self.step == stop:
                self.save()
        bar.close()
        self.close_workers()
        if self.eval_fn and self.rank == 0 and not self.fsdp and self.step == cfg.steps:
            last.update(self._evaluate())
            logger.log(self.step, last)
        logger.close()
        return last

    def _evaluate(self) -> dict[str, float]:
        out_dir = self.run_dir / "eval"
        out_dir.mkdir(parents=True, exist_ok=True)
        m = self.ema_model()
        m.eval()
        with torch.no_grad():
            result = self.eval_fn(m, self.step, out_dir) or {}
        self.model.train()
        return result

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema <- ema + (1 - decay) (theta - ema), one fused foreach op over all tensors."""
        params = dict(self.model.named_parameters())
        torch._foreach_lerp_(list(self.ema.values()), [params[n].detach() for n in self.ema], 1 - self.cfg.ema_decay)


def make_optimizers(model: torch.nn.Module, second: torch.nn.Module | None, cfg: TrainConfig,
                    own: set[int]) -> tuple[torch.optim.AdamW, torch.optim.AdamW | None]:
    """AdamW over the model's parameter groups (its own param_groups, or decay on >= 2-D weights) without the
    second objective's parameters (`own`), and a second AdamW at train.disc_lr for those."""
    gen_params = model.param_groups(cfg.weight_decay) if hasattr(model, "param_groups") else None
    if gen_params is None:
        gen_params = default_param_groups(model, cfg.weight_decay, skip=own)
    betas = (cfg.beta1, cfg.beta2)
    for g in gen_params:
        g.setdefault("lr_scale", 1.0)
        g["lr"] = cfg.lr * g["lr_scale"]
    opt = torch.optim.AdamW(gen_params, lr=cfg.lr, betas=betas)
    if second is None:
        return opt, None
    return opt, torch.optim.AdamW(default_param_groups(second, cfg.weight_decay), lr=cfg.disc_lr, betas=betas)


def set_augment(dataset: Any, cfg: TrainConfig) -> None:
    """Hand train.random_crop's schedule (or None) to a dataset that takes one."""
    schedule = None
    if cfg.random_crop:
        try:
            schedule = CropSchedule(cfg.crop_full_until, cfg.crop_decay_end, cfg.crop_max_scale)
        except ValueError as e:
            raise UserError(f"train.random_crop: {e}") from None
    if hasattr(dataset, "set_augment"):
        dataset.set_augment(schedule, cfg.seed)
    elif schedule is not None:
        raise UserError("train.random_crop needs a lazy dataset (`spheregen data folder SRC --lazy`) or a latent "
                        "cache with several views (`spheregen encode --views K`)")


