"""The Sphere Encoder converter against the authors' reference outputs (fixture README: every key documented).

The fixture folder comes from $SPHEREGEN_SPHERE_ENCODER_FIXTURE, else ../shared/fixtures/sphere_encoder_reference
beside the clone. Everything (sizes, classes, head type, steps, CFG) is read from its cfg.json, fixture.json and
tensors, so the same tests run on fixtures of other widths, patch sizes, heads, latent channels, heads types and
on unconditional models.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spheregen.cli import main as cli_main
from spheregen.errors import UserError
from spheregen.interop.sphere_encoder import SIZES_ENV, convert_file, convert_for_cache
from spheregen.models import load_model
from spheregen.models.sphere_encoder_edit import noise_interpolate

FIXTURE = Path(os.environ.get("SPHEREGEN_SPHERE_ENCODER_FIXTURE")
               or Path(__file__).resolve().parents[2] / "shared/fixtures/sphere_encoder_reference")
TOL, IMG_TOL = 1e-5, 1e-4


def need_fixture() -> None:
    if not (FIXTURE / "reference_outputs.safetensors").is_file():
        pytest.skip(f"Sphere Encoder reference fixture not found at {FIXTURE} (set SPHEREGEN_SPHERE_ENCODER_FIXTURE)")


def facts() -> dict:
    f = FIXTURE / "fixture.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def size_args() -> list[str]:
    """--size entries for size names outside the authors' table (fixture.json's size_dict)."""
    return [f"{k}={v['width']},{v['layers']},{v['heads']}" for k, v in facts().get("size_dict", {}).items()]


def ckpt_file() -> Path:
    rel = facts().get("checkpoint")
    return FIXTURE / rel if rel else sorted((FIXTURE / "ckpt").glob("*.pth"))[-1]


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    need_fixture()
    return load_file(str(FIXTURE / "reference_outputs.safetensors"))


@pytest.fixture(scope="module")
def models():
    """Both weight sets, held channels_last as the reference's sampler holds them (same CPU conv kernels)."""
    need_fixture()
    cfg = FIXTURE / "cfg.json"
    return {w: convert_file(ckpt_file(), cfg, w, size_args()).to(memory_format=torch.channels_last)
            for w in ("model", "ema")}


def labels_of(model, ref, key):
    return ref[key] if model.config.num_classes and key in ref else None


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def to01(x: torch.Tensor) -> torch.Tensor:
    return (x / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def test_encoder_before_and_after_spherify(models, ref):
    m = models["model"]
    z = m.encode(ref["images"], labels_of(m, ref, "labels"))
    assert maxdiff(z, ref["encode_out"]) <= TOL
    assert maxdiff(m.spherify(z), ref["encode_sphere"]) <= TOL


@torch.no_grad()
def test_decoder_with_model_and_ema_weights(models, ref):
    for weights, key in (("model", "decode_out"), ("ema", "decode_out_ema")):
        m = models[weights]
        assert maxdiff(m.decode(ref["decode_in"], labels_of(m, ref, "labels")), ref[key]) <= TOL, weights


@torch.no_grad()
def test_reconstruction(models, ref):
    m = models["model"]
    lab = labels_of(m, ref, "labels")
    assert maxdiff(to01(m.decode(m.encode_sphere(ref["images"], lab), lab)), ref["recon_images"]) <= TOL


def _record(module: torch.nn.Module, calls: list, B: int):
    """Forward hook: the outputs of each call, split into (cond, null) when CFG batched both branches."""
    def hook(_m, _inp, out):
        calls.append(out.chunk(2) if len(out) == 2 * B else (out, None))
    return module.register_forward_hook(hook)


@torch.no_grad()
def test_generation_every_step_given_the_recorded_noise(models, ref):
    m, gen = models["model"], facts().get("gen", {})
    e0 = ref["gen_noise_init"]
    B, steps, cfg = len(e0), int(ref["gen_steps"]), float(ref["gen_cfg"])
    dec_calls, enc_calls, trace = [], [], []
    hooks = [_record(m.decoder, dec_calls, B), _record(m.encoder, enc_calls, B)]
    draws = iter([e0, ref["gen_noise_refine"]])
    try:
        out = m.generate(labels_of(m, ref, "gen_labels"), steps=steps, cfg=cfg, n=B,
                         cfg_position=gen.get("cfg_position", "combo"), noise=draws.__next__, trace=trace)
    finally:
        for h in hooks:
            h.remove()
    assert len(dec_calls) == steps and len(enc_calls) == steps - 1
    for name, calls in (("gen_dec", dec_calls), ("gen_enc", enc_calls)):
        for k, (cond, null) in enumerate(calls):
            tol = TOL if k == 0 else IMG_TOL
            assert maxdiff(cond, ref[name][k]) <= tol, f"{name} step {k + 1}"
            if null is not None and f"{name}_null" in ref:
                assert maxdiff(null, ref[f"{name}_null"][k]) <= tol, f"{name}_null step {k + 1}"
    assert maxdiff(to01(trace[0]), ref["gen_images_1step"]) <= TOL
    assert maxdiff(to01(out), ref["gen_images"]) <= IMG_TOL


@torch.no_grad()
def test_fig6_noise_interpolation_frames(models, ref):
    m = models["model"]
    t = ref["lerp_t"]
    weights = torch.stack([1 - t, t], dim=1)
    ends = torch.stack([ref["lerp_noise_a"], ref["lerp_noise_b"]], dim=1)
    classes = None
    if m.config.num_classes and "lerp_labels_a" in ref:
        classes = torch.stack([ref["lerp_labels_a"], ref["lerp_labels_b"]], dim=1)
    lerp = facts().get("lerp", {})
    steps = facts().get("gen", {}).get("steps", int(ref["gen_steps"]))
    frames = noise_interpolate(m, ends, classes, weights, ref["lerp_refine_noise"], lerp.get("mode", "lerp"),
                               steps=steps, cfg=float(ref["gen_cfg"]), cfg_position="combo")
    assert maxdiff(to01(frames[0]), ref["lerp_images_1step"]) <= TOL
    assert maxdiff(to01(frames[-1]), ref["lerp_images"]) <= IMG_TOL


def test_cli_converts_the_experiment_folder_end_to_end(ref, tmp_path, capsys):
    out = tmp_path / "conv"
    sizes = [a for s in size_args() for a in ("--size", s)]
    assert cli_main(["convert", "sphere-encoder", str(FIXTURE), *sizes, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model = load_model(out, expect="sphere_encoder").eval()
    with torch.no_grad():
        x = model.decode(ref["decode_in"], labels_of(model, ref, "labels"))
    assert maxdiff(x, ref["decode_out"]) <= TOL
    # an existing output is refused without --overwrite; the .pth with --weights ema gives the EMA decoder
    assert cli_main(["convert", "sphere-encoder", str(ckpt_file()), *sizes, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and len(err.splitlines()) == 1
    assert cli_main(["convert", "sphere-encoder", str(ckpt_file()), "--config", str(FIXTURE / "cfg.json"), *sizes,
                     "--weights", "ema", "--out", str(out), "--overwrite"]) == 0
    with torch.no_grad():
        x = load_model(out, expect="sphere_encoder").eval().decode(ref["decode_in"], labels_of(model, ref, "labels"))
    assert maxdiff(x, ref["decode_out_ema"]) <= TOL
    n = 2 if model.config.num_classes else 1
    assert cli_main(["sample", "--ckpt", str(out), "--n", str(n), "--steps", "2", "--out", str(tmp_path / "s.png"),
                     "--quiet"]) == 0


def test_convert_for_cache_reads_cfg_beside_the_ckpt_folder(ref, tmp_path, monkeypatch):
    monkeypatch.setenv(SIZES_ENV, ";".join(size_args()))
    pth = ckpt_file()

    def sibling(rel: str):
        p = (pth.parent / rel).resolve()
        return p if p.is_file() else None

    target = convert_for_cache(pth, tmp_path, sibling)
    model = load_model(target, expect="sphere_encoder").eval()
    with torch.no_grad():
        assert maxdiff(model.decode(ref["decode_in"], labels_of(model, ref, "labels")), ref["decode_out"]) <= TOL
    with pytest.raises(UserError, match="cfg.json"):
        convert_for_cache(pth, tmp_path / "b", lambda rel: None)


def _tampered(tmp_path: Path, edit) -> Path:
    """A copy of the experiment folder whose checkpoint's `model` state went through edit(state)."""
    folder = tmp_path / "exp"
    (folder / "ckpt").mkdir(parents=True)
    shutil.copy(FIXTURE / "cfg.json", folder / "cfg.json")
    ckpt = torch.load(ckpt_file(), map_location="cpu", weights_only=True)
    edit(ckpt["model"])
    torch.save(ckpt, folder / "ckpt" / "ep0001.pth")
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("decoder.blocks.0.attn.qkv.bias"), "lacks decoder.blocks.0.attn.qkv.bias"),
    (lambda sd: sd.__setitem__("encoder.extra.weight", torch.zeros(2)), "unexpected key encoder.extra.weight"),
])
def test_a_missing_or_unexpected_key_is_one_line(tmp_path, capsys, edit, message):
    need_fixture()
    folder = _tampered(tmp_path, edit)
    sizes = [a for s in size_args() for a in ("--size", s)]
    assert cli_main(["convert", "sphere-encoder", str(folder), *sizes, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unknown_size_and_wrong_head_count_are_user_errors():
    from spheregen.interop.safe_load import safe_load
    from spheregen.interop.sphere_encoder import size_table

    need_fixture()
    name = json.loads((FIXTURE / "cfg.json").read_text())["vit_enc_model_size"]
    if name in facts().get("size_dict", {}):  # a fixture-only size: refused without --size
        with pytest.raises(UserError, match="--size"):
            convert_file(ckpt_file(), FIXTURE / "cfg.json", "model")
    ema = safe_load(ckpt_file(), allow=()).get("ema_model", {})
    if not any(k.endswith(".rope") for k in ema):
        pytest.skip("the checkpoint's EMA state holds no rope buffers to check the head count against")
    width, layers, heads = size_table(size_args())[name]
    wrong = heads * 2 if (width // (heads * 2)) % 4 == 0 and width % (heads * 2) == 0 else heads // 2
    with pytest.raises(UserError, match="RoPE table"):  # the EMA state's rope buffer fixes the head dim
        convert_file(ckpt_file(), FIXTURE / "cfg.json", "ema", size_args() + [f"{name}={width},{layers},{wrong}"])


# -- without the fixture: our model written in the authors' layout converts back exactly ---------------------------
PREFIXES = [("encoder.out.", "encoder.ffn."), ("decoder.out.", "decoder.ffn."), ("encoder.mixer.", "encoder.out."),
            ("encoder.patch.", "encoder.x_embedder.0."), ("encoder.proj.", "encoder.x_embedder.1."),
            ("decoder.inp.", "decoder.x_embedder.0."), ("decoder.mixer.", "decoder.x_embedder.1."),
            ("decoder.refine.", "decoder.out.2."), ("decoder.conv.", "decoder.out.1."),
            ("decoder.up.", "decoder.out.3.")]
INFIXES = [("labels.table.", "y_embedder.embedding_table."), ("adaln.", "adaLN_modulation."),
           ("token_mlp.", "tok_mixer.mix."), ("channel_mlp.", "chn_mixer.mix."), ("mlp.w13.", "mlp.w12."),
           ("mlp.w2.", "mlp.w3.")]


def authors_layout(model) -> dict[str, torch.Tensor]:
    """Our state dict as the authors' code would store it (the converter's layout facts, inverted)."""
    from spheregen.interop.sphere_encoder import rope_perm, unpatchify_perm
    from spheregen.models.sphere_encoder_nets import pos_table

    c = model.config
    hd = c.width // c.heads
    out = {}
    for key, v in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        v = v.clone()
        if ".attn.qkv." in key:
            q, k, val = v.chunk(3)
            q, k = (t.reshape(c.heads, hd, *t.shape[1:])[:, rope_perm(hd)].reshape(t.shape) for t in (q, k))
            v = torch.cat([q, k, val])
        if key.startswith("decoder.out.linear.") and c.head == "linear":
            v = v[torch.argsort(unpatchify_perm(c.patch_size, c.channels))]
        v = v.reshape(1) if key.endswith(("alpha1", "alpha2")) else v
        v = v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
        prefix = next(((o, t) for o, t in PREFIXES if key.startswith(o)), None)
        key = prefix[1] + key[len(prefix[0]):] if prefix else key
        for ours, theirs in INFIXES:
            key = key.replace(ours, theirs)
        out[key] = v
    for net in ("encoder", "decoder"):
        out[f"{net}.pos_embed"] = pos_table(c)[None]
    return out


@pytest.mark.parametrize("kw", [
    dict(head="conv", patch_size=2, heads=2, latent_dim=4, num_classes=5, mixer_depth=1, dec_mixer_depth=2),
    dict(head="linear", patch_size=8, heads=1, latent_dim=16, num_classes=0, mixer_depth=2, dec_mixer_depth=1),
])
def test_round_trip_through_the_authors_layout(tmp_path, kw):
    from spheregen.models.sphere_encoder import SphereEncoder
    from spheregen.models.sphere_encoder_nets import SphereEncoderConfig

    torch.manual_seed(0)
    cfg = SphereEncoderConfig(image_size=16, channels=3, width=32, depth=2, attn_proj_bias=True, uncond_head_norm=False,
                              head_residual=False, conv_head_authors=True, pos_order="col_row", **kw)
    model = SphereEncoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": authors_layout(model), "epoch": 0}, tmp_path / "ckpt" / "ep0000.pth")
    authors_cfg = {"image_size": 16, "patch_size": cfg.patch_size, "token_channels": cfg.latent_dim,
                   "vit_enc_model_size": "t", "vit_dec_model_size": "t", "noise_sigma_max_angle": 80,
                   "vit_enc_latent_mlp_mixer_depth": cfg.mixer_depth,
                   "vit_dec_latent_mlp_mixer_depth": cfg.dec_mixer_depth, "pixel_head_type": cfg.head,
                   "cond_generator": cfg.num_classes > 0, "num_classes": cfg.num_classes or 10}
    (tmp_path / "cfg.json").write_text(json.dumps(authors_cfg))
    again = convert_file(tmp_path / "ckpt" / "ep0000.pth", tmp_path / "cfg.json", "model", [f"t=32,2,{cfg.heads}"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = torch.tensor([0, 1]) if cfg.num_classes else None
    with torch.no_grad():
        assert torch.allclose(again.encode(x, y), model.encode(x, y), atol=1e-6)
        assert torch.equal(again.generate(y, steps=2, cfg=1.5, seeds=[0, 1], n=2),
                           model.generate(y, steps=2, cfg=1.5, seeds=[0, 1], n=2))
