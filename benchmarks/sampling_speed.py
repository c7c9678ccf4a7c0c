"""Sampling speed of spheregen against a re-implementation of the authors' sampling loop, side by side in one
process (issue 20; paper App. G names the flow head the inference bottleneck).

Both sample the same random-weight model: dim 256, 4 layers (4 heads of 64), head 3 x 256, 16 class tokens,
8 x 8 tokens of d = 16 on the radius-4 sphere, CFG 4.5 with the linear schedule, Euler-Maruyama with 100 head
steps, B = 16, and decode with the same 75M S-VAE decoder (configs/tokenizer/paper_256.toml at 128 px). Runs
alternate (authors, spheregen, authors, ...) after one warm-up each; the speed-up is the ratio of the medians.
Extra arms (`--arms`) time spheregen's few-step settings in the same process (Euler with 1 and 2 steps on a
MeanFlow head of the same size, with CFG on two rows or folded into the head), and `products_only`, the
100-step head's matrix products alone (a floor for any exact sampler at these FLOPs). Use 2 threads as the issue
does. `--precision bf16` runs both loops' networks at the authors' own sampling precision (their sampler runs
under bf16 autocast; spheregen's packed head then uses prepacked oneDNN bf16 products):

    python benchmarks/sampling_speed.py --arms products_only,meanflow_1,folded_1   # -> results/sampling_speed_cpu.json
    python benchmarks/sampling_speed.py --precision bf16                           # -> sampling_speed_cpu_bf16.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from authors_sampler import authors_sample  # noqa: E402

CONFIG = dict(token_dim=16, grid=(8, 8), radius=4.0, num_classes=1000, dim=256, n_layers=4, n_heads=4,
              n_cls_tokens=16, head_depth=3, head_width=256, head_adaln=1)
# few-step arms: name -> (flow, sampler, steps, CFG folded into the head: no null rows)
FEW_STEP = {"meanflow_1": ("meanflow", "euler", 1, False), "meanflow_2": ("meanflow", "euler", 2, False),
            "folded_1": ("meanflow", "euler", 1, True), "folded_2": ("meanflow", "euler", 2, True)}
EXTRA_ARMS = (*FEW_STEP, "products_only")


def products_only(model, batch: int, steps: int):
    """fn() -> tokens: only the matrix products of spheregen's 100-step head at every token (one AdaLN table
    product for all solver times, then per Euler-Maruyama step the ResBlocks' SwiGLU products on the 2B rows),
    nothing else. Their time at this size bounds any exact sampler that does these FLOPs (the tokens are zeros:
    the decode still runs)."""
    import torch.nn.functional as F

    head, rows, T = model.head, 2 * batch, model.seq_len
    x, g = torch.randn(rows, head.width), torch.randn(rows, head.blocks[0].mlp.w2.in_features)
    table_in = torch.randn((steps + 1) * rows, head.width)
    w_mod = torch.cat([a.weight for a in [*head.adaln, head.final_adaln]])

    def fn():
        for _ in range(T):
            F.linear(table_in, w_mod)
            for _ in range(steps + 1):
                for blk in head.blocks:
                    blk.mlp.w13(x)
                    blk.mlp.w2(g)
        return torch.zeros(batch, T, model.config.token_dim)
    return fn


def build(flow: str = "euclidean", head_guidance: bool = False):
    """The benchmark's AR model (random weights, the head's zero-init layers randomised too) and decoder."""
    from spheregen.config import from_dict, installed_file, load_toml
    from spheregen.models.ar import ARConfig, SphereAR
    from spheregen.models.tokenizer import Tokenizer, TokenizerConfig

    torch.manual_seed(0)
    model = SphereAR(ARConfig(**CONFIG, flow=flow, head_guidance=head_guidance)).eval()
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.02)
    tok = load_toml(installed_file("spheregen", "configs", "tokenizer", "paper_256.toml"))["model"]
    tok.update(image_size=128, disc_weight=0.0, perceptual="none")
    return model, Tokenizer(from_dict(TokenizerConfig, tok, "model.")).eval()


def timed(fn) -> tuple[float, float]:
    """(sampling seconds, decoding seconds) of fn() -> (tokens, decode closure)."""
    t0 = time.perf_counter()
    tokens, decode = fn()
    t1 = time.perf_counter()
    decode(tokens)
    return t1 - t0, time.perf_counter() - t1


def measure(args) -> Path:
    torch.set_num_threads(args.threads)
    model, decoder = build()
    if args.compile:  # both loops' networks through torch.compile, as the authors' code decorates them
        import authors_sampler

        authors_sampler._head = torch.compile(authors_sampler._head, dynamic=False)
        authors_sampler._forward_model = torch.compile(authors_sampler._forward_model, dynamic=False)
        model.head.compile(dynamic=False)
    B, steps, cfg = args.batch, args.steps, args.cfg
    amp = {"fp32": None, "bf16": torch.bfloat16}[args.precision]  # the networks' autocast, both loops

    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            return decoder.decode(z, project=True)
    labels = torch.arange(B) % CONFIG["num_classes"]
    seeds = list(range(B))
    def arm(m, sampler: str, n: int, authors: bool = False):
        """fn(warm) -> (tokens, decode); a warm-up runs 2 head steps at most."""
        def fn(warm: bool = False):
            k = min(n, 2) if warm else n
            if authors:
                z = authors_sample(m, labels, cfg, k, amp=amp)
            else:
                z = m.generate(labels, seeds, sampler, k, cfg, "linear", precision=args.precision)
            return z, decode
        return fn

    arms = {"authors": arm(model, "euler_maruyama", steps, authors=True),
            "spheregen": arm(model, "euler_maruyama", steps)}
    for name in [a for a in args.arms.split(",") if a]:
        if name == "products_only":
            arms[name] = lambda warm=False, floor=products_only(model, B, steps): (
                floor() if not warm else torch.zeros(B, 1, 1), decode)
            continue
        flow, sampler, n, folded = FEW_STEP[name]
        arms[name] = arm(build(flow, folded)[0], sampler, n)
    with torch.no_grad():
        for fn in arms.values():
            fn(warm=True)
        runs = {name: [] for name in arms}
        for r in range(args.repeats):
            for name, fn in arms.items():
                runs[name].append(timed(fn))
                print(f"run {r} {name}: sampling {runs[name][-1][0]:.2f} s, decode {runs[name][-1][1]:.2f} s",
                      flush=True)
    summary = {}
    for name, rs in runs.items():
        total = [a + b for a, b in rs]
        summary[name] = {"median_total_s": statistics.median(total), "median_sampling_s": statistics.median(
            a for a, _ in rs), "median_decode_s": statistics.median(b for _, b in rs),
            "images_per_s": B / statistics.median(total), "runs_s": [[round(a, 4), round(b, 4)] for a, b in rs]}
    base = summary["authors"]["median_total_s"]
    for name, s in summary.items():
        s["speedup_vs_authors"] = base / s["median_total_s"]
        s["speedup_vs_authors_sampling_only"] = summary["authors"]["median_sampling_s"] / s["median_sampling_s"]
        print(f"{name}: {s['median_total_s']:.2f} s median ({s['images_per_s']:.2f} images/s), "
              f"{s['speedup_vs_authors']:.2f}x the authors' loop ({s['speedup_vs_authors_sampling_only']:.2f}x "
              f"without the decode)")
    suffix = ("_compile" if args.compile else "") + ("" if args.precision == "fp32" else f"_{args.precision}")
    out = Path(args.out) if args.out else harness.RESULTS / f"sampling_speed_cpu{suffix}.json"
    return harness.write_json(out, {
        "experiment": "sampling_speed", "hardware": harness.hardware(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": {**CONFIG, "batch": B, "cfg": cfg, "cfg_schedule": "linear", "sampler": "euler_maruyama",
                   "head_steps": steps, "decoder": "paper_256 S-VAE at 128 px (75.4M parameters)",
                   "precision": args.precision, "compile": args.compile, "repeats": args.repeats},
        "arms": summary})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=100, help="Euler-Maruyama head steps of both loops")
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--repeats", type=int, default=5, help="alternating timed runs of each arm (at least 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arms", default="", help=f"extra arms: comma list of {', '.join(EXTRA_ARMS)} (products_only: "
                                              "the 100-step head's matrix products alone, a floor)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the networks' autocast in both loops (the authors sample under bf16 autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile both loops' networks (spheregen: the head)")
    p.add_argument("--out", help="result JSON (default benchmarks/results/sampling_speed_cpu.json)")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be at least 3 (a median of alternating runs)")
    return harness.report(lambda: measure(args))


if __name__ == "__main__":
    sys.exit(main())
