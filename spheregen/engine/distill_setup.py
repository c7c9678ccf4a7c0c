"""`spheregen train distill --teacher AR_CKPT --config NAME`: a few-step MeanFlow head distilled from a trained
rectified-flow (Euclidean) SphereAR, the transformer frozen (issue 20; MeanFlow, Geng et al. 2025).

The student is the teacher with `model.flow = "meanflow"` (and `model.head_guidance` for folded guidance): the
transformer, the class embedding and the head's network are copied from the teacher's EMA weights, only the head
trains (the transformer's parameters have requires_grad off, so it runs without a graph), and its targets come
from the teacher head's velocity at the same condition h (models/meanflow_distill.py). The result is an ordinary
AR checkpoint: `spheregen sample --ckpt RUN --sampler euler --steps 1` samples it with one head evaluation per
token.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from spheregen.config import from_dict
from spheregen.engine.ar_setup import latent_source, make_eval_fn
from spheregen.errors import UserError
from spheregen.generation import resolve_checkpoint
from spheregen.models import load_model
from spheregen.models.ar import SphereAR
from spheregen.models.meanflow_distill import DistillConfig, MeanFlowDistiller


def training_setup(config: dict, args) -> tuple[SphereAR, object, object]:
    """The student SphereAR (teacher's weights, MeanFlow head, frozen transformer), the teacher's latent cache,
    and the eval grid ([eval], default one Euler step)."""
    if config.get("model"):
        raise UserError("a distill config has no [model] table: the student's architecture is the teacher's; put "
                        "the distillation settings in [distill]")
    cfg = from_dict(DistillConfig, {**config.get("distill", {}), **_teacher_arg(args)}, "distill.")
    if not cfg.teacher:
        raise UserError("train distill needs the teacher: pass --teacher AR_CKPT (a trained Euclidean AR run)")
    ckpt = resolve_checkpoint(cfg.teacher)
    teacher = load_model(ckpt, use_ema=True, expect="ar")
    if teacher.config.flow != "euclidean":
        raise UserError(f"{cfg.teacher} has a {teacher.config.flow} head; the teacher must be a Euclidean "
                        "(rectified-flow) AR model")
    config.setdefault("distill", {})["teacher"] = str(ckpt)  # recorded in the run's config.json
    tokenizer = teacher.config.tokenizer and str((ckpt / teacher.config.tokenizer).resolve())
    student = make_student(teacher, cfg, tokenizer=tokenizer)
    if not getattr(args, "latents", None) and not config.get("data", {}).get("latents"):
        raise UserError("train distill needs the teacher's latent cache: pass --latents CACHE")
    source, _ = latent_source(config, args)
    if tuple(source.grid) != tuple(teacher.config.grid) or int(source.latent_dim) != teacher.config.token_dim:
        raise UserError(f"the latents ({tuple(source.grid)} tokens of {source.latent_dim}) are not the teacher's "
                        f"({tuple(teacher.config.grid)} of {teacher.config.token_dim}); pass its latent cache")
    eval_cfg = {"sampler": "euler", "steps": 1, **config.get("eval", {})}
    return student, source, make_eval_fn(eval_cfg)


def make_student(teacher: SphereAR, cfg: DistillConfig, **config) -> SphereAR:
    """The teacher's architecture with a MeanFlow head (taking the CFG scale when guidance is folded) and the
    teacher's weights; everything but the head frozen; the distiller attached. `config`: more ARConfig fields."""
    student = SphereAR(replace(teacher.config, flow="meanflow", class_dropout=cfg.class_dropout,
                               diff_batch_mul=cfg.batch_mul, head_guidance=cfg.guidance == "folded", **config))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("head.interval_embed.", "head.guidance_embed.")) for k in missing):
        raise UserError(f"the teacher does not fit a MeanFlow student (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    for name, p in student.named_parameters():
        p.requires_grad_(name.startswith("head."))
    MeanFlowDistiller.attach(student.head, teacher.head, cfg)
    return student


def _teacher_arg(args) -> dict:
    teacher = getattr(args, "teacher", None)
    return {"teacher": str(Path(teacher))} if teacher else {}
