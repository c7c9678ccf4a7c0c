"""The `spheregen` command. Each module that owns commands exposes `add_commands(subparsers)`;
this file only wires them together and turns `UserError` into one line and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# Modules that register subcommands, in the order they appear in --help.
COMMAND_MODULES = ["data", "train_cli", "tokenizer", "sample_cli", "convert_cli", "sphere_encoder", "edit", "metrics", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spheregen", description="Image generation on hyperspherical latents.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"spheregen.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"spheregen.{name}":
                continue  # that part of the library is not built yet
            raise
        if hasattr(module, "add_commands"):
            module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as e:
        print(f"spheregen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable output path, a full disk, a file where a folder should be, ...
        where = f" ({e.filename})" if e.filename else ""
        print(f"spheregen {args.command}: error: {e.strerror or e}{where}; check the path and its permissions",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spheregen: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
