"""Distilling a MeanFlow head from a trained Euclidean head (`spheregen train distill`): the student starts as
the teacher's one-step Euler sampler, only the head trains, the teacher's velocity is the target, and the run
is an ordinary AR checkpoint."""

import pytest
import torch

from spheregen.cli import main
from spheregen.engine.distill_setup import make_student
from spheregen.errors import UserError
from spheregen.models import load_model
from spheregen.models.ar import ARConfig, SphereAR
from spheregen.models.meanflow_distill import DistillConfig, MeanFlowDistiller
from spheregen.models.meanflow_head import MeanFlowHead

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


def _pair(seed=0, **distill):
    """A random-weight Euclidean teacher and its MeanFlow student (teacher weights, distiller attached)."""
    torch.manual_seed(seed)
    cfg = ARConfig(token_dim=4, grid=(2, 2), radius=2.0, num_classes=3, dim=32, n_layers=1, n_heads=2,
                   mlp_multiple_of=8, n_cls_tokens=2, head_depth=2, head_width=16, head_adaln=1)
    teacher = SphereAR(cfg)
    with torch.no_grad():
        for p in teacher.head.parameters():
            p.normal_(0, 0.1)
    return teacher, make_student(teacher, DistillConfig(**distill))


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
    perturbed teacher gives a positive one; the from-scratch target x1 - eps is another."""
    teacher, student = _pair(average_share=0.0, weight_power=0.0)  # r = t on every row, plain squared error
    x1, h = torch.randn(16, 4), torch.randn(16, 32)
    assert student.head.loss(x1, h, batch_mul=2).item() < 1e-8
    with torch.no_grad():
        teacher.head.final_proj.bias.add_(0.5)
    assert student.head.loss(x1, h, batch_mul=2).item() > 0.5  # ||0.5 * 1||^2 = 1 per row
    with torch.no_grad():
        teacher.head.final_proj.bias.sub_(0.5)
    object.__setattr__(student.head, "distiller", None)
    assert student.head.loss(x1, h, batch_mul=2).item() > 0.1  # from scratch: x1 - eps is not v_T


def test_distill_rejects_a_non_euclidean_teacher_and_a_model_table(teacher, tmp_path):
    run, lat = teacher
    assert main(["train", "ar", "--config", "mnist_tiny", "--set", "model.flow=meanflow", "--latents", str(lat),
                 "--out", str(tmp_path / "mf"), "--steps", "2", "--device", "cpu", *_sets(SMALL)]) == 0
    assert _distill((tmp_path / "mf", lat), tmp_path / "s1", "--steps", "1") == 2
    assert _distill(teacher, tmp_path / "s2", "--steps", "1", "--set", "model.dim=64") == 2
    assert not (tmp_path / "s1" / "checkpoints").exists() and not (tmp_path / "s2" / "checkpoints").exists()


def test_distill_needs_a_teacher(teacher, tmp_path, capsys):
    assert main(["train", "distill", "--config", "meanflow_tiny", "--latents", str(teacher[1]), "--out",
                 str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert "--teacher" in capsys.readouterr().err



def _euler_average(velocity, x, t, r, k):
    """(x_r - x) / (r - t) by k Euler steps of `velocity(x, t)` on one row, or the velocity where r = t."""
    if r == t:
        return velocity(x, t)
    dt, y = (r - t) / k, x.clone()
    for i in range(k):
        y = y + dt * velocity(y, t + i * dt)
    return (y - x) / (r - t)


@pytest.mark.parametrize("guidance", ["combined", "folded"])
def test_trajectory_target_is_the_teachers_euler_solution_from_t_to_r(guidance):
    """target = (x_r - x_t) / (r - t), x_r from K Euler steps of the teacher (guided when folded: v_null +
    w (v_cond - v_null)) row by row, and the velocity itself where r = t."""
    teacher, student = _pair(1, target="trajectory", teacher_steps=3, guidance=guidance)
    distiller = student.head.distiller
    x, h, hn = torch.randn(4, 4), torch.randn(4, 32), torch.randn(4, 32)
    t, r = torch.tensor([0.0, 0.2, 0.5, 0.3]), torch.tensor([1.0, 0.6, 0.5, 0.9])
    w = torch.tensor([1.0, 2.5, 3.0, 4.0]) if guidance == "folded" else None
    with torch.no_grad():
        want = []
        for i in range(4):
            def vel(y, s, i=i):
                s = torch.full((1,), float(s))
                vc = teacher.head(y, s, h[i:i + 1])
                if w is None:
                    return vc
                vn = teacher.head(y, s, hn[i:i + 1])
                return vn + w[i] * (vc - vn)
            want.append(_euler_average(vel, x[i:i + 1], float(t[i]), float(r[i]), 3))
        v = distiller.velocity(x, t, h, hn if w is not None else None, w)
        got = distiller.trajectory_target(x, t, r, h, hn if w is not None else None, w, v)
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)


def test_folded_student_takes_the_scale_and_samples_from_conditional_rows_only():
    teacher, student = _pair(2, guidance="folded")
    x, t, h = torch.randn(3, 4), torch.rand(3) * 0.5, torch.randn(3, 32)
    with torch.no_grad():  # the guidance embedding starts at zero: every scale gives the teacher's velocity
        torch.testing.assert_close(student.head(x, t, h, r=t + 0.2, w=torch.full((3,), 3.0)), teacher.head(x, t, h))
        student.head.guidance_embed[-1].weight.normal_(0, 0.5)
        a = student.head(x, t, h, r=t, w=torch.full((3,), 1.0))
        b = student.head(x, t, h, r=t, w=torch.full((3,), 3.0))
    assert (a - b).abs().max() > 1e-3  # the scale is an input
    rows = []
    student._run = (lambda run: lambda x, *a, **k: rows.append(x.shape[0]) or run(x, *a, **k))(student._run)
    with torch.no_grad():
        z = student.eval().generate([0, 2], [1, 2], sampler="euler", steps=1, cfg=3.0)
        z1 = student.generate([2], [2], sampler="euler", steps=1, cfg=3.0)
    assert set(rows) == {2, 1}  # B rows, no null rows
    assert torch.allclose(z.norm(dim=-1), torch.full((2, 4), 2.0), atol=1e-5)
    torch.testing.assert_close(z[1:], z1)  # still per seed


def test_folded_guidance_loss_gets_the_null_conditions_from_the_model():
    teacher, student = _pair(3, guidance="folded")
    z = torch.nn.functional.normalize(torch.randn(3, 4, 4), dim=-1) * 2.0
    loss, _ = student.train().training_loss((z, torch.tensor([0, 1, 2])), 0)
    loss.backward()
    assert torch.isfinite(loss) and student.head.guidance_embed[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in student.named_parameters() if not n.startswith("head."))


def test_distill_config_checks_its_fields():
    for bad in ({"target": "reflow"}, {"teacher_steps": 0}, {"guidance": "both"}, {"cfg_max": 0.5},
                {"time_sampler": "beta"}):
        with pytest.raises(UserError):
            DistillConfig(**bad)
    with pytest.raises(UserError):  # folded guidance needs a head that takes the scale
        MeanFlowDistiller(MeanFlowHead(4, 8, 16, 2, 1), MeanFlowHead(4, 8, 16, 2, 1), DistillConfig(guidance="folded"))
    with pytest.raises(UserError):
        SphereAR(ARConfig(token_dim=4, grid=(2, 2), radius=2.0, num_classes=3, dim=32, n_layers=1, n_heads=2,
                          n_cls_tokens=2, head_depth=2, head_width=16, head_adaln=1, head_guidance=True))


@pytest.mark.parametrize("guidance", ["combined", "folded"])
def test_grid_target_reads_every_few_step_interval_off_one_teacher_trajectory(guidance):
    """K = 2 Euler steps of the teacher from x0, grid steps (1, 2): the pairs (0, 1), (0, 1/2), (1/2, 1) with
    average velocities from the trajectory and (0, 0), (1/2, 1/2) with the teacher's velocity there."""
    teacher, student = _pair(4, target="grid", teacher_steps=2, grid_steps=(1, 2), guidance=guidance,
                             weight_power=0.0)
    distiller = student.head.distiller
    x0, h, hn = torch.randn(3, 4), torch.randn(3, 32), torch.randn(3, 32)
    folded = guidance == "folded"
    torch.manual_seed(7)
    w = 1 + 3.0 * torch.rand(3) if folded else None
    with torch.no_grad():
        def vel(x, t):
            t = torch.full((3,), t)
            vc = teacher.head(x, t, h)
            return vc if w is None else teacher.head(x, t, hn) + w[:, None] * (vc - teacher.head(x, t, hn))
        v0 = vel(x0, 0.0)
        x1 = x0 + v0 / 2
        v1 = vel(x1, 0.5)
        x2 = x1 + v1 / 2
        rows = [(x0, 0.0, 1.0, x2 - x0), (x0, 0.0, 0.5, v0), (x1, 0.5, 1.0, v1), (x0, 0.0, 0.0, v0), (x1, 0.5, 0.5, v1)]
        ww = None if w is None else w
        want = torch.stack([(student.head(x, torch.full((3,), a), h, r=torch.full((3,), b), w=ww) - tgt).pow(2).sum(-1)
                            for x, a, b, tgt in rows]).mean()
        torch.manual_seed(7)
        got = distiller.grid_loss(h, hn if folded else None, x0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError):
        DistillConfig(target="grid", teacher_steps=6, grid_steps=(1, 4))
