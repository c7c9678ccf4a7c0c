"""The `spheregen` command. One module per command below this package, imported only when that command runs,
so `spheregen --help` answers without importing torch. Each module defines `add_command(sub, name, help)`;
this file wires them and turns a UserError (or an OSError on a user's path) into one line and exit code 2.
Nothing outside this package imports it."""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from spheregen.errors import UserError

# command: (module, one-line help), in the order of `spheregen --help`
COMMANDS = {
    "data": ("spheregen.cli.data", "build a training dataset directory (images.npy, labels.npy, ...)"),
    "train": ("spheregen.cli.train", "train a tokenizer, AR model or Sphere Encoder from a TOML config"),
    "encode": ("spheregen.cli.encode", "write a latent cache (posterior of every image and its flip) for AR training"),
    "sample": ("spheregen.cli.sample", "generate images from an AR or Sphere Encoder checkpoint"),
    "convert": ("spheregen.cli.convert", "convert the authors' published checkpoints into spheregen checkpoints"),
    "edit": ("spheregen.cli.edit", "training-free editing with a Sphere Encoder (manipulate, crossover, interpolate)"),
    "sphere-encoder": ("spheregen.cli.sphere_encoder", "Sphere Encoder utilities (BatchNorm recalibration)"),
    "eval": ("spheregen.cli.eval", "evaluate samples against a reference (FID, KID, precision/recall, accuracy)"),
    "config": ("spheregen.cli.config", "list the shipped configs, or show one resolved with --set overrides"),
    "serve": ("spheregen.cli.serve", "a web app (Gradio, the `app` extra) to sample and edit with checkpoints"),
    "demo": ("spheregen.cli.demo", "train a tiny pipeline end to end and write sample grids"),
}


def version() -> str:
    try:
        return package_version("spheregen")
    except PackageNotFoundError:
        return "unknown (not installed)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's --help: an option's default is shown unless its help already says it (or it has none);
    descriptions and epilogs are kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings or default is None or default is False \
                or default == argparse.SUPPRESS or default == []:
            return text
        return text + " (default: %(default)s)"


def add_device_option(p: argparse.ArgumentParser) -> None:
    """The one --device option of every command."""
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the rank's GPU under torchrun, else cuda when "
                                    "available, else cpu)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (every command with None: for docs and tests)."""
    parser = argparse.ArgumentParser(prog="spheregen", description="Image generation on hyperspherical latents.")
    parser.add_argument("--version", action="version", version=f"spheregen {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module).add_command(sub, name, help)
        else:
            sub.add_parser(name, help=help, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else "")
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
