"""SphereAR throughput (and, with --quality, class accuracy of samples per CFG scale).

Sampling: images/s and tokens/s against batch size, flow-head steps and KV cache on/off (random weights of
the given config; decoding excluded). Training: tokens/s of optimizer steps fed from the latent cache
versus encoding images on the fly (--no-cache), when a tokenizer and cache are available.
Quality (--quality CKPT): samples `--per-class` images of every class at each `--cfgs` value, decodes them
with the checkpoint's tokenizer and reports the accuracy of the dataset's classifier (spheregen.eval.classifier).

Writes a Markdown table to stdout and to benchmarks/results/bench_ar.md (or --out). The default run takes a
few minutes on a 2-core CPU:
    python benchmarks/bench_ar.py
    python benchmarks/bench_ar.py --batch-sizes 1,16,64,256 --head-steps 25,100 --config configs/ar/sphereAR_B.toml
    python benchmarks/bench_ar.py --quality runs/ar-mnist_tiny --data data/mnist28 --cfgs 1,2,3,4,6
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from spheregen.config import from_dict, load_toml
from spheregen.models.ar import ARConfig, SphereAR
from spheregen.sphere import project

ROOT = Path(__file__).resolve().parents[1]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t]


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


class RandomLatents:
    """Random sphere tokens with the LatentCache interface (when no cache is given)."""

    def __init__(self, grid, dim, radius, num_classes, n=4096):
        self.grid, self.latent_dim, self.radius, self.num_classes = grid, dim, radius, num_classes
        self.n, self.tokenizer_path = n, ""

    def __len__(self):
        return self.n

    def get_batch(self, indices, flip_mask=None):
        z = project(torch.randn(len(indices), self.grid[0] * self.grid[1], self.latent_dim), self.radius)
        return z, torch.randint(0, max(self.num_classes, 1), (len(indices),))


def build_model(args, source) -> SphereAR:
    cfg = from_dict(ARConfig, load_toml(args.config)["model"], "model.")
    cfg.token_dim, cfg.grid, cfg.radius = source.latent_dim, tuple(source.grid), float(source.radius)
    cfg.num_classes = source.num_classes
    torch.manual_seed(0)
    return SphereAR(cfg)


def bench_sampling(model: SphereAR, args, device) -> str:
    model = model.to(device).eval()
    T = model.seq_len
    rows = []
    for bs in _ints(args.batch_sizes):
        for steps in _ints(args.head_steps):
            for cache in (True, False):
                if not cache and bs * steps > args.max_nocache:
                    continue
                labels = torch.arange(bs) % max(model.num_classes, 1)
                kw = dict(sampler=args.sampler, steps=steps, cfg=args.cfg, use_cache=cache)
                model.generate(labels[:1], [0], **{**kw, "steps": 1})  # warm-up
                t0 = time.perf_counter()
                model.generate(labels, list(range(bs)), **kw)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                rows.append([bs, steps, "on" if cache else "off", f"{dt:.2f}", f"{bs / dt:.2f}", f"{bs * T / dt:.0f}"])
                print(f"sampling batch {bs} steps {steps} cache {cache}: {dt:.2f} s", flush=True)
    return (f"### Sampling ({args.sampler}, CFG {args.cfg}: cond + null rows, {T} tokens, decoding excluded)\n\n"
            + _table(["batch", "head steps", "KV cache", "seconds", "images/s", "tokens/s"], rows))


def bench_training(args, device) -> str:
    from spheregen.data.latents import LatentCache, OnTheFlyLatents
    from spheregen.generation import load_tokenizer

    sources = []
    if args.latents and Path(args.latents).is_dir():
        cache = LatentCache(args.latents)
        sources.append(("latent cache", cache))
        tok_path = args.tokenizer or cache.tokenizer_path
        data_path = args.data or cache.meta.get("data")
        if tok_path and data_path and Path(data_path).is_dir():
            from spheregen.data.datasets import ImageDataset

            sources.append(("on the fly (--no-cache)", OnTheFlyLatents(load_tokenizer(tok_path),
                                                                         ImageDataset(data_path, "train"))))
    else:
        sources.append(("random tokens (no cache given)", RandomLatents((7, 7), 16, 4.0, 10)))
    rows = []
    for name, source in sources:
        model = build_model(args, source).to(device).train()
        opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95))
        gen = torch.Generator().manual_seed(0)
        data_s, t0 = 0.0, 0.0
        for step in range(args.train_steps + 1):  # step 0 is a warm-up
            if step == 1:
                data_s, t0 = 0.0, time.perf_counter()
            d0 = time.perf_counter()
            idx = torch.randint(0, len(source), (args.train_batch,), generator=gen)
            z, y = source.get_batch(idx, torch.zeros(args.train_batch, dtype=torch.bool))
            z, y = z.to(device), y.to(device)
            data_s += time.perf_counter() - d0
            loss, _ = model.training_loss((z, y), step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens = args.train_steps * args.train_batch * model.seq_len
        rows.append([name, args.train_batch, f"{dt / args.train_steps:.3f}", f"{data_s / args.train_steps:.3f}",
                     f"{tokens / dt:.0f}"])
        print(f"training from {name}: {dt / args.train_steps:.3f} s/step", flush=True)
    return ("### Training (one optimizer step = batch x tokens, flow loss x diff_batch_mul)\n\n"
            + _table(["latents", "batch", "s/step", "of which data s/step", "tokens/s"], rows))


def bench_quality(args, device) -> str:
    from spheregen.eval.classifier import class_accuracy, get_classifier
    from spheregen.generation import load_generator, sample_images

    model = load_generator(args.quality, args.tokenizer, str(device))
    classifier, ccfg, _ = get_classifier(args.data)
    labels = [c for c in range(model.num_classes) for _ in range(args.per_class)]
    rows = []
    for cfg in _floats(args.cfgs):
        opts = {"cfg": cfg, "cfg_schedule": args.cfg_schedule, "sampler": args.sampler, "steps": args.quality_steps,
                "temperature": args.temperature}
        t0 = time.perf_counter()
        images = sample_images(model, labels, args.seed, args.batch, opts, progress=False)
        dt = time.perf_counter() - t0
        acc = class_accuracy(images, torch.tensor(labels), classifier)
        rows.append([cfg, args.cfg_schedule, args.sampler, args.quality_steps, len(labels), f"{acc:.3f}", f"{dt:.0f}"])
        print(f"cfg {cfg}: accuracy {acc:.3f} ({dt:.0f} s)", flush=True)
    return (f"### Class accuracy of samples ({args.quality}; classifier test accuracy "
            f"{ccfg.get('test_accuracy')})\n\n"
            + _table(["CFG", "schedule", "sampler", "head steps", "images", "accuracy", "seconds"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/ar/mnist_tiny.toml"), help="AR model config (TOML)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--head-steps", default="10,50")
    p.add_argument("--sampler", default="euler_maruyama", choices=["euler", "euler_maruyama", "heun"])
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--max-nocache", type=int, default=400, help="skip cache-off runs with batch x steps above this")
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--latents", default=str(ROOT / "runs/latents-mnist_tiny"))
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: the one recorded in the cache / AR checkpoint)")
    p.add_argument("--data", help="image dataset for the on-the-fly and quality runs")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: sampling,training")
    p.add_argument("--quality", help="AR checkpoint or run dir: measure class accuracy per CFG instead")
    p.add_argument("--cfgs", default="1,2,3,4,6")
    p.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"])
    p.add_argument("--quality-steps", type=int, default=50)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--batch", type=int, default=100, help="sampling batch for --quality")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="Markdown file (default benchmarks/results/bench_ar.md or bench_ar_quality.md)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    head = (f"## bench_ar ({time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device})\n\nconfig: {args.config}\n")
    parts = [head]
    if args.quality:
        parts.append(bench_quality(args, device))
    else:
        skip = set(args.skip.split(","))
        if "sampling" not in skip:
            if args.latents and Path(args.latents).is_dir():
                from spheregen.data.latents import LatentCache

                source = LatentCache(args.latents)
            else:
                source = RandomLatents((7, 7), 16, 4.0, 10)
            parts.append(bench_sampling(build_model(args, source), args, device))
        if "training" not in skip:
            parts.append(bench_training(args, device))
    text = "\n\n".join(parts) + "\n"
    print("\n" + text)
    out = Path(args.out or ROOT / "benchmarks/results" / ("bench_ar_quality.md" if args.quality else "bench_ar.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
