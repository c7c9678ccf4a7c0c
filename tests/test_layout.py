"""The package's shape: the import rules between layers, no cycles, a torch-free `spheregen --help`, commands that
work from any directory, checkpoints written before the redesign, and one-line errors for misplaced flags."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spheregen import cli
from spheregen.models import load_model

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "spheregen"
MODELS_MAY_IMPORT = {"spheregen.sphere", "spheregen.layers", "spheregen.losses", "spheregen.config",
                     "spheregen.errors", "spheregen.checkpoint"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every spheregen module a file imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import; spheregen uses absolute imports"
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    modules = {_module_name(p) for p in PKG.rglob("*.py")} - {"spheregen"}  # the root package is empty
    return {m for m in found if m in modules}


GRAPH = {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def test_models_import_only_the_core():
    for mod, deps in GRAPH.items():
        if mod.startswith("spheregen.models"):
            bad = {d for d in deps if d not in MODELS_MAY_IMPORT and not d.startswith("spheregen.models")}
            assert not bad, f"{mod} imports {sorted(bad)}"


def test_nothing_imports_the_cli():
    for mod, deps in GRAPH.items():
        if not mod.startswith("spheregen.cli"):
            assert not {d for d in deps if d.startswith("spheregen.cli")}, mod


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(mod: str, stack: list[str]) -> None:
        state[mod] = 1
        for dep in GRAPH.get(mod, ()):
            if mod.startswith(dep + "."):  # a module importing its own package's __init__
                continue
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep])
            if dep not in state:
                visit(dep, stack + [dep])
        state[mod] = 2

    for mod in sorted(GRAPH):
        if mod not in state:
            visit(mod, [mod])


def test_help_answers_without_torch():
    code = "import sys; from spheregen.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
    assert "sample" in out and "convert" in out


def _spheregen(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "spheregen.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


def test_commands_work_outside_the_repository(tmp_path, tiny):
    assert _spheregen(["demo", "--help"], tmp_path).returncode == 0
    shown = _spheregen(["config", "show", "tokenizer", "--config", "mnist_tiny", "--set", "train.lr=5e-4"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["train"]["lr"] == 5e-4
    run = _spheregen(["train", "tokenizer", "--config", "mnist_tiny", "--data", str(tiny / "d28"), "--steps", "1",
                      "--set", "train.batch_size=2", "--set", "data.test_fraction=0", "--out", "tok"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert list((tmp_path / "tok" / "checkpoints").glob("step_*"))
    sample = _spheregen(["sample", "--ckpt", str(tiny / "ar"), "--classes", "1", "--n", "1", "--steps", "1",
                         "--out", "g.png", "--quiet"], tmp_path)
    assert sample.returncode == 0, sample.stderr
    assert (tmp_path / "g.png").is_file()


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_a_flag_of_the_other_model_is_refused(tmp_path, tiny):
    proc = _spheregen(["sample", "--ckpt", str(tiny / "ar"), "--cfg-position", "pixel", "--out", "g.png"], tmp_path)
    _one_line_error(proc, "--cfg-position", "Sphere Encoder", "SphereAR")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("override, words", [("train.lr=abc", ("train.lr", "number", "abc")),
                                             ("train.steps=1.5", ("train.steps", "integer")),
                                             ("model.nope=1", ("model.nope", "unknown"))])
def test_bad_overrides_are_one_line(tmp_path, tiny, override, words):
    proc = _spheregen(["train", "tokenizer", "--config", "mnist_tiny", "--data", str(tiny / "d28"), "--set",
                       override, "--out", "run"], tmp_path)
    _one_line_error(proc, *words)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_config_name_lists_the_shipped_ones(tmp_path):
    _one_line_error(_spheregen(["train", "ar", "--config", "nope", "--out", "r"], tmp_path), "nope", "mnist_tiny")


def test_checkpoints_from_before_the_redesign_load_and_reproduce_their_outputs():
    """tests/fixtures/pre_redesign was written by the code before the layered redesign (see its README)."""
    fixture = ROOT / "tests" / "fixtures" / "pre_redesign"
    expected = load_file(str(fixture / "outputs.safetensors"))
    tokenizer = load_model(fixture / "tokenizer").eval()
    ar = load_model(fixture / "ar").eval()
    encoder = load_model(fixture / "sphere_encoder").eval()
    assert tokenizer.gan is not None  # its discriminator.* keys now live in the GAN loss module
    # fp32 to 1e-5, not bitwise: conv/matmul kernels differ between CPUs (1e-6 seen between two x86 hosts)
    close = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(tokenizer.reconstruct(expected["images"]), expected["tokenizer_reconstruction"],
                                   **close)
        torch.testing.assert_close(ar.generate([0, 2], [3, 4], steps=3, cfg=2.0),
                                   expected["ar_tokens_seeds_3_4_cfg2_steps3"], **close)
        images = encoder.generate_images(torch.tensor([0, 1]), [7, 8], {"cfg": 1.5, "steps": 2})
    torch.testing.assert_close(images, expected["sphere_encoder_images_seeds_7_8_cfg1.5_steps2"], **close)


def test_unknown_sampling_option_is_an_error(tiny):
    ar = load_model(tiny / "ar")
    with pytest.raises(Exception, match="cfg_position"):
        ar.sampling_options({"cfg_position": "pixel"})
    assert ar.sampling_options({"steps": 3}).steps == 3
    assert np.isclose(ar.sampling_options(None).cfg, 1.0)
    assert cli.COMMANDS.keys() >= {"sample", "train", "convert", "config"}


def test_training_is_reproducible_across_processes(tmp_path, tiny):
    """The initial weights follow train.seed: two runs in two processes give the same checkpoint bit for bit."""
    for run in ("a", "b"):
        proc = _spheregen(["train", "tokenizer", "--config", "mnist_tiny", "--data", str(tiny / "d28"), "--steps",
                           "2", "--set", "train.batch_size=2", "--set", "data.test_fraction=0", "--out", run], tmp_path)
        assert proc.returncode == 0, proc.stderr
    a, b = (load_file(str(next((tmp_path / r / "checkpoints").glob("step_*")) / "model.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
