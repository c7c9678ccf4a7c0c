"""`spheregen train KIND --config NAME|FILE`: one command for every trainer.

A model joins with a setup module in spheregen.engine defining
    training_setup(config: dict, args) -> (model, dataset, eval_fn | None)
where `config` is the parsed TOML ([model], [train], [data] tables, overrides applied) and `args` the parsed
command line (for extras such as --tokenizer). The loop itself is `spheregen.engine.trainer.Trainer`.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from spheregen.cli import HelpFormatter, add_device_option
from spheregen.config import CONFIG_KINDS, from_dict, load_config, to_dict
from spheregen.engine import dist
from spheregen.engine.trainer import TrainConfig, Trainer
from spheregen.errors import UserError
from spheregen.generation import resolve_checkpoint

SETUPS = {"tokenizer": "spheregen.engine.tokenizer_setup", "ar": "spheregen.engine.ar_setup",
          "sphere": "spheregen.engine.sphere_encoder_setup", "distill": "spheregen.engine.distill_setup"}


def run_training(kind: str, config: dict, args: argparse.Namespace) -> dict:
    """Build the model/dataset for `kind`, then train (resuming if asked); returns the final scalars."""
    train_cfg = from_dict(TrainConfig, config.get("train", {}), "train.")
    if getattr(args, "steps", None):
        train_cfg.steps = args.steps
    torch.manual_seed(train_cfg.seed)  # the model's initial weights follow train.seed (not the process's RNG)
    model, dataset, eval_fn = importlib.import_module(SETUPS[kind]).training_setup(config, args)
    config_dict = {"model": to_dict(model.config), "data": config.get("data", {}), "kind": kind,
                   **({"distill": config["distill"]} if "distill" in config else {})}
    run_dir = Path(args.out)
    trainer = Trainer(model, dataset, train_cfg, run_dir, config_dict=config_dict, eval_fn=eval_fn,
                      device=getattr(args, "device", None))
    if args.resume:
        trainer.resume()
    elif any(run_dir.glob("checkpoints/step_*")):
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue or --out for a new run")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {kind}: {n_params / 1e6:.2f}M parameters, {len(dataset)} items, {train_cfg.steps} steps "
          f"of batch {train_cfg.batch_size} on {trainer.device}; run dir {run_dir}")
    try:
        result = trainer.fit()
    finally:
        dist.shutdown()
    print(f"done: checkpoints in {run_dir / 'checkpoints'}, scalars in {run_dir / 'metrics.csv'}")
    return result


def _cmd_train(args: argparse.Namespace) -> int:
    config = load_config(CONFIG_KINDS[args.kind], args.config, args.set)
    if args.data:
        config.setdefault("data", {})["path"] = args.data
    if args.tokenizer:  # a run/checkpoint directory, or the authors' vae.pt (local or hf:) converted once
        args.tokenizer = str(resolve_checkpoint(args.tokenizer))
    if args.out is None:
        args.out = str(Path("runs") / f"{args.kind}-{Path(args.config).stem}")
    run_training(args.kind, config, args)
    return 0


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.add_argument("kind", choices=sorted(SETUPS), help="what to train")
    p.add_argument("--config", required=True, help="a shipped config by name (e.g. mnist_tiny; `spheregen config "
                                                   "list`) or a TOML file with [model], [train] and [data] tables")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--data", help="dataset directory (overrides data.path)")
    p.add_argument("--out", help="run directory (default: runs/KIND-CONFIG)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    add_device_option(p)
    p.add_argument("--tokenizer", help="tokenizer checkpoint directory, or the authors' vae.pt, a path or hf: "
                                       "(for `train ar`)")
    p.add_argument("--latents", help="latent cache from `spheregen encode` (for `train ar` and `train distill`)")
    p.add_argument("--teacher", help="the trained Euclidean AR run or checkpoint a MeanFlow head is distilled from "
                                     "(for `train distill`)")
    p.add_argument("--no-cache", action="store_true", help="encode images on the fly instead of using --latents")
    p.set_defaults(func=_cmd_train)
