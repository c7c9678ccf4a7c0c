"""One training loop for every model: AdamW, warmup + cosine, EMA, grad clip, accumulation, AMP, resume.

A model plugs in by defining
    training_loss(batch, step) -> (loss, {"term": tensor, ...}) or (loss, terms, context)
and, optionally,
    param_groups(weight_decay) -> list[dict]          custom optimizer groups (default: decay on >= 2-D weights)
    second_objective: nn.Module with loss(context, step) -> (loss, terms), trained by a second AdamW
                      (train.disc_lr) after each main step on the contexts of its micro-batches (a GAN's
                      discriminator); its parameters stay out of the main optimizer and the EMA
A dataset plugs in with `__len__` and `get_batch(indices, flip_mask) -> batch` (tensors or tuples of them).

Exact resume: the data order is a pure function of (seed, epoch), the position is saved, and the torch,
numpy and python RNG states travel in train_state.pt, so k steps + resume gives bitwise the same weights
as one uninterrupted run on CPU.
"""

from __future__ import annotations

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
        gen_params = model.param_groups(cfg.weight_decay) if hasattr(model, "param_groups") else None
        if gen_params is None:
            gen_params = default_param_groups(model, cfg.weight_decay, skip=own)
        betas = (cfg.beta1, cfg.beta2)
        for g in gen_params:
            g.setdefault("lr_scale", 1.0)
            g["lr"] = cfg.lr * g["lr_scale"]
        self.opt = torch.optim.AdamW(gen_params, lr=cfg.lr, betas=betas)
        self.disc_opt = None
        if second is not None:
            self.disc_opt = torch.optim.AdamW(default_param_groups(second, cfg.weight_decay), lr=cfg.disc_lr,
                                              betas=betas)
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema_names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]
            self.ema = {n: p.detach().clone() for n, p in model.named_parameters() if n in set(self.ema_names)}
        self.sampler = EpochSampler(len(dataset), cfg.batch_size, cfg.seed, cfg.flip, self.rank, self.world)
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
        return resume_checkpoint(self, path)

    # -- the loop ---------------------------------------------------------------------------------
    def _set_lr(self) -> float:
        f = lr_factor(self.step, self.cfg)
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * g.get("lr_scale", 1.0) * f
        return self.cfg.lr * f

    def _micro_batches(self) -> list:
        idx, flips = self.sampler.next()
        n = self.cfg.grad_accum
        return [to_device(self.dataset.get_batch(i, f), self.device) for i, f in zip(idx.chunk(n), flips.chunk(n))]

    def _optimize(self, opt, loss_fn, params, batches) -> tuple[dict[str, float], float, bool, list]:
        """Accumulate gradients over micro-batches, clip, and step; skip the step if anything is non-finite.
        Also returns the context each loss_fn call gave (None when it gave none)."""
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        contexts = []
        for batch in batches:
            with self.autocast:
                loss, terms, *context = loss_fn(batch, self.step)
            contexts.append(context[0] if context else None)
            (loss / self.cfg.grad_accum).backward()
            for k, v in {"loss": loss, **terms}.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / self.cfg.grad_accum
        if not self.fsdp:
            dist.average_gradients(params)
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
            terms, gnorm, ok, contexts = self._optimize(self.opt, model.training_loss, params, batches)
            if ok and self.disc_opt is not None:  # a GAN's discriminator steps on the same micro-batches
                d_params = list(self.second.parameters())
                d_terms, _, _, _ = self._optimize(self.disc_opt, self.second.loss, d_params, contexts)
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
        d = self.cfg.ema_decay
        params = dict(self.model.named_parameters())
        for n, v in self.ema.items():
            v.lerp_(params[n].detach(), 1 - d)


