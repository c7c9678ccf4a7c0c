"""What a training run carries across a kill: the deterministic data order (EpochSampler), the RNG streams of
every rank, and the checkpoint save / resume of a Trainer.

Exact resume: the data order is a pure function of (seed, epoch), the position is saved, and the torch,
numpy and python RNG states travel in train_state.pt, so k steps + resume gives bitwise the same weights
as one uninterrupted run on CPU. train_state.pt is loaded with weights_only=True (numpy's RNG arrays
allowed by name).
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from spheregen.checkpoint import STATE_FILE, list_checkpoints, load_weights, read_config, save_model_dir
from spheregen.config import from_dict
from spheregen.engine import dist
from spheregen.errors import UserError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import _reconstruct

# what np.random.get_state() pickles into train_state.pt
_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype("uint32")), _reconstruct]


def load_train_state(path: Path) -> dict:
    """train_state.pt without running arbitrary pickled code: tensors, containers and numpy arrays only."""
    with torch.serialization.safe_globals(_NUMPY_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def same_model_config(model: torch.nn.Module, saved: dict | None, current: dict | None) -> bool:
    """Whether a checkpoint's [model] table describes the run's model (fields added since take their defaults)."""
    if saved == current:
        return True
    cls = type(getattr(model, "config", None))
    if not dataclasses.is_dataclass(cls):
        return False
    try:
        return from_dict(cls, dict(saved or {}), "model.") == from_dict(cls, dict(current or {}), "model.")
    except UserError:
        return False


class EpochSampler:
    """Deterministic batches: epoch e is a permutation (and flip mask) drawn from seed (seed, e).
    Batches that would straddle the end of an epoch start the next epoch instead (drop-last)."""

    def __init__(self, n: int, batch_size: int, seed: int, flip: bool, rank: int = 0, world: int = 1):
        if n < batch_size:
            raise UserError(f"the dataset has {n} items, fewer than the batch size {batch_size}; "
                            "lower train.batch_size")
        self.n, self.batch_size, self.seed, self.flip = n, batch_size, seed, flip
        self.rank, self.world = rank, world
        self.epoch, self.pos = 0, 0
        self._load_epoch()

    def _load_epoch(self) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.perm = torch.randperm(self.n, generator=g)
        self.flips = torch.rand(self.n, generator=g) < 0.5 if self.flip else torch.zeros(self.n, dtype=torch.bool)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch's indices and flip mask; rank r of `world` gets its contiguous slice."""
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._load_epoch()
        sl = slice(self.pos, self.pos + self.batch_size)
        self.pos += self.batch_size
        idx, flips = self.perm[sl], self.flips[sl]
        per = self.batch_size // self.world
        return idx[self.rank * per:(self.rank + 1) * per], flips[self.rank * per:(self.rank + 1) * per]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._load_epoch()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (a full tensor) laid out like `param` (sharded like it when param is an FSDP DTensor)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements).detach().clone()
    return value.to(param.device, param.dtype).clone()


class _TensorDict(torch.nn.Module):
    """Wrap a name -> tensor dict so it can be written like a module's state_dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self._t = tensors

    def state_dict(self, *args, **kwargs):
        return dict(self._t)


def _rmtree(path: Path) -> None:
    # rename first so a kill mid-delete never leaves a partial dir under a checkpoint name
    tmp = path.parent / f".{path.name}.del"
    path.rename(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(trainer) -> Path:
    """Rank 0 writes trainer.run_dir/checkpoints/step_N atomically (weights, EMA, optimizer states, data
    position, every rank's RNG state); older checkpoints beyond cfg.keep_checkpoints are pruned."""
    rngs = dist.gather_objects(_rng_state())
    path = trainer.run_dir / "checkpoints" / f"step_{trainer.step:08d}"
    ema = trainer.ema
    if trainer.fsdp:  # collectives: every rank takes part in gathering the full tensors
        weights = _TensorDict(dist.full_model_state(trainer.model))
        optim = dist.full_optimizer_state(trainer.model, trainer.opt)
        ema = {n: dist.full_tensor(v).cpu() for n, v in trainer.ema.items()} if trainer.ema is not None else None
    else:
        weights, optim = trainer.model, trainer.opt.state_dict()
    if trainer.rank != 0:
        dist.barrier()
        return path
    state = {
        "step": trainer.step, "optimizer": optim, "fsdp": trainer.fsdp, "sampler": trainer.sampler.state_dict(),
        "rng": rngs[0], "rank_rngs": rngs, "bad_steps": trainer.bad_steps,
        "disc_optimizer": trainer.disc_opt.state_dict() if trainer.disc_opt else None,
    }
    ema_module = _TensorDict(ema) if ema is not None else None
    config = {"model_type": getattr(trainer.model, "model_type", None), **trainer.config_dict}
    save_model_dir(path, weights, config, ema=ema_module, train_state=state)
    for old in list_checkpoints(trainer.run_dir)[:-trainer.cfg.keep_checkpoints]:
        _rmtree(old)
    dist.barrier()
    return path


def resume_checkpoint(trainer, path: str | Path | None = None) -> bool:
    """Restore a trainer from `path` or the newest loadable checkpoint of its run_dir; False if there is none."""
    candidates = [Path(path)] if path else list(reversed(list_checkpoints(trainer.run_dir)))
    for ckpt in candidates:
        try:
            saved = read_config(ckpt)
            weights = load_weights(ckpt)
            state = load_train_state(ckpt / STATE_FILE)
        except (UserError, OSError, RuntimeError, EOFError) as e:
            if path:
                raise UserError(f"cannot resume from {ckpt}: {e}") from None
            print(f"skipping unreadable checkpoint {ckpt}: {e}")
            continue
        if not same_model_config(trainer.model, saved.get("model"), trainer.config_dict.get("model")):
            raise UserError(f"{ckpt} was trained with a different model config; resume with the run's own "
                            "config or start a new run directory")
        if bool(state.get("fsdp")) != trainer.fsdp:
            raise UserError(f"{ckpt} was saved with train.fsdp = {bool(state.get('fsdp'))}; resume with the "
                            "same setting (and more than one rank for FSDP)")
        _restore(trainer, ckpt, weights, state)
        return True
    if path is None and candidates == []:
        return False
    raise UserError(f"no loadable checkpoint in {trainer.run_dir / 'checkpoints'}; start without --resume")


def _restore(trainer, ckpt: Path, weights: dict, state: dict) -> None:
    """Load weights, optimizer states, EMA, data position and RNG streams of a checkpoint into the trainer."""
    weights = trainer.model.upgrade_state(weights) if hasattr(trainer.model, "upgrade_state") else weights
    if trainer.fsdp:
        dist.load_full_state(trainer.model, trainer.opt, weights, state["optimizer"])
    else:
        trainer.model.load_state_dict(weights)
        trainer.opt.load_state_dict(state["optimizer"])
    if trainer.ema is not None:
        ema_w = load_weights(ckpt, use_ema=True)
        params = dict(trainer.model.named_parameters())
        trainer.ema = {n: _like(ema_w[n], params[n]) for n in trainer.ema_names}
    if trainer.disc_opt is not None and state.get("disc_optimizer"):
        trainer.disc_opt.load_state_dict(state["disc_optimizer"])
    trainer.sampler.load_state_dict(state["sampler"])
    rngs = state.get("rank_rngs") or [state["rng"]]
    if len(rngs) == trainer.world:
        _set_rng_state(rngs[trainer.rank])
    else:  # a different number of ranks: data order is kept, per-rank noise restarts from the seed
        print(f"resuming with {trainer.world} ranks from a {len(rngs)}-rank run: RNG streams are re-seeded")
    trainer.step, trainer.bad_steps = state["step"], state.get("bad_steps", 0)
    print(f"resumed from {ckpt} at step {trainer.step}")
