"""`spheregen convert sphere-ar | sphere-encoder`: the authors' checkpoints -> spheregen checkpoint directories.

Each converter module in spheregen.interop exposes `add_convert_command(sub)` and registers its own
subcommand here; the input may be a local file or an `hf:OWNER/REPO/FILE` path (interop/hub.py).
"""

from __future__ import annotations

import importlib

CONVERTER_MODULES = ("spheregen.interop.sphere_ar", "spheregen.interop.sphere_encoder")


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="convert the authors' published checkpoints into spheregen checkpoints",
                       description="Convert the authors' checkpoints (local files or hf:OWNER/REPO/FILE) into "
                                   "ordinary spheregen checkpoint directories.")
    kinds = p.add_subparsers(dest="convert_kind", metavar="KIND", required=True)
    for name in CONVERTER_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        if hasattr(module, "add_convert_command"):
            module.add_convert_command(kinds)
