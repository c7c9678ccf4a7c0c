"""The "any folder" acceptance of issue 18: write a built dataset (e.g. data/emoji32) out as PNG files in one
folder per class, run `spheregen demo --data FOLDER --minutes N` on it as a user would (timed), then score the
generator with benchmarks/demo_score.py's protocol. The result JSON holds the wall time against the budget, the
demo's report numbers and the accuracy of samples against the classifier's accuracy on real held-out images.

    python benchmarks/demo_folder.py --dataset data/emoji32 --folder runs/emoji32_png --minutes 15 \\
        --out benchmarks/results/demo_emoji32_folder.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_score  # noqa: E402
import harness  # noqa: E402


def export_folder(dataset: str | Path, folder: Path) -> int:
    """Every image of the dataset as FOLDER/CLASS/NNNNN.png (skipped when the folder is already there)."""
    from PIL import Image

    from spheregen.data.datasets import ImageDataset

    if folder.is_dir() and any(folder.iterdir()):
        return sum(1 for _ in folder.rglob("*.png"))
    ds = ImageDataset(dataset)
    images = ds._memmap()
    names = [c.replace("/", "_").replace(" ", "_") for c in ds.classes]
    for i, (img, y) in enumerate(zip(images, ds.all_labels)):
        d = folder / f"{int(y):02d}_{names[int(y)]}"
        d.mkdir(parents=True, exist_ok=True)
        a = np.asarray(img)
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(d / f"{i:05d}.png")
    return len(images)


def measure(args) -> Path:
    folder, run = Path(args.folder), Path(args.run)
    n = export_folder(args.dataset, folder)
    t0 = time.time()
    cmd = [sys.executable, "-m", "spheregen.cli", "demo", "--data", str(folder), "--out", str(run),
           "--minutes", str(args.minutes), *(["--model", args.model] if args.model else [])]
    code = subprocess.call(cmd)
    wall = time.time() - t0
    if code != 0:
        raise SystemExit(f"demo failed with exit code {code}")
    rep = json.loads((run / ("report_sphere.json" if args.model == "sphere" else "report.json")).read_text())
    gen = run / ("sphere_encoder" if args.model == "sphere" else "ar")
    score = demo_score.measure(argparse.Namespace(run=str(gen), data=str(run / "dataset"), per_class=50,
                                                  out=str(run / "score.json")))
    scored = json.loads(Path(score).read_text())
    real = scored["real_heldout_acc"]
    result = {"experiment": "demo_folder", "hardware": harness.hardware(), "folder": str(folder), "images": n,
              "minutes": args.minutes, "wall_s": wall, "within_1_2x": wall <= 1.2 * args.minutes * 60,
              "timings_s": rep["timings"], "recon": rep["recon"], "sweep_best": rep["best"], "real": rep["real"],
              "score": scored["settings"], "real_heldout_acc": real,
              "acc_ratio_default": scored["settings"]["default"]["acc"] / real if real else None}
    return harness.write_json(Path(args.out), result)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="a built dataset to write out as PNG class folders")
    p.add_argument("--folder", required=True, help="where the PNG folders go")
    p.add_argument("--run", default="runs/demo_folder", help="the demo's --out")
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--model", choices=["sphere_ar", "sphere"])
    p.add_argument("--out", required=True, help="result JSON")
    return harness.report(lambda: measure(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
