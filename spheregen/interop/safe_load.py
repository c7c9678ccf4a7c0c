"""Loading foreign checkpoints (pickles) without executing them.

`torch.load(weights_only=True)` unpickles only tensors, containers and primitive types; `safe_load` adds
exactly the classes named in `allow` (the authors' files carry an `argparse.Namespace` under "args").
Anything else, a payload that would run code included, is refused with one line (UserError, exit 2)
and nothing of it is executed.
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from spheregen.errors import UserError

NAMESPACE_ONLY: tuple[type, ...] = (argparse.Namespace,)


def safe_load(path: str | Path, allow: tuple[type, ...] = NAMESPACE_ONLY) -> Any:
    """torch.load(path, weights_only=True) with exactly the classes in `allow` permitted, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file {path} does not exist; check the path")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_can_mmap(path))
    except pickle.UnpicklingError as e:
        what = _first_line(str(e))
        raise UserError(f"refusing to load {path}: it needs code or classes outside the allow-list "
                        f"({what}); only tensors, containers and {_names(allow)} are loaded") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({_first_line(str(e)) or type(e).__name__}); "
                        "the file may be truncated, re-download it") from None


def _can_mmap(path: Path) -> bool:
    """mmap keeps multi-GB checkpoints off the heap; it needs the zip format of torch >= 1.6."""
    return zipfile.is_zipfile(path)


def _names(allow: tuple[type, ...]) -> str:
    return ", ".join(f"{c.__module__}.{c.__qualname__}" for c in allow) or "nothing else"


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Weights only load failed", "In PyTorch 2.6")):
            return line[:160]
    return text.strip()[:160]
