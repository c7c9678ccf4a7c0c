"""Auxiliary image losses for the tokenizers: LPIPS-VGG16, SSIM, and a PatchGAN with hinge losses.

- `LPIPS`          Zhang et al. 2018: d(x, y) = sum_l mean_hw || w_l * (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|) ||^2
                   on VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (SphereAR Sec. 4.1 "perceptual").
- `SSIMLoss`       1 - SSIM(x, y) (a weight-free fallback).
- `build_perceptual(kind, vgg_weights)` picks one of them from a config string.
- `PatchDiscriminator`, `hinge_d_loss`, `hinge_g_loss`: the adversarial term (Isola et al. 2017; SphereAR App. D),
                   and `HingeGAN`, the loss module that owns the discriminator and trains it as a second objective.

Weights: VGG16 comes from a local torchvision-format state dict (`vgg16-*.pth`, keys features.N.weight/bias),
the LPIPS linear heads from the `lpips` wheel's weights/v0.1/vgg.pth. Neither package is imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spheregen.config import installed_file
from spheregen.errors import UserError

# torchvision's vgg16().features: conv indices (in, out) and where the max-pools are.
VGG16_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
               14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
               28: (512, 512)}
VGG16_POOLS = (4, 9, 16, 23)  # the 5th pool (30) comes after relu5_3 and is not needed
LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

_said: set[str] = set()


def say_once(message: str) -> None:
    """Print `message` to stderr the first time it is seen in this process."""
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr, flush=True)


def lpips_heads_path() -> Path:
    """weights/v0.1/vgg.pth inside the installed `lpips` wheel (found, never imported)."""
    path = installed_file("lpips", "weights", "v0.1", "vgg.pth")
    if path is not None:
        return path
    raise UserError("LPIPS linear heads not found: install them with `pip install --no-deps lpips==0.1.4`, "
                    "or set model.perceptual = \"ssim\" or \"none\"")


def vgg16_features() -> nn.Sequential:
    """VGG16 conv stack up to relu5_3, indexed exactly like torchvision's `vgg16().features`."""
    layers: list[nn.Module] = []
    for i in range(30):
        if i in VGG16_CONVS:
            layers.append(nn.Conv2d(*VGG16_CONVS[i], kernel_size=3, padding=1))
        elif i in VGG16_POOLS:
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS-VGG16 distance. forward(x, y) -> [B] distances for images in [-1, 1] (1 or 3 channels).

    x -> (x - shift)/scale; f_l = VGG16 activations at the 5 taps; n_l = f_l / (||f_l||_channel + 1e-10);
    d = sum_l mean_{h,w} sum_c w_{l,c} (n_l(x) - n_l(y))^2 with non-negative 1x1 heads w_l.
    The network is frozen (requires_grad False, eval mode); gradients flow to the inputs.
    """

    def __init__(self, vgg_state: dict[str, torch.Tensor] | None = None,
                 head_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.features = vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        if vgg_state is not None:
            self.load_vgg(vgg_state)
        if head_state is not None:
            self.load_heads(head_state)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen: no dropout, fixed weights
        return super().train(False)

    def load_vgg(self, state: dict[str, torch.Tensor]) -> None:
        """Map torchvision keys features.N.weight / features.N.bias onto the conv at index N."""
        for i in VGG16_CONVS:
            for name in ("weight", "bias"):
                key = f"features.{i}.{name}"
                if key not in state:
                    raise UserError(f"VGG16 weights lack {key}; give a torchvision-format vgg16-*.pth state dict")
                target = getattr(self.features[i], name)
                if state[key].shape != target.shape:
                    raise UserError(f"VGG16 weight {key} has shape {tuple(state[key].shape)}, expected "
                                    f"{tuple(target.shape)}; give a torchvision vgg16 (not vgg16_bn) state dict")
                with torch.no_grad():
                    target.copy_(state[key])

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        """Map the lpips wheel's keys lin{l}.model.1.weight [1, C, 1, 1] onto the heads."""
        for i, head in enumerate(self.heads):
            key = f"lin{i}.model.1.weight"
            if key not in state or state[key].shape != head.weight.shape:
                raise UserError(f"LPIPS head file lacks {key} of shape {tuple(head.weight.shape)}; "
                                "use lpips/weights/v0.1/vgg.pth")
            with torch.no_grad():
                head.weight.copy_(state[key])

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        both = (torch.cat([x, y]).float() - self.shift) / self.scale
        dist = torch.zeros(x.shape[0], device=x.device)
        for f, head in zip(self._taps(both), self.heads):
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fx, fy = f.chunk(2)
            dist = dist + head((fx - fy).pow(2)).mean(dim=(1, 2, 3))
        return dist


class PerceptualLoss(nn.Module):
    """Scalar loss = mean over the batch of LPIPS(x, y)."""

    def __init__(self, lpips: LPIPS):
        super().__init__()
        self.lpips = lpips

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y).mean()


class SSIMLoss(nn.Module):
    """1 - SSIM(x, y) for images in [-1, 1] (Gaussian window 11, sigma 1.5; torchmetrics)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        return 1 - ssim(x.float(), y.float(), data_range=2.0)


def _load_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}); give a torch state-dict file") from None
    if not isinstance(state, dict):
        raise UserError(f"{what} {path} is not a state dict")
    return state


def build_perceptual(kind: str, vgg_weights: str | Path | None = None) -> nn.Module | None:
    """A module m(x, y) -> scalar loss on [-1, 1] images, or None when there is no perceptual term.

    kind "lpips": LPIPS-VGG16 from the local `vgg_weights` file (torchvision vgg16 state dict) and the
    lpips wheel's heads. Without `vgg_weights` it says so once and returns None (no perceptual term);
    vgg_weights = "random" builds it on random VGG weights (plumbing only, not a perceptual metric).
    kind "ssim": 1 - SSIM. kind "none": None.
    """
    if kind == "none":
        return None
    if kind == "ssim":
        return SSIMLoss()
    if kind != "lpips":
        raise UserError(f"unknown perceptual loss {kind!r}; use \"lpips\", \"ssim\" or \"none\"")
    heads = _load_state(lpips_heads_path(), "LPIPS heads")
    if not vgg_weights:
        say_once("perceptual = \"lpips\" but no VGG16 weights were given (model.vgg_weights = PATH to a "
                 "torchvision vgg16-*.pth): training WITHOUT the perceptual term")
        return None
    if str(vgg_weights) == "random":
        say_once("WARNING: LPIPS on RANDOM VGG16 weights (model.vgg_weights = \"random\"): this is NOT a "
                 "perceptual metric, only a plumbing test")
        return PerceptualLoss(LPIPS(None, heads))
    path = Path(vgg_weights)
    if not path.is_file():
        raise UserError(f"VGG16 weights {path} do not exist; fix model.vgg_weights or set model.perceptual "
                        "= \"ssim\" or \"none\"")
    return PerceptualLoss(LPIPS(_load_state(path, "VGG16 weights"), heads))


# -- adversarial --------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix NLayerDiscriminator): conv4x4/s2 + LeakyReLU(0.2), then n_layers - 1 blocks of
    conv4x4/s2 + BatchNorm + LeakyReLU with widths ndf * min(2^n, 8), one stride-1 block, and a
    stride-1 conv to one logit per patch. Convs ~ N(0, 0.02), BatchNorm gains ~ N(1, 0.02)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = 0.5 [mean relu(1 - D(x)) + mean relu(1 + D(x_hat))]."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -mean D(x_hat)."""
    return -logits_fake.mean()


class HingeGAN(nn.Module):
    """The adversarial term as one module that owns its PatchGAN discriminator (the authors keep it in gan/).

    The generator adds weight * L_G = -weight mean D(x_hat) from step `start` (D frozen for that term); the
    trainer steps D with its own optimizer on `loss(context, step)`, L_D = 0.5 [mean relu(1 - D(x)) + mean
    relu(1 + D(x_hat))] on the generator step's detached fakes (context = {"real": x, "fake": x_hat}).
    Before `start`, L_D is a constant 0 with no gradient, so AdamW leaves D untouched.
    """

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3, start: int = 0):
        super().__init__()
        self.discriminator = PatchDiscriminator(in_channels, ndf, n_layers)
        self.start = start

    def active(self, step: int) -> bool:
        return step >= self.start

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        self.discriminator.requires_grad_(False)  # G step: no gradients into D
        loss = hinge_g_loss(self.discriminator(fake))
        self.discriminator.requires_grad_(True)
        return loss

    def loss(self, context: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The second objective: L_D on context["real"] and the detached context["fake"]."""
        real = context["real"]
        if not self.active(step):
            return torch.zeros((), device=real.device, requires_grad=True), {}
        loss = hinge_d_loss(self.discriminator(real), self.discriminator(context["fake"]))
        return loss, {"d": loss.detach()}
