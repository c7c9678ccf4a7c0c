"""The native sampling kernels (spheregen/models/kernels): they build where a C++ compiler is; the fp32 solver
loop equals the TorchScript loop it replaces at every head shape and thread count (the decoding step's own
tests are in test_decode_engine.py); the build caches and never leaves a half-written library behind."""

import shutil
import subprocess

import pytest
import torch

from spheregen.models import head_engine, kernels
from spheregen.models.ar import ARConfig, SphereAR
from spheregen.models.head_engine import PackedTrunk
from spheregen.models.heads import build_head

HAS_CXX = bool(shutil.which("c++") or shutil.which("g++"))
needs_kernel = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler here")


@needs_kernel
def test_the_kernel_builds_and_loads_where_a_compiler_is():
    """A silent fallback would cost the speed-up without failing anything else."""
    assert kernels.native_op("flow_steps") is not None and kernels.native_op("decode_step") is not None


def engines(width: int, depth: int, n_adaln: int, seed: int) -> tuple[PackedTrunk, PackedTrunk]:
    """(native, scripted) packings of one random head."""
    torch.manual_seed(seed)
    head = build_head("euclidean", 5, 12, width, depth, n_adaln)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    native, scripted = PackedTrunk(head, torch.float32, 8), PackedTrunk(head, torch.float32, 8)
    scripted.kernel = None
    return native, scripted


@needs_kernel
@pytest.mark.parametrize("width,depth,n_adaln", [(32, 3, 1), (48, 4, 2), (24, 2, 2), (64, 3, 3)])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_steps_equal_the_scripted_loop(width, depth, n_adaln, rows, guided, threads):
    native, scripted = engines(width, depth, n_adaln, seed=width + rows)
    n, K, C = 6, *native.mod_shape
    g = torch.Generator().manual_seed(rows)
    # the table as the head lays it out ([e, *R, N, K, C] moved to [e, K, *R, N, C]: not contiguous)
    table = (1 + 0.3 * torch.randn(n, *([2] if guided else []), rows, K, C, generator=g)).movedim(-2, 1)
    coefs = [(0.0, 1.0, 0.0)] + [(0.9 + 0.02 * i, 0.1 * (i + 1), 0.05 * i) for i in range(1, n - 1)] + [(1.0, 0.2, 0.0)]
    noise = torch.randn(rows, n + 1, 5, generator=g)[:, 1:n]  # a strided view, one draw short (last c = 0)
    x = torch.randn(rows, 5, generator=g)
    scale = 3.5 if guided else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = native.steps(x.clone(), table, coefs, noise, scale)
        velocity = native(x, table[1], scale)
    finally:
        torch.set_num_threads(before)
    ref = scripted.steps(x.clone(), table, coefs, noise, scale)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(velocity, scripted(x, table[1], scale), atol=1e-5, rtol=1e-5)
    assert (fast - x).abs().max() > 1e-2  # the steps moved the state


@needs_kernel
def test_generate_with_and_without_the_kernel(monkeypatch):
    def model() -> SphereAR:
        torch.manual_seed(0)
        m = SphereAR(ARConfig(token_dim=8, grid=(2, 2), radius=2.0, num_classes=3, dim=32, n_layers=2, n_heads=2,
                              mlp_multiple_of=8, n_cls_tokens=2, head_depth=3, head_width=32, head_adaln=1)).eval()
        with torch.no_grad():
            for p in m.head.parameters():
                p.normal_(0, 0.2)
        return m

    kw = dict(sampler="euler_maruyama", steps=5, cfg=3.0)
    fast = model().generate([0, 1, 2], [3, 4, 5], **kw)
    monkeypatch.setattr(head_engine, "native_op", lambda name: None)
    ref = model().generate([0, 1, 2], [3, 4, 5], **kw)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(fast.norm(dim=-1), torch.full(fast.shape[:2], 2.0), atol=1e-5)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SPHEREGEN_NATIVE", "0")
    monkeypatch.setattr(kernels, "_LOADED", {})  # as in a fresh process
    assert kernels.native_op("flow_steps") is None and kernels.native_op("decode_step") is None


def test_a_failed_build_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(RuntimeError, match="build failed"):
        kernels.build(tmp_path)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.partial"))  # no target, no temporary
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises((OSError, RuntimeError)):
        kernels.build(tmp_path)
    assert not list(tmp_path.glob("*.so"))


@needs_kernel
def test_the_build_is_cached_by_its_key(tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    built = kernels.build(tmp_path)
    assert built.is_file() and built.stat().st_size > 0 and list(tmp_path.glob("*.so")) == [built]

    def no_compiling(*args, **kwargs):
        raise AssertionError("rebuilt a library that was already there")

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert kernels.build(tmp_path) == built  # found, not rebuilt
    monkeypatch.setattr(kernels, "FLAGS", (*kernels.FLAGS, "-DSPHEREGEN_OTHER_FLAGS"))
    with pytest.raises(AssertionError, match="rebuilt"):
        kernels.build(tmp_path)  # other flags: another key, another build


def test_an_unwritable_cache_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # $SPHEREGEN_CACHE/kernels cannot be made under a file
    monkeypatch.setenv("SPHEREGEN_CACHE", str(blocked))
    monkeypatch.setattr(kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert kernels._writable_cache().parent == tmp_path / "tmp"
    monkeypatch.setenv("SPHEREGEN_CACHE", str(tmp_path / "cache"))
    assert kernels._writable_cache() == tmp_path / "cache" / "kernels"


@needs_kernel
def test_openmp_is_used_where_the_compiler_takes_it(tmp_path):
    real = shutil.which("c++") or shutil.which("g++")
    assert kernels.OPENMP in kernels.compile_flags(real)
    picky = tmp_path / "no-openmp-c++"  # a compiler that refuses -fopenmp, like Apple's clang
    picky.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && exit 1; done\nexec {real} "$@"\n')
    picky.chmod(0o755)
    assert kernels.compile_flags(str(picky)) == kernels.FLAGS
    assert kernels.build_key(real, kernels.FLAGS) != kernels.build_key(real, kernels.compile_flags(real))
