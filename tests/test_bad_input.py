"""Bad input across the CLI: each case is one line naming the problem, exit code 2, no traceback."""

import subprocess
import sys

import pytest

CASES = [
    # (name, argv with {root}, words the one-line message must contain)
    ("missing checkpoint", "sample --ckpt {root}/nope --out {root}/g.png", ["nope"]),
    ("corrupt checkpoint", "sample --ckpt {root}/ar_corrupt --out {root}/g.png", ["corrupt"]),
    ("config does not match weights", "sample --ckpt {root}/ar_mismatch --out {root}/g.png", ["does not match"]),
    ("class id out of range", "sample --ckpt {root}/ar --classes 3,12 --n 1 --steps 2 --out {root}/g.png",
     ["12"]),
    ("wrong image size", "encode --tokenizer {root}/tok --data {root}/d32 --out {root}/cache", ["32"]),
    ("output dir not writable", "sample --ckpt {root}/ar --classes 1 --n 1 --steps 2 --out {root}/a_file/g.png",
     ["a_file"]),
    ("missing dataset", "encode --tokenizer {root}/tok --data {root}/missing --out {root}/cache", ["missing"]),
    ("tokenizer given as AR model", "sample --ckpt {root}/tok --out {root}/g.png", ["tokenizer"]),
]


@pytest.mark.parametrize("name,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(tiny, name, argv, words):
    args = argv.format(root=tiny).split()
    res = subprocess.run([sys.executable, "-m", "spheregen.cli", *args], capture_output=True, text=True,
                         timeout=300)
    err = res.stderr.strip()
    assert res.returncode == 2, (name, res.returncode, err[-1500:])
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, (name, lines)
    for w in words:
        assert w in lines[0], (name, lines[0])


def _sample(tiny, out_dir, extra=(), torchrun=False):
    args = ["sample", "--ckpt", str(tiny / "ar"), "--classes", "1,2", "--num-per-class", "3", "--steps", "2",
            "--batch-size", "2", "--out-dir", str(out_dir), "--npz", str(out_dir / "all.npz"), "--quiet", *extra]
    if torchrun:
        import os

        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
               "-m", "spheregen.cli", *args]
    else:
        cmd, env = [sys.executable, "-m", "spheregen.cli", *args], None
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]


def test_sharded_sampling_is_resumable_and_rank_independent(tiny, tmp_path):
    """Deleting PNGs and re-running regenerates exactly them; 2 torchrun ranks write the same files."""
    import numpy as np

    _sample(tiny, tmp_path / "one")
    pngs = sorted((tmp_path / "one").glob("*.png"))
    assert len(pngs) == 6
    ref = {p.name: p.read_bytes() for p in pngs}
    for p in pngs[1::2]:
        p.unlink()
    _sample(tiny, tmp_path / "one")
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "one").glob("*.png"))} == ref
    _sample(tiny, tmp_path / "two", torchrun=True)
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "two").glob("*.png"))} == ref
    npz = np.load(tmp_path / "two" / "all.npz")
    assert npz["arr_0"].shape == (6, 28, 28, 1) and list(npz["arr_1"]) == [1, 1, 1, 2, 2, 2]
