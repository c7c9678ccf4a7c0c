"""Checkpoint directories: `config.json`, `model.safetensors`, `ema.safetensors`, `train_state.pt`.

Every directory is written under a temporary name and renamed into place, so a kill at any moment leaves
either the previous complete checkpoint or the new complete one, never a half-written one that looks done.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from spheregen.config import from_dict, to_dict
from spheregen.errors import UserError

MODEL_FILE, EMA_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "config.json", "train_state.pt"


def cache_root() -> Path:
    """$SPHEREGEN_CACHE, else $XDG_CACHE_HOME/spheregen, else ~/.cache/spheregen."""
    if os.environ.get("SPHEREGEN_CACHE"):
        return Path(os.environ["SPHEREGEN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spheregen"


_REGISTRY: dict[str, type] = {}


def register_model(name: str):
    """Class decorator: the `model_type` written to config.json, from which `spheregen.models.load_model`
    rebuilds the model (spheregen's own models register on import; so can a user's)."""

    def wrap(cls):
        cls.model_type = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_models() -> dict[str, type]:
    """model_type -> class of every registered model."""
    return dict(_REGISTRY)


def _state_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone tied tensors so each key owns its data
    state, seen = {}, set()
    for k, v in module.state_dict().items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        state[k] = v.detach().clone().contiguous() if ptr in seen else v.detach().contiguous()
        seen.add(ptr)
    return state


def write_dir_atomically(final: Path, write: Any) -> None:
    """Call write(tmp_dir), fsync the files, then rename tmp_dir to `final` (replacing an old one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if not f.is_file():
                continue
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model_dir(path: Path, model: torch.nn.Module, config: dict[str, Any],
                   ema: torch.nn.Module | None = None, train_state: dict | None = None) -> None:
    """Write a complete checkpoint directory atomically."""

    def write(tmp: Path):
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file(_state_for_save(model), str(tmp / MODEL_FILE))
        if ema is not None:
            save_file(_state_for_save(ema), str(tmp / EMA_FILE))
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)

    write_dir_atomically(Path(path), write)


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir() or not cfg_file.is_file():
        raise UserError(f"{path} is not a spheregen checkpoint directory (no {CONFIG_FILE}); "
                        "point to a run's checkpoints/step_* directory or a save_pretrained() directory")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{cfg_file} is corrupt (not valid JSON); use another checkpoint") from None


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise UserError(f"{file} is corrupt or truncated ({type(e).__name__}); use another checkpoint") from None


def load_weights(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The raw weights, overlaid with the EMA weights (which may cover a subset of keys) when asked."""
    path = Path(path)
    if not (path / MODEL_FILE).is_file():
        raise UserError(f"{path} has no {MODEL_FILE}; the checkpoint is incomplete, use another one")
    weights = _load_safetensors(path / MODEL_FILE)
    if use_ema and (path / EMA_FILE).is_file():
        weights.update(_load_safetensors(path / EMA_FILE))
    return weights


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary `.step_*` dirs are never listed)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    dirs = [p for p in ckpt_dir.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (or save_pretrained directory) as given, or the newest complete checkpoint of a
    run directory; a path that is neither is returned as given (loading it then names the problem)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        ckpts = list_checkpoints(path)
        if ckpts:
            return ckpts[-1]
    return path


class PretrainedMixin:
    """Hugging Face style `save_pretrained(dir)` / `from_pretrained(dir)` for models whose __init__ takes
    one dataclass config (class attribute `config_class`)."""

    config_class: type
    model_type: str

    @classmethod
    def upgrade_state(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the keys of checkpoints written by older versions (none by default)."""
        return state

    def save_pretrained(self, path: str | Path, extra: dict | None = None) -> None:
        config = {"model_type": self.model_type, "model": to_dict(self.config), **(extra or {})}
        save_model_dir(Path(path), self, config)

    @classmethod
    def from_pretrained(cls, path: str | Path, use_ema: bool = True, map_location: str = "cpu"):
        config = read_config(path)
        if config.get("model_type") != cls.model_type:
            raise UserError(f"{path} holds a {config.get('model_type')} checkpoint, not a {cls.model_type}")
        model = cls(from_dict(cls.config_class, config["model"]))
        weights = cls.upgrade_state(load_weights(path, use_ema=use_ema))
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # shape mismatches
            first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
            raise UserError(f"{path} does not match its config ({first[:160]}); the config and weights come "
                            "from different models") from None
        if missing or unexpected:
            raise UserError(f"{path} does not match its config (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}); the config and weights come from different models")
        return model.to(map_location)
