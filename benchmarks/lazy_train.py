"""ImageNet-layout data end to end with `--lazy`: a synthetic tree of >= 2,000 JPEGs in 10 class folders
(benchmarks/lazy_data_memory.make_tree), indexed with `spheregen data folder --lazy`, trains the tiny RGB
tokenizer (configs/tokenizer/emoji32_tiny.toml) with the authors' random resize-and-crop schedule, encodes a
sharded cache with K views (`spheregen encode --views K`), and trains the tiny AR (configs/ar/mnist_tiny.toml)
on it, drawing a view and a posterior sample per step; all through the `spheregen` commands.

    python benchmarks/lazy_train.py [--files 2000] [--tokenizer-steps 300] [--ar-steps 300] [--views 2] [--work DIR]

The crop schedule is scaled to the short run: p = 1 up to epoch crop_full_until, 0 from crop_decay_end.
Writes benchmarks/results/lazy_train.json (final scalars, wall times).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import hardware, write_json  # noqa: E402
from lazy_data_memory import make_tree  # noqa: E402

from spheregen.cli import main as cli_main  # noqa: E402


def last_row(run: Path) -> dict:
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", None)}


def run(args: argparse.Namespace, work: Path) -> dict:
    crops = ["--set", "train.random_crop=true", "--set", f"train.crop_full_until={args.crop_full_until}",
             "--set", f"train.crop_decay_end={args.crop_decay_end}", "--set", "train.data_workers=2"]
    t0 = time.perf_counter()
    make_tree(work / "tree", args.files)
    assert cli_main(["data", "folder", str(work / "tree"), "--lazy", "--size", "32", "--out", str(work / "idx")]) == 0
    times = {"tree_and_index_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    assert cli_main(["train", "tokenizer", "--config", "emoji32_tiny", "--data", str(work / "idx"), "--out",
                     str(work / "tok"), "--steps", str(args.tokenizer_steps), "--set", "data.eval_images=64",
                     "--set", "train.eval_every=0", "--set", "train.log_every=10", *crops]) == 0
    times["tokenizer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert cli_main(["encode", "--tokenizer", str(work / "tok"), "--data", str(work / "idx"), "--split", "train",
                     "--views", str(args.views), "--workers", "2", "--out", str(work / "lat")]) == 0
    times["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert cli_main(["train", "ar", "--config", "mnist_tiny", "--latents", str(work / "lat"), "--out",
                     str(work / "ar"), "--steps", str(args.ar_steps), "--set", "train.log_every=10",
                     "--set", "eval.per_class=1", "--set", "eval.steps=5", *crops]) == 0
    times["ar_s"] = time.perf_counter() - t0
    return {"files": args.files, "views": args.views, "tokenizer_steps": args.tokenizer_steps,
            "ar_steps": args.ar_steps, "tokenizer_last": last_row(work / "tok"), "ar_last": last_row(work / "ar"),
            **times}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--tokenizer-steps", type=int, default=300)
    p.add_argument("--ar-steps", type=int, default=300)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--crop-full-until", type=float, default=2.0)
    p.add_argument("--crop-decay-end", type=float, default=4.0)
    p.add_argument("--work", help="keep the tree, index and runs here (default: a temporary directory)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lazy_train.json"))
    args = p.parse_args(argv)
    if args.work:
        result = run(args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(args, Path(tmp))
    result.update({"hardware": hardware(), "date": time.strftime("%Y-%m-%d %H:%M")})
    write_json(Path(args.out), result)
    print(result)
    return result


if __name__ == "__main__":
    main()
