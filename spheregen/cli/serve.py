"""`spheregen serve`: the web app (spheregen.app) over one or more checkpoints; needs the `app` extra (Gradio)."""

from __future__ import annotations

import argparse

from spheregen.cli import HelpFormatter, add_device_option


def _cmd_serve(args: argparse.Namespace) -> int:
    from spheregen.app import import_gradio, serve
    from spheregen.runtime import default_device

    import_gradio()  # the install hint before any model loads
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"serving on {args.host}: anyone who can reach this machine on port {args.port} can use the app")
    serve(args.ckpt, host=args.host, port=args.port, device=default_device(args.device),
          sample_on_load=not args.no_initial_sample)
    return 0


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", action="append", required=True,
                   help="a SphereAR or Sphere Encoder checkpoint or run directory, or an authors' file (local or "
                        "hf:OWNER/REPO/FILE); repeat for a choice of checkpoints")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the app to the network)")
    p.add_argument("--port", type=int, default=7860, help="TCP port")
    p.add_argument("--no-initial-sample", action="store_true", help="do not draw a grid when the page opens")
    add_device_option(p)
    p.set_defaults(func=_cmd_serve)
