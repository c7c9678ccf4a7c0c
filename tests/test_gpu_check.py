"""benchmarks/gpu_check.py --dry-run: every section of the GPU check runs on the CPU with small shapes."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    monkeypatch.chdir(tmp_path)
    result = gpu_check.main(["--dry-run", "--out", str(tmp_path / "gc.json")])
    saved = json.loads((tmp_path / "gc.json").read_text())
    assert saved["dry_run"] and "await a GPU" in saved["note"]
    assert saved["training"]["step_s_median"] > 0 and saved["training"]["sdpa_kernel"] != "none seen"
    assert [(r["batch"], r["head_steps"]) for r in saved["sampling"]] == [(2, 4), (2, 2), (4, 4), (4, 2)]
    assert all(r["img_per_s"] > 0 for r in saved["sampling"])
    assert saved["sphere_encoder"]["img_per_s"] > 0
    m = result["mnist"]
    assert m["samples"] == 10 and 0.0 <= m["class_accuracy"] <= 1.0


def test_gpu_check_refuses_without_cuda(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs CUDA"):
        gpu_check.main([])
