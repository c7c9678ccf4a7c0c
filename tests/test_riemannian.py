"""Riemannian flow matching on S^{d-1}(R): the geometry in sphere.py against closed forms, and the riemannian
flow head (path, loss, on-sphere solvers, guidance, SphereAR integration, CLI training)."""

import math

import pytest
import torch

from spheregen.errors import UserError
from spheregen.models.ar import ARConfig, SphereAR
from spheregen.models.riemannian_head import RiemannianFlowHead, solve
from spheregen.sphere import exp_map, geodesic, log_map, project, slerp, tangent, transport

SHAPES = [(1.0, 2), (4.0, 16), (30.0, 256)]  # (radius, ambient dim)


def _points(n, d, radius, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return project(torch.randn(n, d, generator=g, dtype=dtype), radius)


def _tangents(x, scale, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tangent(x, scale * torch.randn(x.shape, generator=g, dtype=x.dtype))


def _angle(x, y):
    """The angle between x and y from fp64 arccos (the closed form, away from 0 and pi)."""
    cos = (x.double() * y.double()).sum(-1) / (x.double().norm(dim=-1) * y.double().norm(dim=-1))
    return torch.arccos(cos.clamp(-1, 1))


# -- geometry ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("radius,d", SHAPES)
def test_tangent_projection(radius, d):
    x = _points(64, d, radius)
    v = torch.randn(64, d) * 3
    p = tangent(x, v)
    assert (p * x).sum(-1).abs().max() < 1e-4 * radius * 3
    assert torch.allclose(tangent(x, p), p, atol=1e-5)  # idempotent
    w = torch.randn(64, d)
    assert torch.allclose(tangent(x, 2 * v - w), 2 * p - tangent(x, w), atol=1e-4)  # linear
    assert torch.allclose(v - p, (v * x).sum(-1, keepdim=True) / radius ** 2 * x, atol=1e-4)  # removes the normal


def test_exp_map_closed_form_on_a_great_circle():
    """x = R e1, v = a e2: exp_x(v) = R (cos(a/R) e1 + sin(a/R) e2), also after a random rotation Q."""
    radius, d = 3.0, 8
    a = torch.tensor([0.0, 1e-9, 0.1, 1.0, 3.0, math.pi * radius - 1e-3, 2 * math.pi * radius])[:, None]
    e = torch.eye(d)
    x, v = radius * e[0].expand(len(a), d), a * e[1]
    exact = radius * (torch.cos(a / radius) * e[0] + torch.sin(a / radius) * e[1])
    assert torch.allclose(exp_map(x, v, radius), exact, atol=1e-5)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(exp_map(x @ q.T, v @ q.T, radius), exact @ q.T, atol=1e-5)  # equivariant


@pytest.mark.parametrize("radius,d", SHAPES)
def test_exp_and_log_are_inverse_and_preserve_norm_and_distance(radius, d):
    x = _points(256, d, radius)
    v = _tangents(x, radius / math.sqrt(d))  # |v| ~ R: angles up to ~2 rad
    y = exp_map(x, v, radius)
    assert (y.norm(dim=-1) - radius).abs().max() < 1e-5 * max(radius, 1)
    assert torch.allclose(_angle(x, y).float() * radius, v.norm(dim=-1), rtol=1e-4, atol=1e-4)  # |v| = distance
    assert torch.allclose(log_map(x, y, radius), v, atol=2e-4 * radius)
    z = _points(256, d, radius, seed=5)
    lg = log_map(x, z, radius)
    assert (lg * x).sum(-1).abs().max() < 1e-3 * radius  # tangent at x
    assert torch.allclose(lg.norm(dim=-1), radius * _angle(x, z).float(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(exp_map(x, lg, radius), z, atol=1e-5 * radius)


def test_log_map_preserves_the_angles_of_spherical_triangles():
    """The angle at x between log_x(y) and log_x(z) is the triangle's angle C from the spherical law of cosines:
    cos C = (cos c - cos a cos b) / (sin a sin b), a = d(x, y)/R, b = d(x, z)/R, c = d(y, z)/R."""
    radius = 2.5
    x, y, z = (_points(500, 5, radius, seed=s) for s in (0, 1, 2))
    u, w = log_map(x, y, radius).double(), log_map(x, z, radius).double()
    cos_at_x = (u * w).sum(-1) / (u.norm(dim=-1) * w.norm(dim=-1))
    a, b, c = _angle(x, y), _angle(x, z), _angle(y, z)
    law = (torch.cos(c) - torch.cos(a) * torch.cos(b)) / (torch.sin(a) * torch.sin(b))
    assert (cos_at_x - law).abs().max() < 1e-4


def test_log_map_near_identical_and_antipodal_points():
    radius, d = 4.0, 16
    x = _points(32, d, radius)
    assert log_map(x, x, radius).abs().max() < 1e-5
    for eps in (1e-3, 1e-5):
        v = eps * project(_tangents(x, 1.0), 1.0)
        lg = log_map(x, exp_map(x, v, radius), radius)
        assert torch.isfinite(lg).all() and (lg - v).norm(dim=-1).max() < 1e-5 + 1e-2 * eps
    lg = log_map(x, -x, radius)  # antipodal: no unique geodesic, one of length pi R is chosen
    assert torch.isfinite(lg).all() and (lg * x).sum(-1).abs().max() < 1e-4
    assert torch.allclose(lg.norm(dim=-1), torch.full((32,), math.pi * radius), rtol=1e-6)
    assert torch.allclose(exp_map(x, lg, radius), -x, atol=1e-5)
    mid = slerp(x, -x, 0.5, radius)
    assert torch.allclose(mid.norm(dim=-1), torch.full((32,), radius), atol=1e-5)
    assert torch.allclose(_angle(mid, x).float(), torch.full((32,), math.pi / 2), atol=1e-5)
    xt, vt = geodesic(x, x, torch.rand(32), radius)  # identical end points: a constant path
    assert torch.allclose(xt, x, atol=1e-6) and vt.abs().max() < 1e-5


@pytest.mark.parametrize("radius,d", SHAPES)
def test_slerp_and_geodesic_velocity_against_closed_forms(radius, d):
    x0, x1 = _points(128, d, radius, seed=3), _points(128, d, radius, seed=4)
    t = torch.rand(128, generator=torch.Generator().manual_seed(0))
    theta = _angle(x0, x1).float()[:, None]
    closed = (torch.sin((1 - t[:, None]) * theta) * x0 + torch.sin(t[:, None] * theta) * x1) / torch.sin(theta)
    xt, vt = geodesic(x0, x1, t, radius)
    assert torch.allclose(xt, closed, atol=2e-5 * radius)
    assert torch.allclose(slerp(x0, x1, 0.0, radius), x0, atol=1e-5 * radius)
    assert torch.allclose(slerp(x0, x1, 1.0, radius), x1, atol=2e-5 * radius)
    assert torch.allclose(vt.norm(dim=-1), radius * theta[:, 0], rtol=1e-4)  # constant speed R theta
    assert (vt * xt).sum(-1).abs().max() < 1e-3 * radius  # tangent at x_t
    # velocity = d x_t / dt by central differences in fp64
    x0d, x1d, td, h = x0.double(), x1.double(), t.double(), 1e-5
    fd = (geodesic(x0d, x1d, td + h, radius)[0] - geodesic(x0d, x1d, td - h, radius)[0]) / (2 * h)
    assert torch.allclose(fd.float(), vt, atol=1e-4 * radius)


def test_transport_is_an_isometry_carrying_the_geodesic_velocity():
    radius, d = 2.0, 10
    x, y = _points(64, d, radius, seed=6), _points(64, d, radius, seed=7)
    u, w = _tangents(x, 1.0, seed=8), _tangents(x, 1.0, seed=9)
    tu, tw = transport(x, y, u, radius), transport(x, y, w, radius)
    assert (tu * y).sum(-1).abs().max() < 1e-4  # lands in T_y
    assert torch.allclose((tu * tw).sum(-1), (u * w).sum(-1), atol=1e-4)  # inner products kept
    # the geodesic's own velocity is parallel: log_x(y) arrives as -log_y(x)
    assert torch.allclose(transport(x, y, log_map(x, y, radius), radius), -log_map(y, x, radius), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geometry_under_autocast(dtype):
    """bf16 autocast (CPU): the maps compute in fp32 and return the input dtype; fp32 inputs are unaffected."""
    radius = 4.0
    x, y = _points(64, 16, radius, seed=10), _points(64, 16, radius, seed=11)
    v = _tangents(x, 1.0)
    ref = [exp_map(x, v, radius), log_map(x, y, radius), slerp(x, y, 0.3, radius), tangent(x, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xs, ys, vs = x.to(dtype), y.to(dtype), v.to(dtype)
        out = [exp_map(xs, vs, radius), log_map(xs, ys, radius), slerp(xs, ys, 0.3, radius), tangent(xs, vs)]
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for o, r in zip(out, ref):
        assert o.dtype == dtype and torch.isfinite(o.float()).all()
        assert (o.float() - r).abs().max() < tol * radius
    assert (out[0].float().norm(dim=-1) - radius).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2) * radius


# -- the head -------------------------------------------------------------------------------------------
def _head(radius=4.0, d=16, cond=8, std=None, seed=0):
    torch.manual_seed(seed)
    head = RiemannianFlowHead(d, cond, width=32, depth=2, n_adaln=1, radius=radius)
    if std:
        for p in head.parameters():
            torch.nn.init.normal_(p, std=std)
    return head


def test_loss_at_init_is_the_mean_squared_geodesic_speed():
    """The head starts at 0, so the loss is E|u_t|^2 / d = R^2 E[theta^2] / d (theta: the angle between the
    uniform start and the target), whatever t is."""
    torch.manual_seed(0)
    radius, d = 4.0, 16
    head = _head(radius, d)
    x1 = _points(4000, d, radius, seed=12)
    loss = head.loss(x1, torch.randn(4000, 8), batch_mul=2)
    theta = _angle(_points(200_000, d, 1.0, seed=13), x1[:1].expand(200_000, d))
    expected = radius ** 2 * (theta ** 2).mean().item() / d
    assert abs(loss.item() - expected) < 0.03 * expected
    loss.backward()
    assert head.final_proj.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("scale", [None, 4.0])
@pytest.mark.parametrize("autocast", [False, True])
def test_every_solver_point_stays_on_the_sphere(sampler, scale, autocast):
    """Every point the network is evaluated at (each step's state, Heun's predictor) and the result lie on the
    radius-R sphere to 1e-5, with large random weights (big velocities) and strong guidance; also with the
    network under bf16 autocast (the solver stays in fp32)."""
    radius = 4.0
    head = _head(radius, std=0.5)
    seen = []
    head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    n = 6
    h = torch.randn(2 * n if scale else n, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        z = head.sample(h, torch.randn(n, 1, 16), scale, sampler, steps=7)
    assert z.dtype == torch.float32 and len(seen) == 7 * (2 if sampler == "heun" else 1)
    speeds = []
    for x in seen + [z]:
        assert (x.norm(dim=-1) - radius).abs().max() < 1e-5
    for a, b in zip(seen, seen[1:]):
        speeds.append((a[:n] - b[:n]).norm(dim=-1).max())
    assert max(speeds) > 0.1  # the points do move
    assert (project(z, radius) - z).abs().max() < 1e-6


def _rotation_field(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = a - a.T  # skew: A x is tangent at x, and x(t) = expm(int (1 + t) dt A) x0 solves dx/dt = (1 + t) A x
    return a, (lambda x, t: (1 + t) * x @ a.T.to(x.dtype))


def test_manifold_solvers_converge_with_their_order():
    radius, d = 2.0, 5
    a, field = _rotation_field(d)
    x0 = _points(16, d, radius, seed=14).double()
    exact = x0 @ torch.linalg.matrix_exp(1.5 * a).T  # int_0^1 (1 + t) dt = 1.5
    err = {s: [(solve(field, x0, radius, s, n) - exact).norm(dim=-1).max().item() for n in (8, 32)]
           for s in ("euler", "heun")}
    assert 3 < err["euler"][0] / err["euler"][1] < 5  # first order
    assert err["heun"][0] / err["heun"][1] > 12  # second order
    assert err["heun"][1] < err["euler"][1] / 10


def test_guidance_combines_tangent_velocities_then_steps_with_exp():
    radius, n = 4.0, 5
    head = _head(radius, std=0.3)
    h_c, h_u = torch.randn(n, 8), torch.randn(n, 8)
    noise = torch.randn(n, 1, 16)
    x0 = project(noise[:, 0], radius)
    t0 = torch.zeros(n)
    with torch.no_grad():
        v_c, v_u = tangent(x0, head(x0, t0, h_c)), tangent(x0, head(x0, t0, h_u))
        z = head.sample(torch.cat([h_c, h_u]), noise, 3.0, "euler", steps=1)
        alone = head.sample(h_c, noise, None, "euler", steps=1)
    assert torch.allclose(z, exp_map(x0, v_u + 3.0 * (v_c - v_u), radius), atol=1e-5)
    assert torch.allclose(alone, exp_map(x0, v_c, radius), atol=1e-5)
    assert (z - alone).abs().max() > 1e-3


def test_sampler_options():
    head = _head()
    h, noise = torch.randn(2, 8), torch.randn(2, 1, 16)
    with torch.no_grad():
        em = head.sample(h, noise, None, "euler_maruyama", 3)  # no SDE on the sphere: geodesic Euler
        assert torch.equal(em, head.sample(h, noise, None, "euler", 3))
        with pytest.raises(UserError, match="temperature"):
            head.sample(h, noise, None, "euler", 3, temperature=0.5)
        with pytest.raises(UserError, match="sampler"):
            head.sample(h, noise, None, "rk4", 3)
    assert head.noise_draws("euler_maruyama", 50) == 1


def test_trained_head_samples_its_conditional_targets():
    """Fit 3 condition-dependent clusters on S^2(2); both solvers land on the right one from uniform starts."""
    torch.manual_seed(0)
    radius = 2.0
    head = RiemannianFlowHead(3, 3, width=64, depth=2, n_adaln=1, radius=radius)
    centers = project(torch.tensor([[1.0, 0.0, 0.2], [-0.5, 0.9, 0.0], [-0.5, -0.9, -0.3]]), radius)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(300):
        c = torch.randint(0, 3, (256,))
        loss = head.loss(project(centers[c] + 0.05 * torch.randn(256, 3), radius), torch.eye(3)[c], batch_mul=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    c = torch.arange(3).repeat(20)
    with torch.no_grad():
        for sampler in ("euler", "heun"):
            x = head.sample(torch.eye(3)[c], torch.randn(len(c), 1, 3), None, sampler, 20)
            assert (torch.cdist(x, centers).argmin(1) == c).float().mean() > 0.95, sampler


# -- SphereAR with the riemannian head ------------------------------------------------------------------------
def _model(**kw):
    torch.manual_seed(0)
    model = SphereAR(ARConfig(token_dim=8, grid=(2, 2), radius=3.0, num_classes=4, dim=32, n_layers=1, n_heads=2,
                              n_cls_tokens=2, head_depth=1, head_width=32, head_adaln=1, flow="riemannian", **kw))
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def test_sphere_ar_projection_after_the_solve_is_an_identity():
    model = _model()
    assert isinstance(model.head, RiemannianFlowHead) and model.head.radius == 3.0
    h, noise = torch.randn(6, 32), torch.randn(3, 1, 8)
    with torch.no_grad():
        raw = model.head.sample(h, noise, 2.5, "heun", 5)
        z = model.solve_token(h, noise, 2.5, "heun", 5)
    assert (z - raw).abs().max() < 1e-6  # solve_token's projection changes nothing
    assert (raw.norm(dim=-1) - 3.0).abs().max() < 1e-5


def test_sphere_ar_generate_cache_seeds_and_loss():
    model = _model()
    with torch.no_grad():
        a = model.generate([0, 1, 2], [5, 6, 7], sampler="euler", steps=4, cfg=3.0)
        b = model.generate([0, 1, 2], [5, 6, 7], sampler="euler", steps=4, cfg=3.0, use_cache=False)
        c = model.generate([1], [6], sampler="euler", steps=4, cfg=3.0)
    assert torch.allclose(a, b, atol=1e-5)  # KV cache = full recompute
    assert torch.allclose(a[1:2], c, atol=1e-5)  # a sample depends on its own seed only
    assert (a.norm(dim=-1) - 3.0).abs().max() < 1e-5
    z = project(torch.randn(4, 4, 8), 3.0)
    loss, _ = model.train().training_loss((z, torch.tensor([0, 1, 2, 3])), 0)
    assert torch.isfinite(loss)


def test_cli_trains_and_samples_the_riemannian_head(tiny, tmp_path):
    from spheregen.cli import main
    from spheregen.models import load_model

    assert main(["encode", "--tokenizer", str(tiny / "tok"), "--data", str(tiny / "d28"), "--out",
                 str(tmp_path / "lat"), "--device", "cpu"]) == 0
    small = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_cls_tokens=2", "model.head_depth=1",
             "model.head_width=32", "train.batch_size=4", "eval.per_class=1", "eval.steps=2"]
    argv = ["train", "ar", "--config", "mnist_tiny", "--set", "model.flow=riemannian", "--latents",
            str(tmp_path / "lat"), "--out", str(tmp_path / "run"), "--steps", "3", "--device", "cpu"]
    assert main(argv + [a for s in small for a in ("--set", s)]) == 0
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    model = load_model(ckpt)
    assert isinstance(model.head, RiemannianFlowHead) and model.head.radius == model.config.radius
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(ckpt), "--n", "1", "--classes", "0,1", "--cfg", "2", "--steps", "3",
                 "--sampler", "heun", "--out", str(out), "--device", "cpu"]) == 0
    assert out.is_file()


# -- the ablation script (benchmarks/ablate_flow.py) ----------------------------------------------------------
def _ablate_flow():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("ablate_flow")


def _fake_result(gap: float, sd: float) -> dict:
    """Two arms whose FIDs differ by `gap` in every cell, seed sets with FID sd `sd`."""
    def cells(shift, key, xs):
        return [{"cfg": x if key == "cfg" else 2.0, "steps": x if key == "steps" else 25, "fid": 50.0 + shift + x,
                 "acc": 0.9, "dfid": 1.0, "seconds_per_image": 0.1} for x in xs]

    def arm(name, shift):
        seeds = [{"fid": 50.0 + shift + d, "acc": 0.9 + d / 100, "dfid": 1.0} for d in (-sd, 0.0, sd)]
        return {"arm": name, "cfg_cells": cells(shift, "cfg", (1.0, 2.0)), "step_cells": cells(shift, "steps", (1, 25)),
                "seed_cells": seeds, "seed_spread": _ablate_flow().spread(seeds)}

    return {"data": "data/mnist28", "budget": "cpu", "num_classes": 10, "hardware": "test", "date": "now",
            "tokenizer_config": "t", "ar_config": "a", "real": {"fid": 40.0, "acc": 1.0, "dfid": 0.5},
            "budget_values": {"per_class": 10, "seed": 0, "ref_n": 1000, "head_steps": 25, "tokenizer_steps": 1,
                              "ar_steps": 1}, "arms": [arm("euclidean", 0.0), arm("riemannian", gap)]}


@pytest.mark.parametrize("gap,expected", [(10.0, "riemannian worse"), (-10.0, "riemannian better"),
                                          (1.0, "within noise")])
def test_flow_ablation_verdicts_against_seed_noise(tmp_path, monkeypatch, gap, expected):
    flow = _ablate_flow()
    monkeypatch.setattr(flow, "IMAGES", tmp_path)
    text = "\n".join(flow.section(_fake_result(gap, sd=2.0)))  # seed sd 2: a verdict needs a gap of 4
    assert f"{expected} 3" in text  # all 3 distinct cells get the same verdict (CFG 2 / 25 steps is in both tables)
    assert (tmp_path / "flow_mnist28_cpu.png").is_file()


@pytest.mark.slow
def test_flow_ablation_smoke_run(tmp_path, monkeypatch):
    """The whole script at the smoke budget: shared tokenizer, both arms trained, every cell scored, resumable."""
    import json
    from pathlib import Path

    from test_benchmarks import small_mnist

    flow = _ablate_flow()
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    argv = ["--data", small_mnist(tmp_path, 28), "--budget", "smoke", "--device", "cpu", "--runs",
            str(tmp_path / "runs"), "--out", str(tmp_path / "flow.json")]
    assert flow.main(argv) == 0
    res = json.loads((tmp_path / "flow.json").read_text())
    assert [a["arm"] for a in res["arms"]] == ["euclidean", "riemannian"]
    for arm in res["arms"]:
        assert [c["steps"] for c in arm["step_cells"]] == [1, 2, 5] and len(arm["seed_cells"]) == flow.SEED_SETS
        cfg = json.loads((Path(arm["ar"]) / "config.json").read_text())
        assert cfg["model"]["flow"] == arm["arm"]
    assert len(list((tmp_path / "runs").glob("tokenizer-*"))) == 1  # one tokenizer for both arms
    assert flow.main(argv) == 0  # a second run reuses every training and cell
