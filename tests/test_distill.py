"""Distilling a MeanFlow head from a trained Euclidean head (`spheregen train distill`): the student starts as
the teacher's one-step Euler sampler, only the head trains, the teacher's velocity is the target, and the run
is an ordinary AR checkpoint."""

import pytest
import torch

from spheregen.cli import main
from spheregen.errors import UserError
from spheregen.models import load_model
from spheregen.models.ar import ARConfig, SphereAR
from spheregen.models.meanflow_head import DistillConfig, MeanFlowHead

SMALL = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_cls_tokens=2", "model.head_depth=1",
         "model.head_width=32", "train.batch_size=4", "eval.per_class=1", "eval.steps=2"]


def _sets(values):
    return [a for s in values for a in ("--set", s)]


@pytest.fixture(scope="module")
def teacher(tiny, tmp_path_factory):
    """A 3-step Euclidean AR run on the tiny tokenizer's latents: (run dir, latent cache)."""
    root = tmp_path_factory.mktemp("distill")
    assert main(["encode", "--tokenizer", str(tiny / "tok"), "--data", str(tiny / "d28"), "--out",
                 str(root / "lat"), "--device", "cpu"]) == 0
    assert main(["train", "ar", "--config", "mnist_tiny", "--latents", str(root / "lat"), "--out",
                 str(root / "teacher"), "--steps", "3", "--device", "cpu", *_sets(SMALL)]) == 0
    return root / "teacher", root / "lat"


def _distill(teacher, out, *extra):
    run, lat = teacher
    return main(["train", "distill", "--config", "meanflow_tiny", "--teacher", str(run), "--latents", str(lat),
                 "--out", str(out), "--device", "cpu", "--set", "train.batch_size=4", "--set", "eval.per_class=1",
                 *extra])


def test_distilled_run_is_an_ar_checkpoint_with_the_teachers_frozen_transformer(teacher, tmp_path):
    assert _distill(teacher, tmp_path / "student", "--steps", "3") == 0
    t_ckpt = sorted((teacher[0] / "checkpoints").glob("step_*"))[-1]
    s_ckpt = sorted((tmp_path / "student" / "checkpoints").glob("step_*"))[-1]
    t, s = load_model(t_ckpt), load_model(s_ckpt)
    assert isinstance(s.head, MeanFlowHead) and s.config.flow == "meanflow"
    ts, ss = t.state_dict(), s.state_dict()
    frozen = [k for k in ts if not k.startswith("head.")]
    assert frozen and all(torch.equal(ts[k], ss[k]) for k in frozen)  # the transformer did not move
    assert any(not torch.equal(ts[k], ss[k]) for k in ts if k.startswith("head."))  # the head did
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(s_ckpt), "--n", "1", "--classes", "0,1", "--cfg", "2", "--steps", "1",
                 "--sampler", "euler", "--out", str(out), "--device", "cpu"]) == 0
    assert out.is_file()


def _pair(seed=0):
    torch.manual_seed(seed)
    cfg = ARConfig(token_dim=4, grid=(2, 2), radius=2.0, num_classes=3, dim=32, n_layers=1, n_heads=2,
                   mlp_multiple_of=8, n_cls_tokens=2, head_depth=2, head_width=16, head_adaln=1)
    teacher = SphereAR(cfg)
    with torch.no_grad():
        for p in teacher.head.parameters():
            p.normal_(0, 0.1)
    student = SphereAR(ARConfig(**{**cfg.__dict__, "flow": "meanflow"}))
    student.load_state_dict(teacher.state_dict(), strict=False)
    student.head.distill_from(teacher.head, DistillConfig())
    return teacher, student


def test_the_student_starts_as_the_teachers_instantaneous_velocity_for_every_interval():
    teacher, student = _pair()
    x, t, h = torch.randn(5, 4), torch.rand(5) * 0.5, torch.randn(5, 32)
    with torch.no_grad():
        v = teacher.head(x, t, h)
        for r in (t, t + 0.3, torch.ones_like(t)):
            torch.testing.assert_close(student.head(x, t, h, r=r), v)
        # so one student step is one Euler step of the teacher
        noise = torch.randn(3, 1, 4)
        hh = torch.randn(3, 32)
        torch.testing.assert_close(student.head.sample(hh, noise, None, "euler", 1),
                                   teacher.head.sample(hh, noise, None, "euler", 1))


def test_the_distillation_target_is_the_teachers_velocity():
    """At r = t every row's target is v_T(x_t, t): a student equal to its teacher has zero loss, and a
    perturbed teacher gives a positive one (the one-sample target x1 - eps would not be zero)."""
    teacher, student = _pair()
    student.head.average_share, student.head.weight_power = 0.0, 0.0  # r = t on every row, plain squared error
    x1, h = torch.randn(16, 4), torch.randn(16, 32)
    assert student.head.loss(x1, h, batch_mul=2).item() < 1e-8
    with torch.no_grad():
        teacher.head.final_proj.bias.add_(0.5)
    assert student.head.loss(x1, h, batch_mul=2).item() > 0.5  # ||0.5 * 1||^2 = 1 per row
    with torch.no_grad():
        teacher.head.final_proj.bias.sub_(0.5)
    plain = MeanFlowHead(4, 32, 16, 2, 1)
    plain.load_state_dict(student.head.state_dict())
    plain.weight_power = 0.0
    assert plain.loss(x1, h, batch_mul=2).item() > 0.1  # the from-scratch target x1 - eps is not v_T


def test_distill_rejects_a_non_euclidean_teacher_and_a_model_table(teacher, tmp_path):
    run, lat = teacher
    assert main(["train", "ar", "--config", "mnist_tiny", "--set", "model.flow=meanflow", "--latents", str(lat),
                 "--out", str(tmp_path / "mf"), "--steps", "2", "--device", "cpu", *_sets(SMALL)]) == 0
    assert _distill((tmp_path / "mf", lat), tmp_path / "s1", "--steps", "1") == 2
    assert _distill(teacher, tmp_path / "s2", "--steps", "1", "--set", "model.dim=64") == 2
    assert not (tmp_path / "s1" / "checkpoints").exists() and not (tmp_path / "s2" / "checkpoints").exists()
    with pytest.raises(UserError):
        DistillConfig(time_sampler="beta")


def test_distill_needs_a_teacher(teacher, tmp_path, capsys):
    assert main(["train", "distill", "--config", "meanflow_tiny", "--latents", str(teacher[1]), "--out",
                 str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert "--teacher" in capsys.readouterr().err



def test_trajectory_target_is_the_teachers_euler_solution_from_t_to_r():
    """target = (x_r - x_t) / (r - t) with x_r from K Euler steps of the teacher per row (checked row by row),
    v_T(x_t, t) where r = t; a student that outputs the target has zero loss."""
    teacher, student = _pair(1)
    student.head.distill = DistillConfig(target="trajectory", teacher_steps=3, weight_power=0.0)
    student.head.weight_power = 0.0
    x, h = torch.randn(4, 4), torch.randn(4, 32)
    t, r = torch.tensor([0.0, 0.2, 0.5, 0.3]), torch.tensor([1.0, 0.6, 0.5, 0.9])
    with torch.no_grad():
        want = []
        for i in range(4):
            xi, ti = x[i:i + 1], t[i:i + 1]
            if r[i] == t[i]:
                want.append(teacher.head(xi, ti, h[i:i + 1]))
                continue
            dt = (r[i] - t[i]) / 3
            y = xi.clone()
            for k in range(3):
                y = y + dt * teacher.head(y, ti + k * dt, h[i:i + 1])
            want.append((y - xi) / (r[i] - t[i]))
        want = torch.cat(want)
        v = teacher.head(x, t, h)
        got = student.head.trajectory_loss(x, t, r, h, v)
        ref = (student.head(x, t, h, r=r) - want).pow(2).sum(-1).mean()
    torch.testing.assert_close(got, ref)
    assert got > 1e-4  # the student (still u = v_T) is not yet the average velocity over [t, r]


def test_distill_config_checks_its_fields():
    with pytest.raises(UserError):
        DistillConfig(target="reflow")
    with pytest.raises(UserError):
        DistillConfig(teacher_steps=0)
