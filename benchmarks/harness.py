"""Shared parts of the ablation scripts: budgets, hardware line, scoring of generated images, result files.

Every ablation is one command with `--budget smoke|cpu|gpu`: the budget fixes the training steps, the samples
per table cell, the CFG grid and the seeds, so two runs with the same budget are comparable. Each script writes
one JSON file under benchmarks/results/ (atomically) that `benchmarks/results_page.py` turns into
docs/results.md. Training goes through the `spheregen` commands a user types, and a killed run resumes where
it stopped: finished trainings are skipped, and finished table cells are kept in the run's
cells-<digest of the budget>.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# quiet progress bars in log files: one tqdm refresh every 30 s instead of ten per second
os.environ.setdefault("TQDM_MININTERVAL", "30")


@dataclass(frozen=True)
class Budget:
    tokenizer_steps: int  # SphereAR tokenizer training steps, every arm
    ar_steps: int  # SphereAR AR training steps, every arm
    sphere_steps: int  # Sphere Encoder training steps, every arm
    per_class: int  # generated images per class in every table cell
    cfgs: tuple[float, ...]  # CFG scales of the SphereAR tables
    head_steps: int  # flow-head solver steps when sampling the SphereAR tables
    ref_n: int  # real images behind the reference statistics
    seed: int = 0  # image k of a cell uses seed `seed + k` (the same noise in every arm)


BUDGETS = {
    # seconds: checks that every path runs (used by the tests)
    "smoke": Budget(tokenizer_steps=2, ar_steps=2, sphere_steps=2, per_class=1, cfgs=(1.0, 4.0), head_steps=2,
                    ref_n=50),
    # about an hour of one CPU core per SphereAR dataset, half an hour for the Sphere Encoder ablation.
    # 1000 AR steps, not fewer: at 250 no arm had learned its classes (best class accuracy 0.31 on MNIST)
    "cpu": Budget(tokenizer_steps=300, ar_steps=1000, sphere_steps=600, per_class=10, cfgs=(1.0, 2.0, 4.0, 8.0),
                  head_steps=25, ref_n=1000),
    # a single GPU, a few hours
    "gpu": Budget(tokenizer_steps=5000, ar_steps=8000, sphere_steps=20000, per_class=300,
                  cfgs=(1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0), head_steps=100, ref_n=10000),
}


def add_common_args(p) -> None:
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="steps and samples (see harness.py)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one budget field, e.g. --set sphere_steps=4000 --set per_class=30")
    p.add_argument("--runs", help="where the trainings go (default runs/ablate/<name>)")
    p.add_argument("--out", help="result JSON (default benchmarks/results/<name>.json)")


def get_budget(name: str, overrides: list[str]) -> Budget:
    """BUDGETS[name] with FIELD=VALUE overrides (cfgs as a comma list); a bad field is a UserError."""
    from dataclasses import fields, replace

    from spheregen.errors import UserError

    known = {f.name: f.type for f in fields(Budget)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise UserError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(known)}")
        try:
            changes[key] = tuple(float(v) for v in value.split(",")) if key == "cfgs" else int(value)
        except ValueError:
            raise UserError(f"--set {item!r}: {value!r} is not a valid value for {key}") from None
    return replace(BUDGETS[name], **changes)


def paths(args, name: str) -> tuple[Path, Path]:
    """(run folder, result JSON) of an experiment: runs/ablate/NAME-BUDGET and benchmarks/results/NAME_BUDGET.json,
    with "-custom" added to the budget's name when --set changed it (so it never mixes with the plain budget)."""
    tag = args.budget + ("-custom" if args.set else "")
    runs = Path(args.runs) if args.runs else ROOT / "runs" / "ablate" / f"{name}-{tag}"
    return runs, Path(args.out) if args.out else RESULTS / f"{name}_{tag}.json"


def hardware() -> str:
    """One line naming what the numbers were measured on."""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        dev = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{dev}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def header(name: str, budget_name: str, budget: Budget, extra: dict | None = None) -> dict:
    return {"experiment": name, "budget": budget_name, "budget_values": asdict(budget),
            "hardware": hardware(), "date": time.strftime("%Y-%m-%d %H:%M"), **(extra or {})}


def write_json(path: Path, data: dict) -> Path:
    """Write under a temporary name, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


class Cells:
    """Finished table cells of one run, kept in run_dir so a killed run resumes where it stopped.

    The file is named by a digest of the budget: a run with other steps, samples or seeds (``--set``) gets its
    own file and never reuses a cell that was made under other settings."""

    def __init__(self, run_dir: Path, budget: Budget):
        settings = asdict(budget)
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        self.path = run_dir / f"cells-{digest}.json"
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.settings, self.data = settings, saved.get("cells", {})

    def get(self, key: str, compute: Callable[[], dict]) -> dict:
        if key not in self.data:
            self.data[key] = compute()
            write_json(self.path, {"budget": self.settings, "cells": self.data})
            print(f"{key}: {json.dumps(self.data[key])}", flush=True)
        return self.data[key]


def class_labels(num_classes: int, per_class: int) -> list[int]:
    return [c for c in range(max(num_classes, 1)) for _ in range(per_class)]


def generate_all(model, labels: list[int], seed: int, options: dict,
                 batch_size: int = 100) -> tuple[torch.Tensor, float]:
    """Images for `labels` (image k from seed `seed + k`) with `model.generate_images`; also seconds per image."""
    out = []
    t0 = time.perf_counter()
    for s in range(0, len(labels), batch_size):
        lab = torch.tensor(labels[s:s + batch_size], dtype=torch.long)
        seeds = [seed + k for k in range(s, s + len(lab))]
        out.append(model.generate_images(lab, seeds, options).float().cpu())
    return torch.cat(out), (time.perf_counter() - t0) / max(len(labels), 1)


def alternate(arms: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of `repeats` runs of each arm under torch.no_grad, the arms taking turns (a, b, c, a, b, ...)
    after one warm-up run each: on a shared, noisy machine a change of load hits every arm alike."""
    runs = {name: [] for name in arms}
    with torch.no_grad():
        for fn in arms.values():
            fn()
        for r in range(repeats):
            for name, fn in arms.items():
                t0 = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t0)
                print(f"run {r} {name}: {runs[name][-1]:.3f} s", flush=True)
    return runs


def score(images: torch.Tensor, labels: list[int], data: str, budget: Budget, device: str) -> dict:
    """Inception FID, class accuracy and classifier-feature FID (dFID) of `images` against the dataset."""
    from spheregen.eval.evaluate import evaluate

    metrics = ("fid", "acc", "dfid") if labels and max(labels) > 0 else ("fid", "dfid")
    res = evaluate(images, data, metrics=metrics, labels=np.asarray(labels), ref_max_n=budget.ref_n,
                   ref_split="train", device=device)
    return {k: res.get(k) for k in ("fid", "acc", "dfid", "n_samples", "n_ref")}


def real_floor(data: str, budget: Budget, device: str) -> dict:
    """The scores of real held-out images at the same n as a table cell: the best a generator could get here,
    and the yardstick for how far apart two cells must be to differ (FID at small n is biased upwards)."""
    from spheregen.data.datasets import ImageDataset

    test = ImageDataset(data, "test")
    n = budget.per_class * max(test.num_classes, 1)
    idx = np.random.default_rng(budget.seed).permutation(len(test))[:n]
    x, y = test.get_batch(idx)
    return score(x, y.tolist(), data, budget, device)


def save_examples(images: torch.Tensor, num_classes: int, per_class: int, path: Path, show: int = 8) -> Path:
    """A grid with one row per class (up to `show` images each) for the results page."""
    from spheregen.images import save_grid

    rows = max(num_classes, 1)
    idx = torch.cat([torch.arange(c * per_class, c * per_class + min(show, per_class)) for c in range(rows)])
    return save_grid(images[idx], rows, path)


def figure(size: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas (no display, no pyplot state) for the benchmark plots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, title: str, path: Path, dpi: int = 90) -> Path:
    """Title, tight layout, and a PNG at `path` (its folder created)."""
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def run_arms(args, name: str, known: dict, run_arm: Callable, extra: Callable) -> Path:
    """The arm-by-arm ablations' driver: check --arms against `known`, score real images once (the floor), run
    `run_arm(arm, data, runs, budget, device, dataset) -> dict` for each arm, write the JSON; returns its path.
    `extra(dataset) -> dict` adds the experiment's own settings to the JSON header."""
    from spheregen.data.datasets import ImageDataset
    from spheregen.errors import UserError

    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in known]
    if bad:
        raise UserError(f"unknown arm {bad[0]!r}; choose from {', '.join(known)}")
    ds = ImageDataset(args.data)
    runs, out = paths(args, name)
    budget = get_budget(args.budget, args.set)
    result = header(name, args.budget, budget, {"runs": str(runs), "data": args.data, "images": len(ds),
                                                 "num_classes": ds.num_classes, **extra(ds), "arms": []})
    result["real"] = Cells(runs, budget).get("real", lambda: real_floor(args.data, budget, args.device))
    for arm in arms:
        result["arms"].append(run_arm(arm, args.data, runs, budget, args.device, ds))
    return write_json(out, result)


def report(body: Callable[[], Path]) -> int:
    """Run a script's body: a UserError becomes one line on stderr and exit code 2, success names the file."""
    from spheregen.errors import UserError

    try:
        out = body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"written to {out}")
    return 0
