"""Training scalars to run_dir/metrics.csv (and TensorBoard): one row per log step, columns grow as new terms
appear, and a resumed run replaces whatever the killed run logged past its checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLogger:
    """Scalars to run_dir/metrics.csv (one row per log step, columns grow as new terms appear) and,
    with logger = "tensorboard", to TensorBoard as well."""

    def __init__(self, run_dir: Path, kind: str, enabled: bool = True):
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

    def close(self) -> None:
        if self.tb:
            self.tb.close()
