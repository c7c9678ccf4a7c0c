"""`spheregen demo --data PATH [--minutes N]`: any image folder (class subfolders, or flat for unconditional) or
dataset directory -> a trained generator, a grid of samples and report.md, within a time budget.

SphereAR (default): tokenizer -> latent cache -> AR transformer. Sphere Encoder (`--model sphere`): one stage.
The configs are the shipped tiny ones scaled to the data (spheregen/engine/budget.py); each stage's step time is
measured on its first steps and its steps and cosine schedule are set to fit its share of the budget. After
training a sweep of guidance settings, scored by the dataset's classifier (class accuracy, domain FID), picks the
checkpoint's default sampling settings, which `spheregen sample` then uses without flags.

The plan (plan_MODEL.json, configs/*.toml) is written first; a killed demo resumes from it and the stages'
checkpoints, and finished stages are skipped when the demo runs again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from spheregen.checkpoint import list_checkpoints
from spheregen.cli import HelpFormatter, main
from spheregen.config import load_config
from spheregen.data.datasets import ImageDataset
from spheregen.engine import budget, report
from spheregen.engine.plan import SAFETY, STAGE_SHARES, SWEEP_SHARE, prepare_dataset, write_toml
from spheregen.errors import UserError
from spheregen.eval.classifier import get_classifier
from spheregen.generation import load_generator, store_default_sampling

ENCODE_SHARE = 0.03  # of the time left: writing the latent cache
STAGE_DIRS = {"sphere_ar": ("tokenizer", "latents", "ar"), "sphere": ("sphere_encoder",)}
REPORT_NAMES = {"sphere_ar": "report", "sphere": "report_sphere"}  # both models may share one --out


def run_spheregen(*argv: str) -> None:
    """Run one `spheregen` command in this process, echoing it; a failure raises UserError."""
    print("$ spheregen " + " ".join(argv), flush=True)
    if main(list(argv)) != 0:
        raise UserError(f"demo step failed: spheregen {' '.join(argv)}")


def train_or_resume(kind: str, config: str, out: Path, *extra: str, steps: int | None = None) -> Path:
    """`spheregen train KIND --config CONFIG` into `out`: skipped when its last checkpoint reached the config's
    steps (or `steps`, passed on as --steps), resumed when it holds earlier checkpoints. Returns the last
    checkpoint."""
    ckpts = list_checkpoints(out)
    target = steps or load_config(kind, config).get("train", {}).get("steps", 0)
    if ckpts and int(ckpts[-1].name.split("_")[1]) >= target:
        print(f"{kind}: using the finished run in {out}")
        return ckpts[-1]
    argv = ["train", kind, "--config", config, "--out", str(out), *extra, *(["--steps", str(steps)] if steps else [])]
    run_spheregen(*argv, *(["--resume"] if ckpts else []))
    return list_checkpoints(out)[-1]


class StageClock:
    """Wall seconds per stage, added up over resumed runs, kept in a JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - t0
            self.path.write_text(json.dumps(self.seconds, indent=2))


def make_plan(args: argparse.Namespace, ds: ImageDataset, data_dir: Path, out: Path, start: float) -> dict:
    """Configs, step counts and the sweep size for the time left; written to plan_MODEL.json and configs/."""
    left = args.minutes * 60 * SAFETY - (time.time() - start)
    if left < 60:
        raise UserError(f"--minutes {args.minutes:g} leaves {max(left, 0):.0f} s after the data is ready; "
                        "give the demo at least a few minutes")
    configs = budget.derive_configs(args.model, ds.image_size, ds.channels, data_dir)
    budget.apply_overrides(configs, args.set)
    shares = dict(STAGE_SHARES[args.model + ("_rgb" if args.model == "sphere_ar" and ds.channels == 3 else "")])
    if args.model == "sphere_ar" and args.tokenizer_share is not None:
        shares = {"tokenizer": args.tokenizer_share, "ar": 1 - args.tokenizer_share}
    train_s = left * (1 - SWEEP_SHARE - (ENCODE_SHARE if args.model == "sphere_ar" else 0))
    fixed = {"tokenizer": args.tokenizer_steps, "ar": args.steps, "sphere": args.steps}
    print(f"planning: measuring the step time of each stage on {budget.PROBE_STEPS} steps ...", flush=True)
    stages, models = budget.plan_stages(configs, ds, train_s, shares, fixed)
    generator = models.get("ar") or models["sphere"]
    if "tokenizer" in models:
        generator.attach_decoder(models["tokenizer"].eval())
    kind = "ar" if "ar" in models else "sphere_encoder"
    sample_s = budget.probe_sample_seconds(generator, report.candidates(kind)[-1])
    n_cands, n_cls = len(report.candidates(kind)), max(ds.num_classes, 1)
    per_class = args.sweep_per_class or int(min(50, max(2, 0.7 * left * SWEEP_SHARE / (n_cands * n_cls * sample_s))))
    paths = {}
    for stage, cfg in configs.items():
        paths[stage] = str(write_toml(out / "configs" / f"{stage}.toml", cfg))
    plan = {"model": args.model, "source": str(Path(args.data).resolve()), "data": str(data_dir.resolve()),
            "minutes": args.minutes,
            "budget_s": args.minutes * 60, "configs": paths,
            "stages": [{**asdict(s), "expected_s": s.expected_s, "fixed": bool(fixed.get(s.name))} for s in stages],
            "sweep": {"per_class": per_class, "sample_s": sample_s, "candidates": n_cands,
                      "expected_s": n_cands * n_cls * per_class * sample_s}}
    (out / f"plan_{args.model}.json").write_text(json.dumps(plan, indent=2))
    return plan


def print_plan(plan: dict) -> None:
    print(f"\nplan for {plan['minutes']:g} minutes ({plan['model']}):")
    for s in plan["stages"]:
        print(f"  {s['name']:<10} {s['steps']:>6} steps x {s['step_s'] * 1000:.0f} ms = "
              f"{s['expected_s'] / 60:.1f} min  (config {plan['configs'][s['name']]})")
    sw = plan["sweep"]
    print(f"  {'sweep':<10} {sw['candidates']} guidance settings x {sw['per_class']} samples per class = "
          f"{sw['expected_s'] / 60:.1f} min\n", flush=True)


def replan_ar(plan: dict, clock: StageClock, out: Path, start: float) -> None:
    """Before the AR starts: if the tokenizer ran slower than measured (a busier machine), cut the AR's steps to
    the time left, and rewrite its config (its cosine schedule follows train.steps)."""
    tok, ar = (next(s for s in plan["stages"] if s["name"] == n) for n in ("tokenizer", "ar"))
    if list_checkpoints(out / "ar") or ar["fixed"]:
        return
    rate = report.last_value(report.read_metrics(out / "tokenizer"), "steps_per_s")  # training steps only
    slowdown = 1.0 / (rate * tok["step_s"]) if rate else 1.0
    left = plan["budget_s"] * SAFETY - (time.time() - start) - plan["sweep"]["expected_s"] / 0.7
    steps = budget.rescale_steps(budget.StagePlan(**{k: ar[k] for k in ("name", "seconds", "step_s", "steps")}),
                                 left, slowdown)
    if steps != ar["steps"]:
        print(f"the tokenizer's steps took {slowdown:.2f}x their measured time; the AR gets {steps} steps, "
              f"not {ar['steps']}, to fit the time left")
        cfg = load_config("ar", plan["configs"]["ar"])
        cfg["train"] = budget.fit_schedule(cfg["train"], steps, ar["step_s"] * max(slowdown, 1.0))
        write_toml(Path(plan["configs"]["ar"]), cfg)
        ar["steps"] = steps
        (out / f"plan_{plan['model']}.json").write_text(json.dumps(plan, indent=2))


def train_stages(plan: dict, data_dir: Path, out: Path, clock: StageClock, start: float) -> tuple[Path, dict]:
    """Every training stage of the plan; returns the generator's run directory and {stage: run dir}."""
    cfgs, data = plan["configs"], str(data_dir)
    if plan["model"] == "sphere":
        with clock.stage("sphere"):
            train_or_resume("sphere", cfgs["sphere"], out / "sphere_encoder", "--data", data)
        return out / "sphere_encoder", {"sphere": out / "sphere_encoder"}
    with clock.stage("tokenizer"):
        tok = train_or_resume("tokenizer", cfgs["tokenizer"], out / "tokenizer", "--data", data)
    latents = out / "latents"
    with clock.stage("encode"):
        if not (latents / "meta.json").is_file():
            run_spheregen("encode", "--tokenizer", str(tok), "--data", data, "--split", "train", "--out", str(latents))
    replan_ar(plan, clock, out, start)
    with clock.stage("ar"):
        train_or_resume("ar", cfgs["ar"], out / "ar", "--latents", str(latents))
    return out / "ar", {"tokenizer": out / "tokenizer", "ar": out / "ar"}


def choose_sampling(plan: dict, run: Path, data_dir: Path, conditional: bool, out: Path) -> tuple[dict, list, dict]:
    """The guidance sweep (resumable, in sweep_MODEL.json) and the default settings stored in the checkpoint."""
    model = load_generator(run)
    path = out / f"sweep_{plan['model']}.json"
    if not conditional:
        best = {"options": report.candidates(model.model_type)[0]}
        rows = []
    else:
        done = json.loads(path.read_text()) if path.is_file() else []
        rows = report.sweep_guidance(model, data_dir, plan["sweep"]["per_class"], done,
                                     save=lambda r: path.write_text(json.dumps(r, indent=2)))
        best = report.pick_best(rows)
    store_default_sampling(run, best["options"])
    print(f"default sampling settings stored in {list_checkpoints(run)[-1]}: {report.describe(best['options'])}")
    return best, rows, model


def recon_metrics(runs: dict) -> tuple[float | None, float | None] | None:
    """Held-out reconstruction PSNR / SSIM logged by the tokenizer's (or the Sphere Encoder's) final evaluation."""
    if "tokenizer" in runs:
        rows = report.read_metrics(runs["tokenizer"])
        return report.last_value(rows, "psnr"), report.last_value(rows, "ssim")
    return report.last_value(report.read_metrics(runs["sphere"]), "recon_psnr"), None


def check_out(out: Path, model: str, source: Path, overwrite: bool) -> None:
    """Refuse to mix runs on other data into `out` (or clear this model's runs there with --overwrite)."""
    plan_path = out / f"plan_{model}.json"
    if not plan_path.is_file():
        return
    if overwrite:
        for name in STAGE_DIRS[model] + ("dataset",):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (f"plan_{model}.json", f"timings_{model}.json", f"sweep_{model}.json"):
            (out / name).unlink(missing_ok=True)
        return
    if json.loads(plan_path.read_text()).get("source") != str(source.resolve()):
        raise UserError(f"{out} holds a {model} demo on other data; pass another --out, or --overwrite to replace it")


def run_demo(args: argparse.Namespace) -> int:
    start = args.started_at or time.time()
    if not args.minutes > 0:
        raise UserError(f"--minutes must be positive, got {args.minutes:g}")
    if args.tokenizer_share is not None and not 0 < args.tokenizer_share < 1:
        raise UserError(f"--tokenizer-share must be between 0 and 1, got {args.tokenizer_share:g}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = StageClock(out / f"timings_{args.model}.json")
    check_out(out, args.model, Path(args.data), args.overwrite)
    with clock.stage("data"):
        data_dir = prepare_dataset(args.data, out / "dataset")
        ds = ImageDataset(data_dir)
        conditional = ds.num_classes >= 2
        print(f"dataset: {len(ds)} images of {ds.image_size}x{ds.image_size}x{ds.channels}, "
              f"{ds.num_classes or 'no'} classes in {data_dir.resolve()}")
    with clock.stage("classifier"):  # the dataset's own classifier, for the sweep and the report (trained once)
        classifier_acc = get_classifier(data_dir)[1].get("test_accuracy") if conditional else None
    plan_path = out / f"plan_{args.model}.json"
    with clock.stage("plan"):
        plan = json.loads(plan_path.read_text()) if plan_path.is_file() else make_plan(args, ds, data_dir, out, start)
    print_plan(plan)
    run, runs = train_stages(plan, data_dir, out, clock, start)
    with clock.stage("sweep"):
        best, rows, _ = choose_sampling(plan, run, data_dir, conditional, out)
    grid = out / f"samples_{args.model}.png"
    with clock.stage("grid"):
        run_spheregen("sample", "--ckpt", str(run), "--n", "8", "--out", str(grid), "--quiet")
    with clock.stage("report"):
        real = report.real_reference(data_dir, best.get("n", 0), classifier_acc) if rows else None
        info = {"data": f"Data: {data_dir.resolve()} ({len(ds)} images, {ds.image_size} px, {ds.channels} "
                        f"channel(s), {ds.num_classes or 'no'} classes); model {args.model}.",
                "plan": plan, "timings": clock.seconds, "runs": {k: str(v) for k, v in runs.items()},
                "recon": recon_metrics(runs), "grid": str(grid), "sweep": rows, "best": best if rows else None,
                "real": real, "default": report.describe(best["options"]), "wall_s": time.time() - start}
        path = report.write_report(out, info, REPORT_NAMES[args.model])
    print("\nactual time per stage (min): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in clock.seconds.items()))
    print(f"demo finished in {(time.time() - start) / 60:.1f} min (budget {args.minutes:g}). Outputs in "
          f"{out.resolve()}:\n  {grid}  (one row per class)\n  {path}\n  runs (checkpoints, metrics.csv): "
          + ", ".join(str(v) for v in runs.values()))
    return 0


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.add_argument("--model", choices=["sphere_ar", "sphere"], default="sphere_ar",
                   help="SphereAR (tokenizer + AR, default) or the Sphere Encoder")
    p.add_argument("--data", default="data/mnist28",
                   help="an image folder (one subfolder per class, or flat: unconditional) or a dataset directory")
    p.add_argument("--out", default="runs/demo", help="where the dataset cache, runs, grid and report go")
    p.add_argument("--minutes", type=float, default=15.0, help="time budget of the whole demo")
    p.add_argument("--started-at", type=float, help="count the budget from this Unix time (make demo passes its "
                                                    "own start, so the bootstrap counts)")
    p.add_argument("--steps", type=int, help="training steps of the AR model / Sphere Encoder (default: fit the "
                                             "budget)")
    p.add_argument("--tokenizer-steps", type=int, help="training steps of the tokenizer (default: fit the budget)")
    p.add_argument("--sweep-per-class", type=int, help="samples per class for each guidance setting of the sweep "
                                                       "(default: fit the budget)")
    p.add_argument("--tokenizer-share", type=float, help="the tokenizer's share of SphereAR's training time "
                                                          f"(default {STAGE_SHARES['sphere_ar']['tokenizer']}, "
                                                          f"RGB {STAGE_SHARES['sphere_ar_rgb']['tokenizer']})")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.SECTION.KEY=VALUE",
                   help="override a derived config value, e.g. --set ar.train.lr=2e-3 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo of this model in --out")
    p.set_defaults(func=run_demo)
