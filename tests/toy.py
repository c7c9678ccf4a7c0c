"""A toy model and dataset that plug into the shared training loop (used by several tests)."""

from dataclasses import dataclass

import torch

from spheregen.checkpoint import PretrainedMixin, register_model


@dataclass
class ToyConfig:
    dim: int = 8
    hidden: int = 32
    noise: float = 0.1


@register_model("toy")
class ToyModel(PretrainedMixin, torch.nn.Module):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.net = torch.nn.Sequential(torch.nn.Linear(config.dim, config.hidden), torch.nn.SiLU(),
                                       torch.nn.Dropout(0.1), torch.nn.Linear(config.hidden, config.dim))

    def training_loss(self, batch, step):
        x, y = batch
        noisy = x + self.config.noise * torch.randn_like(x)  # uses the global RNG, like real models
        recon = (self.net(noisy) - x).pow(2).mean()
        return recon, {"recon": recon.detach()}


class ToyData:
    def __init__(self, n: int = 256, dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def get_batch(self, idx, flip_mask=None):
        x = self.x[idx]
        if flip_mask is not None:
            x = torch.where(flip_mask[:, None], x.flip(-1), x)
        return x, self.y[idx]
