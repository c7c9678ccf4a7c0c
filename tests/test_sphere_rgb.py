"""The RGB emoji Sphere Encoder configs: they carry the MNIST retune, build at their data's size and train."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from spheregen.checkpoint import list_checkpoints
from spheregen.cli import main
from spheregen.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RETUNED = ("alpha_deg", "latent_bn", "w_lat_con", "enc_lr_scale")  # what the MNIST config's retune changed


def rgb_data(root: Path, size: int, n: int = 12, classes: int = 3) -> Path:
    """A tiny random RGB dataset in the `spheregen data` layout (classes and size from the arguments)."""
    rng = np.random.default_rng(size)
    root.mkdir()
    np.save(root / "images.npy", rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.arange(n, dtype=np.int64) % classes)
    (root / "classes.json").write_text(json.dumps([f"c{i}" for i in range(classes)]))
    (root / "meta.json").write_text(json.dumps({"source": "test", "size": size, "count": n, "channels": 3}))
    return root


@pytest.mark.parametrize("name", ["emoji32_tiny", "emoji64_tiny"])
def test_emoji_config_has_the_mnist_retune(name):
    mnist, emoji = load_config("sphere", "mnist_tiny")["model"], load_config("sphere", name)["model"]
    assert {k: emoji[k] for k in RETUNED} == {k: mnist[k] for k in RETUNED}


@pytest.mark.parametrize("name", ["emoji32_tiny", "emoji64_tiny"])
def test_emoji_config_builds_and_trains_two_steps(name, tmp_path):
    size = int(name[5:7])
    data = rgb_data(tmp_path / "data", size)
    out = tmp_path / "run"
    argv = ["train", "sphere", "--config", name, "--data", str(data), "--out", str(out), "--steps", "2",
            "--set", "train.batch_size=4", "--set", "train.ckpt_every=2", "--set", "train.eval_every=0",
            "--set", "train.log_every=1", "--device", "cpu"]
    assert main(argv) == 0
    (ckpt,) = list_checkpoints(out)
    cfg = json.loads((ckpt / "config.json").read_text())["model"]
    assert (cfg["image_size"], cfg["channels"], cfg["num_classes"]) == (size, 3, 3)
    assert cfg["patch_size"] == load_config("sphere", name)["model"]["patch_size"]
    with open(out / "metrics.csv") as fh:
        loss = [float(row["loss"]) for row in csv.DictReader(fh) if row.get("loss")]
    assert len(loss) >= 2 and all(np.isfinite(loss))


def test_sphere_rgb_rejects_an_unknown_arm(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sphere_rgb

    assert sphere_rgb.main(["--arms", "retuned,nope", "--budget", "smoke"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_sphere_rgb_benchmark_end_to_end(tmp_path, monkeypatch):
    """Both arms train, every cell is scored against a real floor, the edits run, and the page shows them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import results_page
    import sphere_rgb

    monkeypatch.chdir(ROOT)
    data = rgb_data(tmp_path / "data", 32, n=180, classes=9)  # the edits use emoji class ids up to 8
    out, images = tmp_path / "sphere_emoji32_smoke.json", tmp_path / "images"
    argv = ["--data", str(data), "--budget", "smoke", "--device", "cpu", "--runs", str(tmp_path / "runs"),
            "--out", str(out), "--images", str(images)]
    assert sphere_rgb.main(argv) == 0
    res = json.loads(out.read_text())
    assert [a["arm"] for a in res["arms"]] == list(sphere_rgb.ARMS)
    assert res["real"]["n_samples"] == res["arms"][0]["cells"][0]["n_samples"]
    plain = [c["steps"] for c in res["arms"][1]["cells"]]
    assert plain == [1, 2, 4, 6]
    assert len(res["arms"][0]["cells"]) > len(plain)  # the reference arm adds CFG positions and fresh noise
    assert {Path(e["image"]).name for e in res["edits"]} == {p.name for p in images.glob("*.png")}
    page = "\n".join(results_page.sphere_rgb_section(res))
    assert all(f"images/{Path(e['image']).name}" in page for e in res["edits"])
