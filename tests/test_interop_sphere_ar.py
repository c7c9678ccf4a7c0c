"""The authors' SphereAR checkpoints: conversion is exact against their code's recorded outputs, loading is
safe and strict, the Hub path works offline, and every published size converts.

The fixture directory is $SPHEREGEN_SPHEREAR_FIXTURE, else ../shared/fixtures/sphereAR_reference beside the
repository. Nothing below assumes its sizes: they are read from its files (sampling settings from its arrays
and README), so the same tests run on fixtures of other sizes made the same way.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sphere_ar_layout import SIZES, ar_state, parameter_count, vae_state

from spheregen import cli
from spheregen.generation import class_labels, load_generator
from spheregen.interop.safe_load import safe_load
from spheregen.interop.sphere_ar import build_models, load_authors_file, load_pair, split_state
from spheregen.models.ar import SphereAR

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("SPHEREGEN_SPHEREAR_FIXTURE") or ROOT.parent / "shared/fixtures/sphereAR_reference")
pytestmark = pytest.mark.skipif(not (FIXTURE / "reference_outputs.safetensors").is_file(),
                                reason=f"no SphereAR reference fixture at {FIXTURE} (set SPHEREGEN_SPHEREAR_FIXTURE)")


def _file(kind: str) -> Path:
    """The fixture's AR file (the one with AR keys) or VAE file, whatever their names."""
    for path in sorted(FIXTURE.glob("*.pt")):
        has_ar = bool(load_authors_file(path).ar)
        if has_ar == (kind == "ar"):
            return path
    raise FileNotFoundError(f"no {kind} file in {FIXTURE}")


@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIXTURE / "reference_outputs.safetensors"))


@pytest.fixture(scope="module")
def converted():
    tokenizer, model, _ = load_pair(_file("ar"))
    return tokenizer, model


def _cfg_scale_from_readme() -> float:
    """The recorded run's CFG scale, as the fixture README states it ("CFG 4.5 with the linear schedule")."""
    m = re.search(r"CFG (\d+(?:\.\d+)?) with the linear schedule", (FIXTURE / "README.md").read_text())
    assert m, "the fixture README does not state the CFG scale of its sampling run"
    return float(m.group(1))


def _noise(ref, k: int) -> torch.Tensor:
    return ref[f"sample_noise_{k:03d}"].permute(1, 0, 2)  # [draws, rows, d] -> [rows, draws, d]


def test_encoder_and_decoder_match_the_reference(converted, ref):
    tokenizer, _ = converted
    with torch.no_grad():
        params = tokenizer.encode(ref["images"])
        decoded = tokenizer.decode(ref["decode_in"], clamp=False)
    assert (params["mu"] - ref["encode_mu"]).abs().max() <= 1e-5
    assert (params["kappa"] - ref["encode_kappa"]).abs().max() <= 1e-5
    assert (decoded - ref["decode_out"]).abs().max() <= 1e-4


def test_ar_conditions_and_head_velocity_match_the_reference(converted, ref):
    _, model = converted
    with torch.no_grad():
        cond = model.hidden_states(ref["ar_tokens"], ref["ar_labels"])
        flat = ref["ar_head_condition"].reshape(-1, ref["ar_head_condition"].shape[-1])
        velocity = model.head(ref["head_xt"], ref["head_t"], flat)
    assert (cond - ref["ar_head_condition"]).abs().max() <= 1e-5
    assert (velocity - ref["head_velocity"]).abs().max() <= 1e-5


def test_every_sampled_token_resolved_from_the_reference_prefix(converted, ref):
    """Token k, solved from the reference's own prefix and recorded noise, equals the recorded token:
    token 0 of all rows (independent at s_0 = 1), tokens k >= 1 guided and shared by both rows."""
    _, model = converted
    tokens, labels = ref["sample_tokens"], ref["sample_labels"]
    B, T = len(labels), tokens.shape[1]
    steps, scale = ref["sample_noise_000"].shape[0] - 1, _cfg_scale_from_readme()
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)])
    assert _noise(ref, 0).shape[0] == 2 * B and _noise(ref, 1).shape[0] == B
    with torch.no_grad():
        cond = model.hidden_states(tokens, rows)  # teacher forcing on the recorded prefixes of all 2B rows
        first = model.solve_token(cond[:, 0], _noise(ref, 0), None, "euler_maruyama", steps)
        assert (first - tokens[:, 0]).abs().max() <= 1e-4
        assert (tokens[:B, 0] - tokens[B:, 0]).abs().max() > 1e-3  # the null rows kept their own token 0
        for k in range(1, T):
            z = model.solve_token(cond[:, k], _noise(ref, k), 1 + (scale - 1) * k / T, "euler_maruyama", steps)
            assert (z - tokens[:B, k]).abs().max() <= 1e-4, k
            assert (z - tokens[B:, k]).abs().max() <= 1e-4, k
            assert torch.allclose(z.norm(dim=-1), torch.full((B,), model.config.radius), atol=1e-5)


def test_generate_with_recorded_noise_follows_the_reference_run(converted, ref):
    """The converted checkpoint samples like the authors by default (independent token 0); its first
    tokens equal the recorded run (later ones drift chaotically with random weights, see the README)."""
    _, model = converted
    assert model.config.first_token == "independent"
    labels, T = ref["sample_labels"], ref["sample_tokens"].shape[1]
    steps = ref["sample_noise_000"].shape[0] - 1
    noise = [_noise(ref, k) for k in range(T)]
    z = model.generate(labels, [0] * len(labels), steps=steps, cfg=_cfg_scale_from_readme(), noise=noise)
    assert (z[:, :2] - ref["sample_tokens"][: len(labels), :2]).abs().max() <= 1e-4
    shared = model.generate(labels, [0] * len(labels), steps=steps, cfg=_cfg_scale_from_readme(),
                            noise=[noise[0][: len(labels)]] + noise[1:], first_token="shared")
    assert (shared[:, 0] - z[:, 0]).abs().max() <= 1e-6  # token 0 of the cond rows is the same either way
    assert (shared[:, 1] - z[:, 1]).abs().max() > 1e-4  # but the null rows' history differs after it


def test_independent_first_token_keeps_each_image_a_function_of_its_seed(converted):
    _, model = converted
    kw = dict(steps=3, cfg=3.0, first_token="independent")
    both = model.generate([1, 2], [7, 8], **kw)
    alone = model.generate([2], [8], **kw)
    assert torch.allclose(both[1], alone[0], atol=1e-5)


def test_cli_convert_then_sample_from_another_directory(tmp_path, monkeypatch, ref, capsys):
    out = tmp_path / "converted"
    assert cli.main(["convert", "sphere-ar", str(_file("ar")), "--out", str(out)]) == 0
    assert (out / "tokenizer" / "model.safetensors").is_file() and (out / "ar" / "config.json").is_file()
    assert cli.main(["convert", "sphere-ar", str(_file("ar")), "--out", str(out)]) == 2  # never overwritten
    assert "--overwrite" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    n = ref["sample_labels"].numel()
    assert cli.main(["sample", "--ckpt", str(out / "ar"), "--classes", "0", "--n", str(n), "--steps", "2",
                     "--cfg", "2", "--npz", "s.npz", "--quiet"]) == 0
    assert (elsewhere / "s.npz").is_file()


def test_model_weights_and_separate_vae_file(tmp_path, converted):
    """--weights model takes `model` instead of `ema`; the VAE may come from vae.pt, the AR from a bare
    state dict without vae.* keys."""
    raw = safe_load(_file("ar"))
    _, ema_model = converted
    _, plain, origin = load_pair(_file("ar"), weights="model")
    assert origin["converted_from"]["weights"] == "model"
    key = "proj_in.weight"
    assert torch.equal(plain.state_dict()[key], raw["model"][key].float())
    assert not torch.equal(plain.state_dict()[key], ema_model.state_dict()[key])
    bare = tmp_path / "ar_only.pt"
    torch.save({k: v for k, v in raw["ema"].items() if not k.startswith("vae.")}, bare)
    with pytest.raises(Exception, match="vae"):
        load_pair(bare)
    tokenizer, model, _ = load_pair(bare, vae_path=_file("vae"))
    assert torch.equal(model.state_dict()[key], ema_model.state_dict()[key])


@pytest.mark.parametrize("change", ["drop", "extra", "args"])
def test_strict_load_names_the_offending_key(tmp_path, change, capsys):
    raw = safe_load(_file("ar"))
    state = dict(raw["ema"])
    if change == "drop":
        state.pop("norm.weight")
    elif change == "extra":
        state["head.net.mystery.weight"] = torch.zeros(2)
    else:
        raw["args"].num_classes = 12345
    bad = tmp_path / "bad.pt"
    torch.save({**raw, "ema": state, "model": state}, bad)
    assert cli.main(["convert", "sphere-ar", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {"drop": "norm.weight", "extra": "head.net.mystery.weight", "args": "num_classes"}[change] in err
    assert not (tmp_path / "o").exists()


class _Payload:
    """Unpickling this runs exec(code): what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (exec, (self.code,))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "SphereAR_evil.pt"
    raw = safe_load(_file("ar"))
    torch.save({**raw, "args": _Payload(marker)}, evil)
    proc = subprocess.run([sys.executable, "-m", "spheregen.cli", "convert", "sphere-ar", str(evil),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "refusing" in proc.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("size", sorted(SIZES))
def test_published_sizes_convert_on_the_meta_device(size):
    """Authors' B / L / H state dicts (meta tensors, built from the key rules) map onto spheregen's models
    key for key, with the authors' parameter counts."""
    expected = {"B": 204_499_216, "L": 476_380_176, "H": 943_854_096}[size]
    ar, vae = ar_state(*SIZES[size]), vae_state()
    assert parameter_count(ar) == expected and parameter_count(vae) == 75_393_297
    ckpt = split_state({"model": {**vae, **ar}, "args": {"model": f"SphereAR-{size}"}}, "ema", size)
    tokenizer, model = build_models(ckpt, ckpt, device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(p.numel() for p in tokenizer.parameters()) == 75_393_297
    assert model.config.n_heads == SIZES[size][0] // 64


def test_heads_override(converted):
    raw = split_state(safe_load(_file("ar")), "ema", "fixture")
    _, model = build_models(raw, raw, heads=2, device="meta")
    assert model.config.n_heads == 2
    with pytest.raises(Exception, match="heads"):
        build_models(raw, raw, heads=3 * converted[1].config.dim, device="meta")


def _hub_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """A Hugging Face Hub cache laid out as huggingface_hub stores it: blobs, refs/main, snapshots/REV."""
    base = root / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    for i, (name, src) in enumerate(files.items()):
        blob = base / "blobs" / f"{i:040x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, blob)
        link = base / "snapshots" / rev / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


def _run_offline(args: list[str], tmp_path: Path, hub: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "SPHEREGEN_CACHE": str(tmp_path / "sg"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "spheregen.cli", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path)


def test_hub_path_offline_from_a_laid_out_cache(tmp_path):
    ar_file = _file("ar")
    hub = _hub_cache(tmp_path / "hub", "guolinke/SphereAR", {"SphereAR_B.pt": ar_file, "vae.pt": _file("vae")})
    args = ["sample", "--ckpt", "hf:guolinke/SphereAR/SphereAR_B.pt", "--n", "1", "--classes", "0", "--steps",
            "2", "--npz", "a.npz", "--quiet"]
    first = _run_offline(args, tmp_path, hub)
    assert first.returncode == 0, first.stderr
    assert "converting" in first.stdout
    again = _run_offline(args, tmp_path, hub)  # converted once, reused
    assert again.returncode == 0 and "converting" not in again.stdout
    conv = _run_offline(["convert", "sphere-ar", "hf:guolinke/SphereAR/SphereAR_B.pt", "--out", "c"], tmp_path, hub)
    assert conv.returncode == 0, conv.stderr
    assert SphereAR.from_pretrained(tmp_path / "c" / "ar").config.first_token == "independent"


def test_hub_path_offline_without_cache_fails_cleanly(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _run_offline(["sample", "--ckpt", "hf:guolinke/SphereAR/SphereAR_B.pt", "--out", "g.png"], tmp_path,
                        tmp_path / "empty")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "cache" in proc.stderr and "Traceback" not in proc.stderr
    bad = _run_offline(["sample", "--ckpt", "hf:just-a-name", "--out", "g.png"], tmp_path, tmp_path / "empty")
    assert bad.returncode == 2 and "hf:OWNER/REPO/FILE" in bad.stderr


def test_class_sampling():
    assert class_labels([3, 5], 2) == [3, 3, 5, 5]
    drawn = class_labels(list(range(10)), 50, "random", seed=99)
    assert len(drawn) == 500 and set(drawn) == set(range(10)) and drawn == class_labels(list(range(10)), 50,
                                                                                         "random", seed=99)
    assert drawn != sorted(drawn) and drawn != class_labels(list(range(10)), 50, "random", seed=100)


def test_converted_generator_loads_through_sample_cli(tmp_path, converted):
    out = tmp_path / "c"
    cli.main(["convert", "sphere-ar", str(_file("ar")), "--out", str(out)])
    model = load_generator(str(out / "ar"))
    assert model._decoder is not None and model._decoder.config.decoder_conv_bias is False


def test_vae_file_alone_converts_to_a_tokenizer_and_encodes_from_the_hub(tmp_path, converted, ref):
    """The authors' vae.pt gives a tokenizer (to encode one's own data for a new AR model), here through hf:."""
    out = tmp_path / "vae_only"
    assert cli.main(["convert", "sphere-ar", str(_file("vae")), "--out", str(out)]) == 0
    assert (out / "tokenizer" / "config.json").is_file() and not (out / "ar").exists()
    size, channels = ref["images"].shape[-1], ref["images"].shape[1]
    data = tmp_path / "data"
    data.mkdir()
    images = ((ref["images"].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    np.save(data / "images.npy", images)
    np.save(data / "labels.npy", np.zeros(len(images), dtype=np.int64))
    (data / "classes.json").write_text(json.dumps(["all"]))
    (data / "meta.json").write_text(json.dumps({"source": "test", "size": size, "count": len(images),
                                                "channels": channels}))
    hub = _hub_cache(tmp_path / "hub", "guolinke/SphereAR", {"vae.pt": _file("vae")})
    proc = _run_offline(["encode", "--tokenizer", "hf:guolinke/SphereAR/vae.pt", "--data", str(data),
                         "--split", "all", "--out", "latents"], tmp_path, hub)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "latents").is_dir()
    ar_dir = tmp_path / "converted"
    assert cli.main(["convert", "sphere-ar", str(_file("ar")), "--out", str(ar_dir)]) == 0
    proc = _run_offline(["sample", "--ckpt", str(ar_dir / "ar"), "--tokenizer", "hf:guolinke/SphereAR/vae.pt",
                         "--classes", "0", "--n", "1", "--steps", "1", "--npz", "t.npz", "--quiet"], tmp_path, hub)
    assert proc.returncode == 0, proc.stderr
