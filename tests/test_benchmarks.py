"""The ablation harness end to end at the smoke budget: every script trains, samples, scores, writes its JSON,
resumes without retraining, and the results page turns the JSON into tables and plots."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def small_mnist(tmp: Path, size: int, per_class: int = 30) -> str:
    """A class-balanced slice of MNIST (the classifier behind acc / dFID trains on it in seconds)."""
    from spheregen.data.builders import build_mnist

    full = tmp / f"full{size}"
    build_mnist(full, size)
    images, labels = np.load(full / "images.npy"), np.load(full / "labels.npy")
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    out = tmp / f"mnist{size}"
    out.mkdir()
    np.save(out / "images.npy", images[keep])
    np.save(out / "labels.npy", labels[keep])
    for name in ("classes.json", "meta.json"):
        (out / name).write_text((full / name).read_text())
    return str(out)


@pytest.fixture(scope="module")
def ablations(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)  # the scripts name configs relative to the repository, like a user's command line
    results = tmp / "results"
    d28, d32 = small_mnist(tmp, 28), small_mnist(tmp, 32)
    posterior, sphere, speed = (importlib.import_module(m) for m in ("ablate_posterior", "ablate_sphere",
                                                                      "ablate_speed"))
    common = ["--budget", "smoke", "--device", "cpu"]
    post_argv = ["--data", d28, "--arms", "spherical,gaussian_norm_noproj", "--runs", str(tmp / "post"),
                 "--out", str(results / "posterior_mnist28_smoke.json"), *common]
    assert posterior.main(post_argv) == 0
    assert sphere.main(["--data", d32, "--arms", "alpha85", "--runs", str(tmp / "sphere"),
                        "--out", str(results / "sphere_mnist32_smoke.json"), *common]) == 0
    assert speed.main(["--data", d28, "--ckpt", str(tmp / "post" / "ar-spherical"), "--head-steps", "1,3",
                       "--samplers", "euler", "--runs", str(tmp / "speed"),
                       "--out", str(results / "speed_mnist28_smoke.json"), *common]) == 0
    yield {"tmp": tmp, "results": results, "post_argv": post_argv, "posterior": posterior}
    mp.undo()


def test_posterior_ablation_writes_every_cell(ablations):
    res = json.loads((ablations["results"] / "posterior_mnist28_smoke.json").read_text())
    assert [a["arm"] for a in res["arms"]] == ["spherical", "gaussian_norm_noproj"]
    assert [a["ar_projection"] for a in res["arms"]] == [True, False]
    for arm in res["arms"]:
        assert [c["cfg"] for c in arm["cells"]] == [1.0, 4.0]
        for c in arm["cells"]:
            assert c["n_samples"] == 10 and np.isfinite(c["fid"]) and 0.0 <= c["acc"] <= 1.0
    assert res["real"]["n_samples"] == 10 and res["real"]["fid"] < res["arms"][0]["cells"][0]["fid"]
    # the AR of the no-projection arm really was trained without projection
    cfg = json.loads((ablations["tmp"] / "post" / "ar-gaussian_norm_noproj" / "checkpoints" / "step_00000002"
                      / "config.json").read_text())
    assert cfg["model"]["project_inputs"] is False and cfg["model"]["project_outputs"] is False
    assert (ablations["tmp"] / "post" / "grids" / "spherical_cfg4.png").is_file()


def test_posterior_ablation_resumes_without_retraining(ablations):
    ckpt = ablations["tmp"] / "post" / "ar-spherical" / "checkpoints" / "step_00000002" / "model.safetensors"
    before = ckpt.stat().st_mtime_ns
    first = json.loads((ablations["results"] / "posterior_mnist28_smoke.json").read_text())
    out = ablations["tmp"] / "again.json"
    argv = ablations["post_argv"][:]
    argv[argv.index("--out") + 1] = str(out)
    assert ablations["posterior"].main(argv) == 0
    again = json.loads(out.read_text())
    assert ckpt.stat().st_mtime_ns == before
    assert [a["cells"] for a in again["arms"]] == [a["cells"] for a in first["arms"]]


def test_changed_budget_does_not_reuse_cells(ablations):
    """`--set per_class=2` in the same run folder reuses the trainings but scores every cell afresh."""
    ckpt = ablations["tmp"] / "post" / "ar-spherical" / "checkpoints" / "step_00000002" / "model.safetensors"
    before = ckpt.stat().st_mtime_ns
    out = ablations["tmp"] / "more.json"
    argv = ablations["post_argv"][:]
    argv[argv.index("--out") + 1] = str(out)
    argv[argv.index("--arms") + 1] = "spherical"
    assert ablations["posterior"].main([*argv, "--set", "per_class=2"]) == 0
    res = json.loads(out.read_text())
    assert ckpt.stat().st_mtime_ns == before
    assert res["real"]["n_samples"] == 20
    assert [c["n_samples"] for c in res["arms"][0]["cells"]] == [20, 20]


def test_sphere_ablation_scores_steps_and_cfg_positions(ablations):
    res = json.loads((ablations["results"] / "sphere_mnist32_smoke.json").read_text())
    (arm,) = res["arms"]
    keys = [(c["steps"], c["cfg"], c["cfg_position"], c["shared_noise"]) for c in arm["cells"]]
    assert keys[:4] == [(1, 1.0, "combo", True), (2, 1.0, "combo", True), (4, 1.0, "combo", True),
                        (6, 1.0, "combo", True)]
    assert keys[4:] == [(4, 2.0, "pixel", True), (4, 2.0, "latent", True), (4, 2.0, "combo", True),
                        (4, 1.0, "combo", False)]
    grids = {p.name for p in (ablations["tmp"] / "sphere" / "grids").glob("*.png")}
    assert grids == {f"alpha85_{k}.png" for k in ("steps1", "steps2", "steps4", "steps6", "steps4_cfg2_pixel",
                                                  "steps4_cfg2_latent", "steps4_cfg2_combo", "steps4_fresh")}


def test_results_page_has_tables_verdicts_and_plots(ablations):
    import results_page

    out = ablations["tmp"] / "docs" / "results.md"
    assert results_page.main(["--budget", "smoke", "--results", str(ablations["results"]), "--out", str(out)]) == 0
    text = out.read_text()
    for needle in ("Table 2 at this scale", "CFG position", "| euler | 3 |", "**Paper:**", "data/emoji32"):
        assert needle in text, needle
    pngs = {p.name for p in (out.parent / "images" / "results").glob("*.png")}
    assert {"post_fid.png", "robustness_post.png", "speed_seconds.png", "sphere_steps_fid.png"} <= pngs


def test_unknown_arm_is_one_line_exit_2(ablations, capsys):
    argv = ablations["post_argv"][:]
    argv[argv.index("--arms") + 1] = "spherical,vmf"
    assert ablations["posterior"].main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown arm 'vmf'" in err[0]


def test_budget_overrides():
    import harness

    from spheregen.errors import UserError

    b = harness.get_budget("cpu", ["ar_steps=7", "cfgs=1,3"])
    assert b.ar_steps == 7 and b.cfgs == (1.0, 3.0) and b.tokenizer_steps == harness.BUDGETS["cpu"].tokenizer_steps
    for bad in ("ar_step=7", "ar_steps", "ar_steps=seven"):
        with pytest.raises(UserError, match="--set"):
            harness.get_budget("cpu", [bad])


def test_param_counts_table(tmp_path):
    """Every paper config builds on the meta device and lands within 7% of its reported size."""
    import param_counts

    out = tmp_path / "counts.md"
    assert param_counts.main(["--out", str(out)]) == 0
    rows = [r for r in out.read_text().splitlines() if r.startswith("| ") and "`configs/" in r]
    assert len(rows) == len(param_counts.PAPER)
    diffs = [float(r.split("|")[5].strip().rstrip("%")) for r in rows if r.split("|")[5].strip() != "-"]
    assert len(diffs) == 8 and max(abs(d) for d in diffs) < 7.0


def test_seed_spread_scores_disjoint_seed_sets(ablations):
    """Three seed sets of one checkpoint: seeds do not overlap, and the first set reproduces the ablation's cell."""
    import seed_spread

    tmp = ablations["tmp"]
    d28 = ablations["post_argv"][ablations["post_argv"].index("--data") + 1]
    out = tmp / "spread.json"
    assert seed_spread.main(["--data", d28, "--ckpt", str(tmp / "post" / "ar-spherical"), "--cfg", "4", "--sets", "3",
                             "--runs", str(tmp / "spread"), "--out", str(out), "--budget", "smoke",
                             "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert [r["seed"] for r in res["rows"]] == [0, 10, 20]
    assert res["spread"]["fid"]["min"] <= res["spread"]["fid"]["mean"] <= res["spread"]["fid"]["max"]
    post = json.loads((ablations["results"] / "posterior_mnist28_smoke.json").read_text())
    cell = next(c for c in post["arms"][0]["cells"] if c["cfg"] == 4.0)
    assert res["rows"][0]["fid"] == pytest.approx(cell["fid"]) and res["rows"][0]["acc"] == cell["acc"]
    # the results page states the spread next to the table of the same dataset
    import results_page

    results = tmp / "with_spread"
    results.mkdir()
    (results / "posterior_mnist28_smoke.json").write_text((ablations["results"] / "posterior_mnist28_smoke.json")
                                                          .read_text())
    (results / "seed_spread_mnist28_smoke.json").write_text(out.read_text())
    page = tmp / "spread_docs" / "results.md"
    assert results_page.main(["--budget", "smoke", "--results", str(results), "--out", str(page)]) == 0
    assert f"FID {res['spread']['fid']['mean']:.1f} ± {res['spread']['fid']['sd']:.1f}" in page.read_text()
