"""Peak memory of lazy image data as the dataset grows: a synthetic ImageNet-layout tree of JPEGs (10 class
folders), indexed with `spheregen data folder --lazy`, then read the way the trainer reads it (DataLoader workers
decoding batches in the sampler's order). Each measurement runs in a fresh process and reports its peak RSS
(ru_maxrss); the workers' peak is the largest child's. For contrast, the in-memory dataset (`spheregen data
folder` without --lazy) is built from the same trees.

    python benchmarks/lazy_data_memory.py [--counts 2000 20000] [--batches 40] [--size 64]

The larger trees repeat the first 2,000 files as symlinks (the reader opens every path it is given, so a link
costs the same to read as a file). Writes benchmarks/results/lazy_data_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import hardware, write_json  # noqa: E402


def make_tree(root: Path, count: int = 2000, classes: int = 10, base: int = 2000, seed: int = 0) -> Path:
    """`count` JPEGs in `classes` folders n01..: the first `base` real files (assorted sizes 48-120 px, a class
    colour and noise), the rest symlinks to them. Returns root."""
    rng = np.random.default_rng(seed)
    real = min(count, base)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    colours = rng.integers(0, 256, (classes, 3))
    for i in range(real):
        c = i % classes
        w, h = int(rng.integers(48, 121)), int(rng.integers(48, 121))
        ramp = np.linspace(0.3, 1.0, w)[None, :, None] * colours[c][None, None, :]
        arr = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"n{c:08d}" / f"img_{i:06d}.JPEG", quality=85)
    for i in range(real, count):
        c, j = i % classes, i % real
        src = root / f"n{j % classes:08d}" / f"img_{j:06d}.JPEG"
        (root / f"n{c:08d}" / f"img_{i:06d}.JPEG").symlink_to(src)
    return root


def peak_rss_mib(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def child_read(index: str, batches: int, workers: int) -> dict:
    """Read `batches` batches of 64 through the trainer's worker loader; peak RSS of this process and workers."""
    from spheregen.data.augment import CropSchedule
    from spheregen.data.lazy import LazyImageDataset
    from spheregen.data.loader import WorkerBatches
    from spheregen.engine.state import EpochSampler

    ds = LazyImageDataset(index, split="train")
    ds.set_augment(CropSchedule(), seed=0)  # random resize-and-crops, as in training
    sampler = EpochSampler(len(ds), 64, 0, True)
    loader = WorkerBatches(ds, sampler, workers)
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next(sampler.next()[0])
    seconds = time.perf_counter() - t0
    loader.close()
    del loader
    return {"images": len(ds), "read_images": 64 * batches, "read_s": seconds, "main_peak_MiB": peak_rss_mib(),
            "workers_peak_MiB": peak_rss_mib(children=True)}


def child_build(src: str, out: str, size: int, lazy: bool) -> dict:
    from spheregen.data.builders import build_folder
    from spheregen.data.lazy import build_lazy_index

    t0 = time.perf_counter()
    (build_lazy_index if lazy else build_folder)(src, out, size)
    return {"build_s": time.perf_counter() - t0, "peak_MiB": peak_rss_mib()}


def measure(*args: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--batches", type=int, default=40, help="batches of 64 read per measurement")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--no-array", action="store_true", help="skip the in-memory contrast")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lazy_data_memory.json"))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        out = child_read(rest[0], int(rest[1]), int(rest[2])) if kind == "read" else \
            child_build(rest[0], rest[1], int(rest[2]), kind == "lazy")
        print(json.dumps(out))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            src, idx = make_tree(Path(tmp) / f"tree{n}", n), Path(tmp) / f"idx{n}"
            row = {"files": n, "index": measure("lazy", str(src), str(idx), str(args.size)),
                   "read": measure("read", str(idx), str(args.batches), str(args.workers))}
            if not args.no_array:
                row["array_build"] = measure("array", str(src), str(Path(tmp) / f"arr{n}"), str(args.size))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"experiment": "lazy_data_memory", "hardware": hardware(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "size": args.size, "batches": args.batches, "batch": 64, "workers": args.workers, "rows": rows}
    write_json(Path(args.out), result)
    print(f"{'files':>7} {'index MiB':>10} {'read main MiB':>14} {'read workers MiB':>17} {'in-memory build MiB':>20}")
    for r in rows:
        arr = r.get("array_build", {}).get("peak_MiB", float("nan"))
        print(f"{r['files']:>7} {r['index']['peak_MiB']:>10.0f} {r['read']['main_peak_MiB']:>14.0f} "
              f"{r['read']['workers_peak_MiB']:>17.0f} {arr:>20.0f}")


if __name__ == "__main__":
    main()
