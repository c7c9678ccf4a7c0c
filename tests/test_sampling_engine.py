"""The lean sampling engine: precomputed AdaLN tables = one full head call per step, EDM Heun, batched per-image
noise (the old per-token stream, batch-independent), and the authors' loop re-implementation (benchmarks/)."""

import sys
from pathlib import Path

import pytest
import torch

from spheregen.models import flow_head
from spheregen.models.ar import ARConfig, SeededNoise, SphereAR
from spheregen.models.flow_head import FlowHead, guided_velocity, noise_draws, solve, solver_times
from spheregen.models.heads import build_head

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
SAMPLERS = ("euler", "heun", "euler_maruyama")


def random_head(flow: str = "euclidean", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    head = build_head(flow, 3, 8, 32, 4, 2)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


@pytest.mark.parametrize("flow", ["euclidean", "meanflow"])
@pytest.mark.parametrize("scale", [None, 3.0])
def test_precomputed_tables_equal_a_full_head_call_per_step(flow, scale):
    head = random_head(flow)
    h = torch.randn(10, 8)
    x = torch.randn(5 if scale else 10, 3)
    for sampler in ("heun", "euler_maruyama"):  # instantaneous velocities: the reference is forward(x, t, h)
        table = flow_head.ModulationTable(head, h, head.eval_times(sampler, 4), guided=scale is not None)
        lean, ref = table.velocity(scale), guided_velocity(head, h, scale)
        for t in solver_times(sampler, 4):
            torch.testing.assert_close(lean(x, t), ref(x, t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_head_sample_equals_the_reference_solve(sampler, monkeypatch):
    """Also with tables made a few steps at a time (chunks much smaller than a token's steps)."""
    head = random_head()
    h, noise = torch.randn(8, 8), torch.randn(4, noise_draws(sampler, 6), 3)
    ref = solve(guided_velocity(head, h, 2.5), noise, sampler, 6)
    torch.testing.assert_close(head.sample(h, noise, 2.5, sampler, 6), ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(flow_head, "TABLE_BYTES", 8 * 32 * 11 * 4 * 2)  # two evaluations per chunk
    torch.testing.assert_close(head.sample(h, noise, 2.5, sampler, 6), ref, atol=1e-5, rtol=1e-5)


def test_heun_skips_the_corrector_on_the_last_step():
    seen = []

    def velocity(x, t):
        seen.append(t)
        return torch.ones_like(x)

    x = solve(velocity, torch.zeros(2, 1, 3), "heun", 5)
    assert len(seen) == 2 * 5 - 1 and max(seen) < 1.0 and seen == solver_times("heun", 5)
    assert torch.allclose(x, torch.ones(2, 3))  # a constant field is still integrated exactly


@pytest.mark.parametrize("dim, draws", [(16, 5), (3, 2)])  # one generator call per chunk / per token
def test_seeded_noise_is_the_per_token_stream_whatever_the_batch(dim, draws):
    seeds = [4, 9, 2]
    src = SeededNoise(seeds, draws, dim, torch.device("cpu"), tokens=5)
    taken = [src.take(2)] + [src.take(1) for _ in range(4)]  # token 0 solved per row (cond, null), then shared
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        expect = [torch.randn(draws, dim, generator=g) for _ in range(6)]
        assert torch.equal(taken[0][i], expect[0]) and torch.equal(taken[0][3 + i], expect[1])
        for k in range(1, 5):
            assert torch.equal(taken[k][i], expect[k + 1])
    alone = SeededNoise(seeds[1:2], draws, dim, torch.device("cpu"), tokens=5)
    assert torch.equal(alone.take(2), taken[0][[1, 4]])


def tiny_model(flow: str = "euclidean") -> SphereAR:
    torch.manual_seed(0)
    model = SphereAR(ARConfig(token_dim=16, grid=(2, 3), radius=2.0, num_classes=3, dim=32, n_layers=2,
                              n_heads=2, mlp_multiple_of=8, n_cls_tokens=4, head_depth=2, head_width=32,
                              head_adaln=1, flow=flow)).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("flow", ["euclidean", "meanflow"])
def test_generate_is_deterministic_batch_independent_cached_and_on_the_sphere(flow):
    model = tiny_model(flow)
    kw = dict(sampler="euler_maruyama", steps=3, cfg=3.0)
    a = model.generate([0, 1, 2], [5, 6, 7], **kw)
    assert torch.equal(a, model.generate([0, 1, 2], [5, 6, 7], **kw))
    torch.testing.assert_close(model.generate([1], [6], **kw)[0], a[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.generate([0, 1, 2], [5, 6, 7], use_cache=False, **kw), a, atol=1e-4, rtol=1e-4)
    assert torch.allclose(a.norm(dim=-1), torch.full(a.shape[:2], 2.0), atol=1e-5)
    assert (a[0] - a[1]).abs().max() > 1e-2


def test_the_authors_loop_reimplementation_follows_generate_with_its_noise():
    """benchmarks/authors_sampler.py (global-RNG noise, full head call per step) = generate with that noise and
    the authors' independent token 0, so the speed benchmark compares the same computation."""
    from authors_sampler import authors_sample

    model, drawn, steps = tiny_model(), [], 4

    def randn(like):
        drawn.append(torch.randn(like.shape))
        return drawn[-1]

    labels = torch.tensor([2, 0])
    theirs = authors_sample(model, labels, 4.5, steps, randn)
    noise = [torch.stack(drawn[k * (steps + 1):(k + 1) * (steps + 1)], dim=1) for k in range(model.seq_len)]
    ours = model.generate(labels, [0, 0], steps=steps, cfg=4.5, noise=noise, first_token="independent")
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert len(drawn) == model.seq_len * (steps + 1) and drawn[0].shape[0] == 4 and drawn[-1].shape[0] == 2


def test_flow_head_still_trains_with_the_shared_modulation_path():
    head = FlowHead(token_dim=3, cond_dim=5, width=16, depth=2, n_adaln=1)
    loss = head.loss(torch.randn(64, 3), torch.randn(64, 5))
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())


def test_quality_verdict_compares_few_step_cells_with_the_100_step_default(tmp_path, monkeypatch):
    import sampling_quality

    monkeypatch.setattr(sampling_quality, "IMAGES", tmp_path)
    rows = [{"flow": "euclidean", "sampler": "euler_maruyama", "steps": 100, "evals": 101, "images_per_s": 1.0,
             "fid": 60.0, "acc": 0.90, "dfid": 1.5},
            {"flow": "meanflow", "sampler": "euler", "steps": 1, "evals": 1, "images_per_s": 40.0, "fid": 62.0,
             "acc": 0.88, "dfid": 1.6},
            {"flow": "meanflow", "sampler": "euler", "steps": 2, "evals": 2, "images_per_s": 25.0, "fid": 70.0,
             "acc": 0.95, "dfid": 1.6},
            {"flow": "meanflow", "sampler": "euler", "steps": 4, "evals": 4, "images_per_s": 12.0, "fid": 59.0,
             "acc": 0.95, "dfid": 1.6}]
    res = {"data": "data/mnist28", "budget": "cpu", "cfg": 2.0, "num_classes": 10, "hardware": "test", "date": "-",
           "ar_config": "c", "rows": rows, "seed_spread": {"fid": {"sd": 1.5}, "acc": {"sd": 0.03}},
           "budget_values": {"ar_steps": 1000, "per_class": 10, "seed": 0, "ref_n": 1000}}
    v = sampling_quality.verdicts(res)
    assert [x["cell"]["steps"] for x in v] == [1, 2]  # only cells with <= 2 evaluations per token
    assert (v[0]["fid_ok"], v[0]["acc_ok"], v[1]["fid_ok"]) == (True, True, False)
    assert v[0]["speedup"] == 40.0
    text = "\n".join(sampling_quality.section(res))
    assert "**meets**" in text and "**does not meet**" in text
    assert (tmp_path / "sampling_quality_mnist28_cpu.png").is_file()
    speeds = [{"batch": b, "hardware": "test", "date": "-", "repeats": 3, "arms": {
        "authors": {"head": "euclidean", "sampler": "euler_maruyama", "steps": 100, "median_s": 10.0,
                    "images_per_s": b / 10.0, "vs_authors": 1.0},
        "meanflow_1": {"head": "meanflow", "sampler": "euler", "steps": 1, "median_s": 10.0 / x,
                       "images_per_s": b * x / 10.0, "vs_authors": x}}} for b, x in ((16, 30.0), (100, 18.0))]
    v = sampling_quality.verdicts({**res, "speeds": speeds})
    assert v[0]["vs_authors"] == {16: 30.0, 100: 18.0} and v[1]["vs_authors"] == {}  # no arm for 2 steps
    text = "\n".join(sampling_quality.section({**res, "speeds": speeds}))
    assert "30.0x the authors' loop side by side at batch 16, 18.0x" in text and text.count("one batch of") == 2


def test_distilled_runs_with_overrides_get_their_own_folder_names():
    import sampling_quality

    assert sampling_quality.distill_tag([]) == ""
    assert sampling_quality.distill_tag(["train.steps=1500", "train.lr=2.5e-4", "distill.average_share=0.75"]) == \
        "-steps1500_lr2.5e-4_average_share0.75"
    assert sampling_quality.speed_batches("16,all", 90) == [16, 90]
    assert sampling_quality.speed_batches("200", 90) == [90]


@pytest.mark.parametrize("rows,fan_in,fan_out", [(12, 40, 72), (5, 128, 48), (32, 256, 384)])
def test_packed_fp32_products_equal_nn_linear(rows, fan_in, fan_out):
    """fp32: the packed (contiguous W^T) product is nn.Linear's sum, up to MKL's rounding for the layout."""
    from spheregen.models.head_engine import _linear

    torch.manual_seed(rows)
    layer = torch.nn.Linear(fan_in, fan_out)
    x = torch.randn(rows, fan_in)
    torch.testing.assert_close(_linear(x, layer.weight.t().contiguous(), layer.bias, False), layer(x),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [None, 4.0])
def test_packed_bf16_trunk_follows_the_autocast_module_path(scale):
    """bf16 (the authors' sampling precision): prepacked oneDNN products (or bf16 addmm where oneDNN is missing)
    stay within bf16 rounding of the module path under autocast, for widths large enough to use them."""
    from spheregen.models.head_engine import PackedTrunk

    torch.manual_seed(2)
    head = build_head("euclidean", 16, 64, 64, 2, 1)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.1)
    h, x = torch.randn(8, 64), torch.randn(4 if scale else 8, 16)
    table = flow_head.ModulationTable(head, h, head.eval_times("euler", 3), guided=scale is not None)
    table.engine()  # fp32 modulation blocks, as the engine takes them
    mods = table.from_step(0)[0]
    ref = guided_velocity(head, h, scale)(x, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_ref = guided_velocity(head, h, scale)(x, 0.0)
    packed = PackedTrunk(head, torch.bfloat16, len(h))(x, mods, scale)
    assert packed.dtype == torch.float32
    err, amp_err = (packed - ref).abs().max(), (amp_ref - ref).abs().max()
    assert err < 3 * amp_err + 1e-3, (err, amp_err)  # no worse than the authors' autocast, in scale
    assert err > 0  # bf16 products really ran


def test_packed_weights_follow_in_place_updates_and_step_aside_when_compiled(monkeypatch):
    from spheregen.models.head_engine import packed_trunk

    head = random_head()
    first = packed_trunk(head, torch.float32, 8)
    assert packed_trunk(head, torch.float32, 8) is first  # cached while the weights are unchanged
    h, x = torch.randn(8, 8), torch.randn(8, 3)
    with torch.no_grad():
        head.blocks[0].mlp.w13.weight.mul_(1.5)  # an optimizer or EMA step updates in place
    assert packed_trunk(head, torch.float32, 8) is not first
    table = flow_head.ModulationTable(head, h, head.eval_times("euler", 2), guided=False)
    torch.testing.assert_close(table.velocity(None)(x, 0.0), guided_velocity(head, h)(x, 0.0), atol=1e-5, rtol=1e-5)
    assert packed_trunk(head, torch.float16, 8) is None
    monkeypatch.setattr(head, "_compiled_call_impl", lambda *a: None, raising=False)
    assert packed_trunk(head, torch.float32, 8) is None  # `--compile`: the compiled module path runs


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("sampler", ["euler", "euler_maruyama"])
@pytest.mark.parametrize("scale", [None, 2.5])
def test_scripted_chunks_of_steps_equal_the_python_solver_on_the_engine(sampler, scale, native, monkeypatch):
    """The one-evaluation-per-step solvers run whole chunks of steps in one loop (TorchScript, or the native
    kernel); the TorchScript loop runs the same ops as `solve` calling the engine's velocity step by step
    (bitwise), the kernel the same math (its fused update rounds differently), also across table chunks."""
    from spheregen.models import head_engine, kernels

    if native and kernels.native_op("flow_steps") is None:
        pytest.skip("the native kernel is not built here (no C++ compiler)")
    if not native:
        monkeypatch.setattr(head_engine, "native_op", lambda name: None)
    head = random_head(seed=3)
    h = torch.randn(8, 8)
    noise = torch.randn(4 if scale else 8, noise_draws(sampler, 7), 3)
    monkeypatch.setattr(flow_head, "TABLE_BYTES", 8 * 32 * 11 * 4 * 3)  # three evaluations per chunk
    table = flow_head.ModulationTable(head, h, head.eval_times(sampler, 7), guided=scale is not None)
    fast = table.solve(scale, noise, sampler, 7, temperature=0.9)
    table = flow_head.ModulationTable(head, h, head.eval_times(sampler, 7), guided=scale is not None)
    stepwise = solve(table.velocity(scale), noise, sampler, 7, temperature=0.9)
    assert (table.engine().kernel is not None) == native
    if native:
        torch.testing.assert_close(fast, stepwise, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(fast, stepwise)
    ref = solve(guided_velocity(head, h, scale), noise, sampler, 7, temperature=0.9)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_the_solver_loop_is_scripted_on_this_torch():
    """The engine falls back to eager Python where TorchScript fails; on the pinned torch it must not (a silent
    fallback would cost the speed-up without failing anything else)."""
    from spheregen.models.head_engine import _scripted

    trunk, steps = _scripted()
    assert isinstance(trunk, torch.jit.ScriptFunction) and isinstance(steps, torch.jit.ScriptFunction)


@pytest.mark.parametrize("flow", ["euclidean", "meanflow"])
def test_one_generate_call_makes_time_features_and_packing_once(flow, monkeypatch):
    """Inside `generate` the weights are fixed: tokens after the first reuse the time features and the engine
    (the same samples as making them per token, which is what happens outside `fixed_weights`)."""
    model = tiny_model(flow)
    kw = dict(sampler="euler_maruyama", steps=3, cfg=3.0)
    counts = {"time": 0, "pack": 0}
    real_time, real_pack = type(model.head).time_features, flow_head.packed_trunk

    def time_features(self, *args):
        counts["time"] += 1
        return real_time(self, *args)

    def packed(*args):
        counts["pack"] += 1
        return real_pack(*args)

    monkeypatch.setattr(type(model.head), "time_features", time_features)
    monkeypatch.setattr(flow_head, "packed_trunk", packed)
    a = model.generate([0, 1, 2], [5, 6, 7], **kw)
    assert counts == {"time": 1, "pack": 1}  # 6 tokens, one solver: made once
    assert "_memo" not in model.head.__dict__  # nothing kept after the call
    h = torch.randn(6, 32)
    noise = torch.randn(3, noise_draws("euler_maruyama", 3), 16)
    with model.head.fixed_weights():
        inside = [model.head.sample(h, noise, 3.0, "euler_maruyama", 3) for _ in range(2)]
    outside = model.head.sample(h, noise, 3.0, "euler_maruyama", 3)
    assert torch.equal(inside[0], outside) and torch.equal(inside[1], outside)
    assert a.shape == (3, 6, 16)


def test_fewstep_cfg_choice_weighs_accuracy_first_and_fid_as_tie_break():
    import fewstep_cfg

    rows = [{"steps": 2, "cfg": 2.0, "fid": 234.0, "acc": 0.43}, {"steps": 2, "cfg": 4.0, "fid": 223.0, "acc": 0.60},
            {"steps": 2, "cfg": 8.0, "fid": 260.0, "acc": 0.62}, {"steps": 1, "cfg": 2.0, "fid": 50.0, "acc": 0.99}]
    assert fewstep_cfg.choose(rows, 2)["cfg"] == 4.0  # 0.62 - 2.60 < 0.60 - 2.23: a big FID loss outweighs 0.02
    assert fewstep_cfg.choose(rows, 1)["cfg"] == 2.0
    unlabelled = [{"steps": 1, "cfg": c, "fid": f} for c, f in ((2.0, 70.0), (3.0, 60.0))]
    assert fewstep_cfg.choose(unlabelled, 1)["cfg"] == 3.0
