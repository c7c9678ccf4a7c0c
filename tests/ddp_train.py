"""Train tiny models with the shared Trainer, in one process or under torchrun (for tests/test_ddp.py).

usage: ddp_train.py OUT_DIR [--accum N] [--sync-bn] [--only NAME,...] [--ckpt]

Models: "tokenizer" (spherical S-VAE with its PatchGAN discriminator switched on at step 2), "ar" (SphereAR),
"sphere" (Sphere Encoder with its latent BatchNorm), "bn" (a deterministic conv + BatchNorm net). Each model's
own noise (posterior draws, flow times, class dropout) is re-seeded before every loss call from (step, part),
part = rank + micro-batch number, so a 1-process run with --accum 2 draws exactly the noise of a 2-rank run,
micro-batch k of the one being rank k's share of the other.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from spheregen.engine import dist  # noqa: E402
from spheregen.engine.trainer import TrainConfig, Trainer  # noqa: E402
from spheregen.models.ar import ARConfig, SphereAR  # noqa: E402
from spheregen.models.sphere_encoder import SphereEncoder  # noqa: E402
from spheregen.models.sphere_encoder_nets import SphereEncoderConfig  # noqa: E402
from spheregen.models.tokenizer import Tokenizer, TokenizerConfig  # noqa: E402


class Tensors:
    """An in-memory dataset: get_batch -> (x[idx] flipped where flip_mask, y[idx])."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def get_batch(self, idx, flip_mask=None):
        x = self.x[idx]
        if flip_mask is not None and x.dim() == 4:
            x = torch.where(flip_mask.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.y[idx]


class BNNet(torch.nn.Module):
    """conv -> BatchNorm -> conv, regressing its own input: no randomness at all."""

    def __init__(self):
        super().__init__()
        # no bias before the BatchNorm: its gradient is zero up to rounding, which AdamW would amplify
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                                       torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))

    def training_loss(self, batch, step):
        x = batch[0]
        loss = (self.net(x) - x.flip(-2)).pow(2).mean()
        return loss, {"mse": loss.detach()}


def build(name: str):
    """(model, dataset) for `name`, both a pure function of the name."""
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    if name == "tokenizer":
        cfg = TokenizerConfig(image_size=16, in_channels=3, channels=(8, 16, 32), dim=32, enc_depth=1, dec_depth=1,
                              n_heads=2, mlp_hidden=64, n_registers=2, latent_dim=8, perceptual="none",
                              disc_weight=0.5, disc_start=2, disc_layers=2, disc_ndf=8, kappa_init=50.0)
        return Tokenizer(cfg), Tensors(images, labels)
    if name == "ar":
        cfg = ARConfig(token_dim=4, grid=(2, 3), radius=2.0, num_classes=3, dim=32, n_layers=2, n_heads=2,
                       mlp_multiple_of=8, n_cls_tokens=4, head_depth=2, head_width=32, head_adaln=1)
        z = torch.nn.functional.normalize(torch.randn(64, 6, 4, generator=g), dim=-1) * 2.0
        return SphereAR(cfg), Tensors(z, labels)
    if name == "sphere":
        cfg = SphereEncoderConfig(image_size=16, channels=3, num_classes=3, patch_size=4, latent_dim=8, width=32,
                                  depth=1, heads=2, mixer_depth=1, perceptual="none", latent_bn=True)
        return SphereEncoder(cfg), Tensors(images, labels)
    return BNNet(), Tensors(images, labels)


def reseeded(model: torch.nn.Module, rank: int) -> None:
    """model.training_loss re-seeds torch's RNG from (step, rank + calls so far in this step) on every call."""
    loss, calls = model.training_loss, {}

    def wrapped(batch, step):
        part = rank + calls.get(step, 0)
        calls[step] = calls.get(step, 0) + 1
        torch.manual_seed(1000 * step + part)
        return loss(batch, step)

    model.training_loss = wrapped


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--only", default="tokenizer,ar,sphere,bn")
    args = p.parse_args()
    dist.init_from_env()
    for name in args.only.split(","):
        model, data = build(name)
        reseeded(model, dist.rank())
        cfg = TrainConfig(steps=4, batch_size=16, grad_accum=args.accum, lr=3e-3, warmup_steps=0, weight_decay=0.05,
                          ema_decay=0.9, flip=True, log_every=100, ckpt_every=4, seed=3, disc_lr=3e-3,
                          sync_batchnorm=args.sync_bn, activation_checkpointing=args.checkpointing)
        trainer = Trainer(model, data, cfg, Path(args.out) / name, progress=False)
        trainer.fit()
    dist.shutdown()
    print("FINISHED", flush=True)


if __name__ == "__main__":
    main()
