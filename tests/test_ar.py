"""SphereAR: KV cache = full recomputation, tokens on the sphere, causality, CFG 1 = unguided, per-sample
seeds, training on a fake latent source, paper parameter counts, and the `spheregen sample` command.

No trained tokenizer is needed: FakeLatents stands in for the latent cache and FakeDecoder for the tokenizer.
"""

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spheregen import cli, generation
from spheregen.config import from_dict, load_toml
from spheregen.engine import ar_setup
from spheregen.engine.ar_setup import training_setup
from spheregen.engine.trainer import TrainConfig, Trainer
from spheregen.errors import UserError
from spheregen.models import load_model
from spheregen.models.ar import ARConfig, SphereAR, count_parameters
from spheregen.sphere import project

ROOT = Path(__file__).resolve().parents[1]
R = 2.0


class FakeLatents:
    """The LatentCache interface: token k of class c is the unit direction m[c, k] plus a little noise,
    scaled to radius R (a fresh draw every call)."""

    def __init__(self, n=600, num_classes=3, grid=(2, 3), dim=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.means = project(torch.randn(num_classes, grid[0] * grid[1], dim, generator=g), 1.0)
        self.labels = torch.arange(n) % num_classes
        self.radius, self.grid, self.latent_dim, self.num_classes = R, grid, dim, num_classes
        self.posterior, self.tokenizer_path = "spherical", ""

    def __len__(self):
        return len(self.labels)

    def get_batch(self, indices, flip_mask=None):
        y = self.labels[torch.as_tensor(indices)]
        z = project(self.means[y] + 0.1 * torch.randn(len(y), *self.means.shape[1:]), R)
        return z, y


class FakeDecoder(torch.nn.Module):
    """decode(z [B, T, d]) -> [B, 1, 8, 8] in [-1, 1]."""

    def __init__(self, tokens=6, dim=4):
        super().__init__()
        self.lin = torch.nn.Linear(tokens * dim, 64)

    def decode(self, z, project=None):
        return torch.tanh(self.lin(z.flatten(1))).view(-1, 1, 8, 8)


def tiny_config(**kw) -> ARConfig:
    base = dict(token_dim=4, grid=(2, 3), radius=R, num_classes=3, dim=32, n_layers=2, n_heads=2,
                mlp_multiple_of=8, n_cls_tokens=4, head_depth=2, head_width=32, head_adaln=1)
    return ARConfig(**{**base, **kw})


def random_model(seed=0, **kw) -> SphereAR:
    """A tiny model with every weight random (the zero-initialised head layers too), so outputs vary."""
    torch.manual_seed(seed)
    model = SphereAR(tiny_config(**kw)).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.3)
        model.cls_embedding.weight.normal_(0, 1.0)
    return model


LABELS, SEEDS = [0, 1, 2, 1], [11, 5, 23, 8]


@pytest.mark.parametrize("sampler", ["euler", "euler_maruyama", "heun"])
def test_kv_cache_matches_full_recomputation(sampler):
    model = random_model()
    a = model.generate(LABELS, SEEDS, sampler=sampler, steps=4, cfg=3.0, use_cache=True)
    b = model.generate(LABELS, SEEDS, sampler=sampler, steps=4, cfg=3.0, use_cache=False)
    assert a.shape == (4, 6, 4)
    assert (a - b).abs().max() <= 1e-4
    assert (a[0] - a[2]).abs().max() > 1e-2  # different classes and seeds really differ


def test_tokens_lie_on_the_sphere_and_projection_switches_off():
    model = random_model()
    z = model.generate(LABELS, SEEDS, sampler="euler", steps=4, cfg=4.0)
    assert torch.allclose(z.norm(dim=-1), torch.full(z.shape[:2], R), atol=1e-5)
    raw = random_model(project_outputs=False).generate(LABELS, SEEDS, sampler="euler", steps=4, cfg=4.0)
    assert (raw.norm(dim=-1) - R).abs().max() > 1e-2


def test_input_projection_switch():
    z = torch.randn(2, 6, 4) * 3  # off the sphere, as a Gaussian tokenizer would give
    y = torch.tensor([0, 1])
    on, off = random_model(), random_model(project_inputs=False)
    # with proj_in's bias at its zero init, emb_norm alone makes the inputs scale-invariant
    for m in (on, off):
        torch.nn.init.normal_(m.proj_in.bias)
    assert torch.allclose(on.hidden_states(z, y), on.hidden_states(project(z, R), y), atol=1e-6)
    assert (off.hidden_states(z, y) - off.hidden_states(project(z, R), y)).abs().max() > 1e-3


def test_causal_mask_holds():
    model = random_model()
    z = project(torch.randn(2, 6, 4), R)
    y = torch.tensor([0, 2])
    for k in range(5):  # the last token is never an input
        z2 = z.clone()
        z2[:, k] = project(torch.randn(2, 4), R)
        h, h2 = model.hidden_states(z, y), model.hidden_states(z2, y)
        # output j predicts token j from tokens < j: changing token k moves outputs k+1.. only
        assert torch.equal(h[:, :k + 1], h2[:, :k + 1])
        assert (h[:, k + 1:] - h2[:, k + 1:]).abs().max() > 1e-4


def test_cfg_one_equals_unguided_sampling():
    model = random_model()
    for sampler in ("euler", "euler_maruyama"):
        guided = model.generate(LABELS, SEEDS, sampler=sampler, steps=4, cfg=1.0)
        plain = model.generate(LABELS, SEEDS, sampler=sampler, steps=4, cfg=None)
        strong = model.generate(LABELS, SEEDS, sampler=sampler, steps=4, cfg=4.0)
        assert (guided - plain).abs().max() <= 1e-4
        assert (strong - plain).abs().max() > 1e-2
    lin = model.generate(LABELS, SEEDS, sampler="euler", steps=4, cfg=4.0, cfg_schedule="linear")
    const = model.generate(LABELS, SEEDS, sampler="euler", steps=4, cfg=4.0, cfg_schedule="constant")
    assert torch.allclose(lin[:, 0], plain_first := model.generate(LABELS, SEEDS, "euler", 4)[:, 0], atol=1e-4)
    assert (const[:, 0] - plain_first).abs().max() > 1e-2  # linear: scale 1 at token 0, constant: full scale


def test_sample_k_depends_only_on_its_seed():
    model = random_model()
    batch = model.generate(LABELS, SEEDS, sampler="euler_maruyama", steps=4, cfg=2.0)
    alone = model.generate([LABELS[2]], [SEEDS[2]], sampler="euler_maruyama", steps=4, cfg=2.0)
    assert (batch[2] - alone[0]).abs().max() <= 1e-4
    other = model.generate([LABELS[2]], [99], sampler="euler_maruyama", steps=4, cfg=2.0)
    assert (other[0] - alone[0]).abs().max() > 1e-2


def test_temperature_zero_removes_the_seed():
    model = random_model()
    z = model.generate([1, 1], [1, 2], sampler="euler_maruyama", steps=4, temperature=0.0)
    assert (z[0] - z[1]).abs().max() <= 1e-5
    z = model.generate([1, 1], [1, 2], sampler="euler_maruyama", steps=4, temperature=1.0)
    assert (z[0] - z[1]).abs().max() > 1e-2


def test_bad_class_id_is_a_user_error():
    with pytest.raises(UserError, match=r"0\.\.2"):
        random_model().generate([0, 3], [1, 2], steps=2)


def test_class_dropout_and_unconditional_mode():
    model = random_model(class_dropout=1.0).train()
    z = project(torch.randn(4, 6, 4), R)
    losses = []
    for labels in ([0, 1, 2, 0], [2, 2, 1, 1]):
        torch.manual_seed(5)
        losses.append(model.training_loss((z, torch.tensor(labels)), 0)[0])
    assert torch.equal(losses[0], losses[1])  # every label dropped to the null class
    model.config.class_dropout = 0.0
    for labels in ([0, 1, 2, 0], [2, 2, 1, 1]):
        torch.manual_seed(5)
        losses.append(model.training_loss((z, torch.tensor(labels)), 0)[0])
    assert not torch.equal(losses[2], losses[3])

    uncond = random_model(num_classes=0)
    assert uncond.cls_embedding.num_embeddings == 1
    a = uncond.generate([0, 0], [3, 4], steps=3, cfg=3.0)  # labels and cfg are ignored
    b = uncond.generate([2, 1], [3, 4], steps=3)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a.norm(dim=-1), torch.full((2, 6), R), atol=1e-5)
    loss, _ = uncond.train().training_loss((z, torch.tensor([0, 1, 2, 0])), 0)
    assert torch.isfinite(loss)


def test_param_groups_exclude_proj_in_and_class_embedding_from_decay():
    model = random_model()
    decay, no_decay = model.param_groups(0.05)
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.proj_in.weight) in ids and id(model.cls_embedding.weight) in ids
    assert id(model.pos_for_diff.weight) not in ids and id(model.head.input_proj.weight) not in ids
    assert id(model.blocks[0].attn.qkv.weight) not in ids and id(model.norm.weight) in ids
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("size,paper", [("B", 208e6), ("L", 479e6), ("H", 943e6)])
def test_paper_sizes_match_parameter_counts(size, paper):
    cfg = from_dict(ARConfig, load_toml(ROOT / f"configs/ar/sphereAR_{size}.toml")["model"])
    with torch.device("meta"):
        model = SphereAR(cfg)
    n = count_parameters(model)["total"]
    assert abs(n - paper) / paper < 0.03, n


def test_training_learns_class_conditional_tokens(tmp_path):
    data = FakeLatents()
    torch.manual_seed(0)
    model = SphereAR(tiny_config(dim=48, head_width=48, class_dropout=0.1))
    trainer = Trainer(model, data, TrainConfig(steps=250, batch_size=32, lr=3e-3, warmup_steps=20, ckpt_every=10**6,
                                               log_every=50), tmp_path, progress=False)
    first = model.training_loss(data.get_batch(torch.arange(64)), 0)[0].item()
    trainer.fit()
    model.eval()
    last = model.training_loss(data.get_batch(torch.arange(64)), 0)[0].item()
    assert last < 0.7 * first
    labels = torch.arange(3).repeat(8)
    z = model.generate(labels, list(range(24)), sampler="euler", steps=10, cfg=2.0)
    # each generated token is nearest to the mean direction of its own class
    sims = torch.einsum("btd,ctd->bct", z / R, data.means)  # [B, classes, T]
    assert (sims.argmax(1) == labels[:, None]).float().mean() > 0.9


def test_training_setup_reads_the_latents(monkeypatch):
    monkeypatch.setattr(ar_setup, "LatentCache", lambda path: FakeLatents())
    args = types.SimpleNamespace(tokenizer="some/tok", latents="cache", no_cache=False)
    model, data, eval_fn = training_setup({"model": {"dim": 32, "n_heads": 2, "n_layers": 1, "head_width": 32,
                                                     "head_depth": 2, "n_cls_tokens": 2}}, args)
    c = model.config
    assert (c.token_dim, c.grid, c.radius, c.num_classes) == (4, (2, 3), R, 3) and c.tokenizer.endswith("some/tok")
    assert isinstance(data, FakeLatents) and callable(eval_fn)
    with pytest.raises(UserError, match="grid"):
        training_setup({"model": {"grid": [4, 4], "dim": 32, "n_heads": 2}}, args)
    with pytest.raises(UserError, match="--latents"):
        training_setup({}, types.SimpleNamespace(tokenizer=None, latents=None, no_cache=False))


def test_save_load_roundtrip(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path / "ar")
    loaded = load_model(tmp_path / "ar").eval()
    assert isinstance(loaded, SphereAR)
    a = model.generate(LABELS, SEEDS, steps=3, cfg=2.0)
    assert torch.equal(a, loaded.generate(LABELS, SEEDS, steps=3, cfg=2.0))


def test_sample_command_writes_grid_pngs_and_npz(tmp_path, monkeypatch, capsys):
    model = random_model(tokenizer=str(tmp_path))
    model.save_pretrained(tmp_path / "ar")
    torch.manual_seed(1)
    decoder = FakeDecoder()
    monkeypatch.setattr(generation, "load_tokenizer", lambda path, device="cpu": decoder)
    base = ["sample", "--ckpt", str(tmp_path / "ar"), "--classes", "0,2", "--n", "3", "--steps", "3",
            "--cfg", "2", "--quiet"]
    rc = cli.main(base + ["--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "pngs"),
                          "--npz", str(tmp_path / "s.npz"), "--batch-size", "4"])
    assert rc == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.mode == "L" and grid.size == (3 * 10 + 2, 2 * 10 + 2)  # 3 columns x 2 class rows of 8 px + 2 px
    npz = np.load(tmp_path / "s.npz")
    assert npz["arr_0"].shape == (6, 8, 8, 1) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 0, 0, 2, 2, 2]
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir())[3] == "000003_class2.png"
    # the batch size does not change the images
    assert cli.main(base + ["--npz", str(tmp_path / "t.npz"), "--batch-size", "1"]) == 0
    diff = np.abs(np.load(tmp_path / "t.npz")["arr_0"].astype(int) - npz["arr_0"].astype(int))
    assert diff.max() <= 1 and npz["arr_0"].std() > 1
    # a bad class id is one line and exit code 2
    capsys.readouterr()
    assert cli.main(base + ["--classes", "0,7", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "0..2" in err and "Traceback" not in err
    assert json.loads((tmp_path / "ar" / "config.json").read_text())["model_type"] == "ar"


@pytest.mark.slow
def test_trained_mnist_model_draws_the_requested_digits():
    """End to end on the tiny MNIST run (runs/ar-mnist_tiny, trained with configs/ar/mnist_tiny.toml): the
    classifier trained on real MNIST recognises the requested class in most guided samples."""
    from spheregen.eval.classifier import class_accuracy, get_classifier

    run, data = ROOT / "runs/ar-mnist_tiny", ROOT / "data/mnist28"
    if not any(run.glob("checkpoints/step_*")) or not (data / "images.npy").is_file():
        pytest.skip("train the tiny MNIST tokenizer and AR model first (configs/ar/mnist_tiny.toml)")
    model = generation.load_generator(str(run))
    classifier, _, _ = get_classifier(data)
    labels = [c for c in range(10) for _ in range(30)]
    opts = {"cfg": 6.0, "cfg_schedule": "constant", "sampler": "euler_maruyama", "steps": 50}
    images = generation.sample_images(model, labels, 1000, 100, opts, progress=False)
    assert images.shape[1:] == (1, 28, 28)
    assert class_accuracy(images, torch.tensor(labels), classifier) >= 0.85
