"""`spheregen config list | show KIND --config NAME [--set ...]`: the shipped configs, and one config resolved."""

from __future__ import annotations

import argparse
import json

from spheregen.cli import HelpFormatter
from spheregen.config import CONFIG_KINDS, config_path, from_dict, load_config, shipped_configs, to_dict
from spheregen.engine.trainer import TrainConfig
from spheregen.models.ar import ARConfig
from spheregen.models.meanflow_distill import DistillConfig
from spheregen.models.sphere_encoder_nets import SphereEncoderConfig
from spheregen.models.tokenizer import TokenizerConfig


def _cmd_list(args: argparse.Namespace) -> int:
    for kind, folder in CONFIG_KINDS.items():
        print(f"{kind}: {', '.join(shipped_configs(folder))}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    """The config as training will see it: every [model] and [train] field (defaults included), types checked."""
    section, model_cls = {"tokenizer": ("model", TokenizerConfig), "ar": ("model", ARConfig),
                          "sphere": ("model", SphereEncoderConfig), "distill": ("distill", DistillConfig)}[args.kind]
    raw = load_config(CONFIG_KINDS[args.kind], args.config, args.set)
    resolved = {"file": str(config_path(CONFIG_KINDS[args.kind], args.config)),
                section: to_dict(from_dict(model_cls, raw.get(section, {}), f"{section}.")),
                "train": to_dict(from_dict(TrainConfig, raw.get("train", {}), "train.")),
                **{k: v for k, v in raw.items() if k not in (section, "train")}}
    print(json.dumps(resolved, indent=2))
    return 0


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=help)
    tools = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    q = tools.add_parser("list", help="the configs shipped with spheregen, by kind")
    q.set_defaults(func=_cmd_list)
    q = tools.add_parser("show", help="print a config resolved (defaults filled, --set applied, types checked)",
                         formatter_class=HelpFormatter)
    q.add_argument("kind", choices=sorted(CONFIG_KINDS), help="what the config trains")
    q.add_argument("--config", required=True, help="a shipped config name or a TOML file")
    q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    q.set_defaults(func=_cmd_show)
