"""GPU check, ready to run: one GPU, <= 8 minutes, a table on stdout and JSON under benchmarks/results/.

    python benchmarks/gpu_check.py            # or benchmarks/gpu_check.sh; needs CUDA
    python benchmarks/gpu_check.py --dry-run  # small shapes on the CPU, seconds (run by tests/test_gpu_check.py)

What it measures (random weights except in the MNIST run; the shapes are the shipped configs'):
  1. bf16-autocast training steps of SphereAR-B (configs/ar/sphereAR_B.toml, 16 x 16 tokens of d = 16) at batch
     64: median step time, peak memory, and the scaled-dot-product-attention kernel the step ran (read off the
     profiler's op names: flash, efficient, cudnn or math);
  2. SphereAR-B sampling throughput at 256 px (tokens with linear CFG 4.5, then the 256 px S-VAE decoder of
     configs/tokenizer/paper_256.toml), batch 64 and 256, 100 and 10 flow-head steps: for comparison with
     the paper's App. G (A100);
  3. Sphere Encoder-L (configs/sphere/imagenet256_l.toml) one-step generation throughput at batch 64;
  4. a short MNIST run: the tiny tokenizer and AR configs trained on the GPU (about 2 minutes), then 20
     samples per class scored by a small classifier (class accuracy; 0.1 is chance).
Its GPU numbers await a GPU: none was lent to the session that wrote it, so only --dry-run has been run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import hardware, write_json  # noqa: E402

from spheregen.config import from_dict, load_config  # noqa: E402
from spheregen.models.ar import ARConfig, SphereAR  # noqa: E402
from spheregen.models.sphere_encoder import SphereEncoder  # noqa: E402
from spheregen.models.sphere_encoder_nets import SphereEncoderConfig  # noqa: E402
from spheregen.models.tokenizer import Tokenizer, TokenizerConfig  # noqa: E402

AWAITS = "GPU numbers await a GPU: none was lent to the session that wrote this script (only --dry-run ran)"
# --dry-run: the same code on tiny shapes
TINY_AR = dict(grid=[4, 4], dim=64, n_layers=2, n_heads=2, mlp_multiple_of=32, n_cls_tokens=2, head_depth=2,
               head_width=64, num_classes=10)
TINY_TOK = dict(image_size=16, channels=[8, 16, 32], dim=32, enc_depth=1, dec_depth=1, n_heads=2, mlp_hidden=64,
                n_registers=2, perceptual="none", disc_weight=0.0)
TINY_SE = dict(image_size=16, channels=3, num_classes=10, patch_size=4, latent_dim=8, width=32, depth=1, heads=2,
               mixer_depth=1, perceptual="none")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def sphere_ar(dry: bool, device: torch.device) -> SphereAR:
    model = load_config("ar", "sphereAR_B")["model"]
    with device:  # initialised on the device: seconds instead of a CPU init of every large model
        return SphereAR(from_dict(ARConfig, {**model, **(TINY_AR if dry else {})}, "model.")).to(device)


def sdpa_kernel_used(fn) -> str:
    """The SDPA implementation(s) `fn` ran, from the profiler's aten op names."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    kinds = [k for k in ("flash", "efficient", "cudnn", "math") if any(f"scaled_dot_product_{k}" in n or
                                                                        f"attention_{k}" in n for n in names)]
    return "+".join(kinds) or "none seen"


def check_training(dry: bool, device: torch.device, steps: int) -> dict:
    """SphereAR-B training steps (AdamW, bf16 autocast on CUDA): step time, peak memory, the SDPA kernel."""
    model = sphere_ar(dry, device)
    c, batch = model.config, 4 if dry else 64
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    z = torch.nn.functional.normalize(torch.randn(batch, model.seq_len, c.token_dim, device=device), dim=-1)
    z, y = z * c.radius, torch.randint(0, c.num_classes, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss, _ = model.training_loss((z, y), 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = sorted(timed(step, device) for _ in range(steps))
    kernel = sdpa_kernel_used(step)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    n_params = sum(p.numel() for p in model.parameters())
    return {"params_M": n_params / 1e6, "batch": batch, "step_s_median": times[len(times) // 2],
            "img_per_s": batch / times[len(times) // 2], "peak_mem_GiB": peak, "sdpa_kernel": kernel}


def check_sampling(dry: bool, device: torch.device) -> list[dict]:
    """SphereAR-B sampling throughput (tokens, then the 256 px decoder) at two batch sizes and head steps."""
    model = sphere_ar(dry, device).eval()
    tok_cfg = load_config("tokenizer", "paper_256")["model"]
    tok_cfg = {**tok_cfg, "perceptual": "none", "disc_weight": 0.0, **(TINY_TOK if dry else {})}
    with device:
        decoder = Tokenizer(from_dict(TokenizerConfig, tok_cfg, "model.")).to(device).eval()
    rows = []
    model.generate([0, 1], [0, 1], steps=2, cfg=4.5)  # warm-up
    for batch in ((2, 4) if dry else (64, 256)):
        for steps in ((4, 2) if dry else (100, 10)):
            labels, seeds = [i % model.num_classes for i in range(batch)], list(range(batch))
            sync(device)
            t0 = time.perf_counter()
            z = model.generate(labels, seeds, steps=steps, cfg=4.5)
            sync(device)
            gen_s = time.perf_counter() - t0
            with torch.no_grad(), autocast(device):
                dec_s = timed(lambda: decoder.decode(z), device)  # noqa: B023 (called at once)
            rows.append({"batch": batch, "head_steps": steps, "tokens_s": gen_s, "decode_s": dec_s,
                         "img_per_s": batch / (gen_s + dec_s)})
    return rows


def check_sphere_encoder(dry: bool, device: torch.device, repeats: int) -> dict:
    """Sphere Encoder-L one-step generation throughput (bf16 autocast on CUDA)."""
    cfg = load_config("sphere", "imagenet256_l")["model"]
    cfg = {**cfg, "perceptual": "none", **(TINY_SE if dry else {})}
    torch.manual_seed(0)
    with device:
        model = SphereEncoder(from_dict(SphereEncoderConfig, cfg, "model.")).to(device).eval()
    batch = 4 if dry else 64
    labels = torch.arange(batch, device=device) % model.config.num_classes
    with torch.no_grad(), autocast(device):
        model.generate(labels, steps=1, seeds=list(range(batch)))  # warm-up
        times = sorted(timed(lambda: model.generate(labels, steps=1, seeds=list(range(batch))), device)
                       for _ in range(repeats))
    n_params = sum(p.numel() for p in model.parameters())
    return {"params_M": n_params / 1e6, "batch": batch, "s_per_batch": times[len(times) // 2],
            "img_per_s": batch / times[len(times) // 2]}


def check_mnist(dry: bool, device: torch.device, work: Path) -> dict:
    """The tiny MNIST tokenizer + AR trained here, then class accuracy of 20 guided samples per class."""
    import argparse as ap

    from spheregen.cli import main as cli_main
    from spheregen.cli.train import run_training
    from spheregen.data.builders import build_mnist, write_dataset
    from spheregen.data.datasets import ImageDataset
    from spheregen.eval.classifier import class_accuracy, train_classifier
    from spheregen.generation import load_generator

    data = work / "mnist28"
    build_mnist(data, 28)
    if dry:  # 200 digits keep the classifier and the evals to a second
        ds = ImageDataset(data)
        x = (ds.get_batch(range(200))[0].permute(0, 2, 3, 1) * 127.5 + 127.5).round().clamp(0, 255).byte()
        write_dataset(data, x.numpy(), ds.all_labels[:200], ds.classes, "mnist subset")
    t0 = time.perf_counter()
    over = ["train.log_every=1000"] + (["data.eval_images=16", "eval.per_class=1", "eval.steps=2",
                                       "train.batch_size=8"] if dry else [])
    tok_over = [o for o in over if not o.startswith("eval.")]
    args = ap.Namespace(out=str(work / "tok"), resume=False, steps=3 if dry else None, device=str(device))
    run_training("tokenizer", load_config("tokenizer", "mnist_tiny", [f'data.path="{data}"', *tok_over]), args)
    cli_main(["encode", "--tokenizer", str(work / "tok"), "--data", str(data), "--out", str(work / "lat"),
              "--split", "train", "--device", str(device)])
    args = ap.Namespace(out=str(work / "ar"), resume=False, steps=3 if dry else None, device=str(device),
                        tokenizer=str(work / "tok"), latents=str(work / "lat"), no_cache=False)
    run_training("ar", load_config("ar", "mnist_tiny", [f'data.path="{data}"', *over]), args)
    train_s = time.perf_counter() - t0
    model = load_generator(work / "ar", device=device)
    per = 1 if dry else 20
    labels = [c for c in range(10) for _ in range(per)]
    opts = replace(model.sampling_options(None), cfg=3.0, steps=2 if dry else 25, progress=False)
    images = model.generate_images(labels, list(range(len(labels))), opts)
    classifier, info = train_classifier(data, epochs=1 if dry else 12, device=device, verbose=False)
    acc = class_accuracy(images.float(), torch.tensor(labels), classifier)
    return {"train_s": train_s, "samples": len(labels), "class_accuracy": acc,
            "classifier_test_acc": info.get("test_accuracy"), "passed": dry or acc >= 0.5}


def table(result: dict) -> str:
    """The human-readable summary."""
    shapes = "DRY RUN, small shapes" if result["dry_run"] else "full shapes"
    t, lines = result["training"], [f"gpu_check on {result['hardware']} ({shapes})"]
    lines.append(f"SphereAR-B train step, batch {t['batch']} ({t['params_M']:.1f}M params): "
                 f"{t['step_s_median'] * 1e3:.1f} ms ({t['img_per_s']:.1f} img/s), peak {t['peak_mem_GiB']:.2f} GiB, "
                 f"SDPA kernel {t['sdpa_kernel']}")
    lines.append("SphereAR-B sampling (CFG 4.5):  batch  head steps  tokens s  decode s  img/s")
    for r in result["sampling"]:
        lines.append(f"{'':32}{r['batch']:>5}  {r['head_steps']:>10}  {r['tokens_s']:>8.2f}  {r['decode_s']:>8.3f}  "
                     f"{r['img_per_s']:>5.1f}")
    se = result["sphere_encoder"]
    lines.append(f"Sphere Encoder-L 1 step, batch {se['batch']} ({se['params_M']:.0f}M params): "
                 f"{se['img_per_s']:.1f} img/s")
    m = result.get("mnist")
    if m:
        lines.append(f"MNIST tiny tokenizer + AR: trained in {m['train_s']:.0f} s, class accuracy "
                     f"{m['class_accuracy']:.3f} over {m['samples']} samples -> {'PASS' if m['passed'] else 'FAIL'}")
    lines.append(f"total {result['wall_s']:.0f} s. {AWAITS if result['dry_run'] else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="small shapes on the CPU (seconds): checks the script")
    p.add_argument("--out", help="JSON path (default benchmarks/results/gpu_check[_dry_run].json)")
    p.add_argument("--skip-mnist", action="store_true", help="leave out the MNIST training run")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check needs CUDA; use --dry-run to check the script on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    result = {"dry_run": args.dry_run, "hardware": hardware(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "note": AWAITS, "training": check_training(args.dry_run, device, 3 if args.dry_run else 20),
              "sampling": check_sampling(args.dry_run, device),
              "sphere_encoder": check_sphere_encoder(args.dry_run, device, 2 if args.dry_run else 5)}
    if device.type == "cuda":
        result["peak_mem_GiB_all"] = torch.cuda.max_memory_allocated(device) / 2**30
    if not args.skip_mnist:
        with tempfile.TemporaryDirectory() as work:
            result["mnist"] = check_mnist(args.dry_run, device, Path(work))
    result["wall_s"] = time.perf_counter() - t0
    name = "gpu_check_dry_run.json" if args.dry_run else "gpu_check.json"
    out = write_json(Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name, result)
    print(table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
