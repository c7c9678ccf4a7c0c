"""Training scalars to run_dir/metrics.csv (and TensorBoard or Weights & Biases): one row per log step, columns
grow as new terms appear, and a resumed run replaces whatever the killed run logged past its checkpoint.

train.logger: "csv" (the CSV only), "tensorboard" (also run_dir/tb, needs `pip install 'spheregen[tensorboard]'`)
or "wandb" (also a W&B run under run_dir/wandb, needs `pip install wandb`; offline unless WANDB_MODE says
otherwise, so nothing leaves the machine by default: `wandb sync run_dir/wandb/offline-run-*` uploads it later).
An optional package that is missing is reported once and the CSV is still written."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

from spheregen.errors import UserError

LOGGERS = ("csv", "tensorboard", "wandb")


class MetricsLogger:
    """Scalars to run_dir/metrics.csv (one row per log step, columns grow as new terms appear) and,
    with kind "tensorboard" or "wandb", to TensorBoard or an (offline by default) W&B run as well."""

    def __init__(self, run_dir: Path, kind: str, enabled: bool = True):
        if kind not in LOGGERS:
            raise UserError(f"train.logger must be one of {', '.join(LOGGERS)}, got {kind!r}")
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict] = []
        self.keys: list[str] = []
        self.first = True
        if self.path.is_file():
            with open(self.path) as f:
                self.rows = list(csv.DictReader(f))
        self.tb = None
        if kind == "tensorboard" and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                print("tensorboard is not installed (pip install 'spheregen[tensorboard]'); logging to CSV only")
        self.wandb = _wandb_run(run_dir) if kind == "wandb" and enabled else None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: f"{v:.6g}" for k, v in scalars.items()}}
        new_keys = not self.keys or set(row) - set(self.keys)
        if self.first:  # a resumed run replaces whatever the killed run logged past this point
            self.rows = [r for r in self.rows if int(r["step"]) < step]
        self.rows.append(row)
        if self.first or new_keys:
            self.keys = ["step"] + sorted({k for r in self.rows for k in r} - {"step"})
            tmp = self.path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.keys, restval="")
                w.writeheader()
                w.writerows(self.rows)
            tmp.replace(self.path)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.keys, restval="", extrasaction="ignore").writerow(row)
        self.first = False
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(dict(scalars), step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(run_dir: Path):
    """A W&B run in run_dir/wandb (offline unless WANDB_MODE is set), resumed by id on a resumed training;
    None (with a message) when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        print("wandb is not installed (pip install wandb); logging to CSV only")
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = "spheregen-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]  # one per run dir
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "spheregen"), dir=str(run_dir), name=run_dir.name,
                      id=run_id, resume="allow", mode=os.environ.get("WANDB_MODE", "offline"))
