"""Generate a grid of class-conditional samples with the pipeline API (diffusers style).

    python examples/generate.py --ckpt runs/demo/ar --classes 3,7 --n 4 --out samples.png

--ckpt: a checkpoint or run directory (SphereAR or Sphere Encoder), or an authors' file (local or
hf:OWNER/REPO/FILE). Image k uses seed --seed + k, as `spheregen sample` does.
"""

from __future__ import annotations

import argparse

from PIL import Image

from spheregen.pipelines import SphereARPipeline, SphereEncoderPipeline, pipeline_for


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint, run directory or authors' file")
    p.add_argument("--classes", default="0", help="comma-separated class ids (ignored when unconditional)")
    p.add_argument("--n", type=int, default=4, help="images per class")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed SEED + k")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", default="samples.png", help="grid PNG; one row per class")
    args = p.parse_args(argv)

    pipe = pipeline_for(args.ckpt, device=args.device)  # or SphereARPipeline.from_pretrained(args.ckpt)
    assert isinstance(pipe, (SphereARPipeline, SphereEncoderPipeline))
    classes = [int(c) for c in args.classes.split(",")] if pipe.num_classes else None
    out = pipe(class_labels=classes, num_images=args.n, guidance_scale=args.guidance,
               num_inference_steps=args.steps, seed=args.seed)
    images = out.images  # PIL images, class by class
    w, h = images[0].size
    rows = len(classes) if classes else 1
    grid = Image.new(images[0].mode, (w * args.n, h * rows))
    for k, im in enumerate(images):
        grid.paste(im, ((k % args.n) * w, (k // args.n) * h))
    grid.save(args.out)
    print(f"{len(images)} images in {out.elapsed_s:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
