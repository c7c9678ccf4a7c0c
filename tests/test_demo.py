"""`spheregen demo`'s planner: data detection (folders of any size/mode, dataset dirs), configs scaled to the
data, step counts from the budget, the guidance pick, default sampling settings in a checkpoint, and bad input.
The end-to-end runs are slow (benchmarks/demo_folder.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from spheregen.cli import main
from spheregen.cli.sample import with_defaults
from spheregen.config import from_dict, load_config
from spheregen.data.datasets import ImageDataset
from spheregen.engine import budget
from spheregen.engine.plan import choose_size, prepare_dataset, scan_folder, write_toml
from spheregen.engine.report import candidates, pick_best
from spheregen.errors import UserError
from spheregen.generation import load_generator, store_default_sampling
from spheregen.models.tokenizer import Tokenizer, TokenizerConfig


def _write(folder, n, size, mode, rng, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{start + i}.png")


@pytest.mark.parametrize("sizes, expect, warns", [
    ({(28, 28): 3}, 28, False), ({(32, 32): 3}, 32, False), ({(64, 64): 2}, 64, False),
    ({(40, 40): 1}, 32, True), ({(200, 150): 1}, 64, True), ({(32, 32): 2, (28, 28): 1}, 28, True),
    ({(16, 16): 1}, 28, True)])
def test_choose_size(sizes, expect, warns):
    size, warning = choose_size(Counter(sizes))
    assert size == expect
    assert (warning is not None) == warns


def test_gray_flat_folder_becomes_unconditional_one_channel(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path / "src", 5, (28, 28), "L", rng)
    scan = scan_folder(tmp_path / "src")
    assert scan.gray and scan.files == 5 and scan.classes == []
    ds = ImageDataset(prepare_dataset(tmp_path / "src", tmp_path / "cache", say=lambda s: None))
    assert (len(ds), ds.image_size, ds.channels, ds.num_classes) == (5, 28, 1, 0)
    with Image.open(tmp_path / "src" / "3.png") as im:
        assert np.array_equal(np.asarray(ds._memmap()[3][..., 0]), np.asarray(im))


def test_rgb_class_folders_mixed_sizes_and_modes_convert_with_warnings(tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path / "src" / "cats", 3, (48, 40), "RGB", rng)
    _write(tmp_path / "src" / "dogs", 2, (40, 48), "L", rng)
    said = []
    out = prepare_dataset(tmp_path / "src", tmp_path / "cache", say=said.append)
    ds = ImageDataset(out)
    assert (len(ds), ds.image_size, ds.channels, ds.classes) == (5, 32, 3, ["cats", "dogs"])
    assert any("resized to 32x32" in s for s in said) and any("mix modes" in s for s in said)
    again = prepare_dataset(tmp_path / "src", tmp_path / "cache", say=said.append)  # the cache is reused
    assert again == out and "built earlier" in said[-1]


def test_dataset_dir_is_used_as_it_is(tiny, tmp_path):
    assert prepare_dataset(tiny / "d28", tmp_path / "cache") == tiny / "d28"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("setup", ["missing", "empty", "junk", "file"])
def test_bad_data_is_one_line(tmp_path, setup):
    src = tmp_path / "src"
    if setup != "missing" and setup != "file":
        src.mkdir()
    if setup == "junk":
        (src / "a.png").write_text("not an image")
    if setup == "file":
        src.write_text("x")
    with pytest.raises(UserError):
        prepare_dataset(src, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv", [["--minutes", "0"], ["--minutes", "-3"], ["--data", "{empty}"]])
def test_demo_cli_rejects_bad_input(tmp_path, argv, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.format(empty=tmp_path / "empty") for a in argv]
    code = main(["demo", "--out", str(tmp_path / "run"), *argv] + ([] if "--data" in argv else
                                                                  ["--data", str(tmp_path / "empty")]))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("minutes" in err[0] or "images" in err[0])


@pytest.mark.parametrize("size, channels, grid", [(28, 1, 7), (32, 3, 8), (64, 3, 8), (64, 1, 8)])
def test_configs_scale_to_the_data(tmp_path, size, channels, grid):
    cfgs = budget.derive_configs("sphere_ar", size, channels, tmp_path)
    tok = Tokenizer(from_dict(TokenizerConfig, cfgs["tokenizer"]["model"], "model."))
    assert tok.grid == (grid, grid)
    assert cfgs["tokenizer"]["data"]["path"] == str(tmp_path) == cfgs["ar"]["data"]["path"]
    sphere = budget.derive_configs("sphere", size, channels, tmp_path)["sphere"]["model"]
    assert size // sphere["patch_size"] == grid


def test_written_configs_load_back(tmp_path):
    cfg = budget.derive_configs("sphere_ar", 64, 3, tmp_path)["tokenizer"]
    cfg["train"] = budget.fit_schedule(cfg["train"], 777, 0.2)
    back = load_config("tokenizer", write_toml(tmp_path / "tok.toml", cfg))
    assert back == json.loads(json.dumps(cfg))


@pytest.mark.parametrize("steps", [30, 100, 5000])
def test_schedule_fits_the_steps(steps):
    train = budget.fit_schedule({"warmup_steps": 100, "log_every": 50}, steps, 0.05)
    assert train["steps"] == steps and 1 <= train["warmup_steps"] <= max(1, steps // 10)
    assert train["ckpt_every"] * 0.05 <= budget.CKPT_SECONDS and train["log_every"] <= max(1, steps // 40)


def test_steps_fill_the_time_and_shrink_on_a_slower_machine():
    assert budget.steps_to_fit(60, 0.1) == 600
    assert budget.steps_to_fit(1, 0.1) == budget.MIN_STEPS
    plan = budget.StagePlan("ar", 60, 0.1, 600)
    assert budget.rescale_steps(plan, 60, 2.0) == 300
    assert budget.rescale_steps(plan, 600, 0.5) == 600  # never more than planned


def test_probe_measures_a_positive_step_time(tiny):
    ds = ImageDataset(tiny / "d28")
    cfg = {"model": {"image_size": 28, "in_channels": 1, "channels": [4, 8, 8], "dim": 16, "enc_depth": 1,
                     "dec_depth": 1, "n_heads": 2, "mlp_hidden": 32, "n_registers": 0, "perceptual": "none",
                     "disc_weight": 0.0}, "train": {"batch_size": 2, "lr": 1e-3}}
    model, items = budget.stage_model("tokenizer", cfg, ds)
    assert 0 < budget.probe_step_seconds(model, items, cfg["train"]) < 10


def test_pick_best_trades_accuracy_for_fid():
    rows = [{"acc": 0.70, "dfid": 5.0}, {"acc": 0.95, "dfid": 9.0}, {"acc": 0.94, "dfid": 7.0},
            {"acc": 0.90, "dfid": 1.0}]
    assert pick_best(rows) is rows[2]
    assert pick_best(rows, tolerance=0.0) is rows[1]
    assert candidates("ar")[0]["cfg"] == 1.0 and candidates("sphere_encoder")[0].get("cfg", 1.0) == 1.0


def test_checkpoint_default_sampling_is_used_without_flags(tiny, tmp_path):
    ckpt = tmp_path / "ar"
    shutil.copytree(tiny / "ar", ckpt)
    assert load_generator(ckpt).default_sampling == {}
    store_default_sampling(ckpt, {"cfg": 4.0, "cfg_schedule": "constant", "steps": 3})
    model = load_generator(ckpt)
    opts = model.sampling_options(with_defaults(model, {"steps": 2}, quiet=True))
    assert (opts.cfg, opts.cfg_schedule, opts.steps) == (4.0, "constant", 2)  # a flag still wins
    out = tmp_path / "g.png"
    code = subprocess.run([sys.executable, "-m", "spheregen.cli", "sample", "--ckpt", str(ckpt), "--n", "1",
                           "--classes", "0", "--out", str(out)], capture_output=True, text=True)
    assert code.returncode == 0 and "cfg=4.0" in code.stdout and out.is_file()


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_folder(tmp_path):
    """A raw RGB folder -> dataset, plan, two stages, sweep, default settings in the checkpoint, grid, report;
    run again, everything finished is reused."""
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        _write(tmp_path / "src" / c, 10, (36, 36), "RGB", rng)
    argv = ["demo", "--data", str(tmp_path / "src"), "--out", str(tmp_path / "run"), "--minutes", "5",
            "--tokenizer-steps", "3", "--steps", "3", "--sweep-per-class", "1"]
    assert main(argv) == 0
    run = tmp_path / "run"
    plan = json.loads((run / "plan_sphere_ar.json").read_text())
    assert [s["steps"] for s in plan["stages"]] == [3, 3]
    assert (run / "report.md").is_file() and (run / "samples_sphere_ar.png").is_file()
    assert load_generator(run / "ar").default_sampling
    timings = json.loads((run / "timings_sphere_ar.json").read_text())
    assert main(argv) == 0  # resumes: nothing retrained
    again = json.loads((run / "timings_sphere_ar.json").read_text())
    assert again["tokenizer"] - timings["tokenizer"] < 5 and again["ar"] - timings["ar"] < 5
