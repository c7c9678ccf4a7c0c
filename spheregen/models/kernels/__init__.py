"""Native CPU kernels, compiled once on the machine that runs them (issue 20).

`native_op(name)` returns `torch.ops.spheregen_kernels.<name>` from the C++ files beside this file:
`flow_steps` (flow_steps.cpp: the flow head's fp32 solver loop) and `decode_step` (decode_step.cpp: the
transformer's one-token step over the KV cache). Both run the elementwise work between the matrix products as
fused C++ loops and split the batch rows between the intra-op threads. The first call builds one library with
the system C++ compiler against the installed torch (`c++ -O3 -march=native -fopenmp`, ~20 s; without OpenMP
where the compiler lacks it) into
`$SPHEREGEN_CACHE/kernels/<key>.so`, the key covering the sources, torch's version, the flags and this CPU's
features; later calls and processes load the built file.
The build runs under a file lock (the ranks of one job build it once) and writes `<key>.partial`, renamed to
`<key>.so` when complete, so a killed build leaves nothing that looks finished.

It returns None where the kernels cannot be had (no compiler, a failed build, SPHEREGEN_NATIVE=0), saying so
once on stderr; callers then run the TorchScript paths of models/head_engine.py and models/decode_engine.py, the
same math, slower.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from spheregen.checkpoint import cache_root
from spheregen.losses import say_once

HERE = Path(__file__).parent
SOURCES = (HERE / "flow_steps.cpp", HERE / "decode_step.cpp", HERE / "ops.cpp")
HEADERS = (HERE / "common.h",)
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++20", "-shared", "-fPIC", "-w")
OPENMP = "-fopenmp"  # the row split's threads (ATen's parallel_for is OpenMP inlined into this library)
_LOADED: dict[str, bool] = {}


def native_op(name: str) -> Callable | None:
    """torch.ops.spheregen_kernels.<name>, the library built and loaded on first use; None where unavailable."""
    if "library" not in _LOADED:
        _LOADED["library"] = _load()
    return _registered(name) if _LOADED["library"] else None


def _registered(name: str = "flow_steps") -> Callable | None:
    try:
        return getattr(torch.ops.spheregen_kernels, name)
    except (AttributeError, RuntimeError):
        return None


def _load() -> bool:
    """Whether the library is loaded (built first where needed)."""
    if os.environ.get("SPHEREGEN_NATIVE", "1") == "0":
        return False
    if _registered() is None:
        try:
            torch.ops.load_library(str(build()))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            reason = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
            say_once(f"spheregen: the native CPU sampling kernels are unavailable ({reason}); sampling runs the "
                     "TorchScript path (same results, slower). Set SPHEREGEN_NATIVE=0 to skip the build.")
            return False
    return _registered() is not None


def _cpu_features() -> str:
    """The CPU's feature flags (what -march=native compiles for), or the processor's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _takes_openmp(compiler: str) -> bool:
    probe = subprocess.run([compiler, OPENMP, "-x", "c++", "-", "-fsyntax-only"], input="int main() { return 0; }",
                           capture_output=True, text=True, timeout=60)
    return probe.returncode == 0


def compile_flags(compiler: str) -> tuple[str, ...]:
    """FLAGS, with OpenMP where the compiler takes it (Apple's clang does not: the kernels then run their row
    parts one after the other, on one thread, still fused)."""
    return (*FLAGS, OPENMP) if _takes_openmp(compiler) else FLAGS


def build_key(compiler: str, flags: tuple[str, ...]) -> str:
    """A short hash of everything the built library depends on."""
    parts = [*(f.read_bytes() for f in (*SOURCES, *HEADERS)), torch.__version__.encode(), compiler.encode(),
             " ".join(flags).encode(), _cpu_features().encode(), str(torch._C._GLIBCXX_USE_CXX11_ABI).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _writable_cache() -> Path:
    """$SPHEREGEN_CACHE/kernels, or a per-user folder under the temp dir where that cannot be written."""
    try:
        path = cache_root() / "kernels"
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"spheregen-kernels-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def build(out_dir: Path | None = None) -> Path:
    """The kernel library for this machine: built into out_dir (default $SPHEREGEN_CACHE/kernels) unless a
    complete one is already there. Raises OSError when no compiler is found, RuntimeError when the build fails."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise OSError("no C++ compiler found (install g++ or set CXX)")
    out_dir = Path(out_dir) if out_dir is not None else _writable_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = compile_flags(compiler)
    target = out_dir / f"sampling-{build_key(compiler, flags)}.so"
    with _locked(out_dir / f"{target.stem}.lock"):
        if target.exists():
            return target
        say_once(f"spheregen: compiling the CPU sampling kernels once for this machine (~20 s) into {out_dir}")
        from torch.utils.cpp_extension import include_paths, library_paths

        fd, tmp = tempfile.mkstemp(prefix=f"{target.stem}.", suffix=".partial", dir=out_dir)
        os.close(fd)
        cmd = [compiler, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *[f"-I{p}" for p in include_paths()], *map(str, SOURCES), *[f"-L{p}" for p in library_paths()],
               "-lc10", "-ltorch_cpu", "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"the kernel build failed: {(done.stderr.strip() or 'no output')[-300:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target
