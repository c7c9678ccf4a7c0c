"""Sphere Encoder training: noise levels and the losses of Eq. 7-10 (see spheregen.models.sphere_encoder).

Functions of the model (`model.training_loss(batch)` etc. delegate here):

    v = f(E(x)),  v_NOISY = f(v + r_N sigma_max e),  v_noisy = f(v + r s sigma_max e),  one shared e ~ N(0, I)
    loss = w_rd dist(D(v_noisy), x) + w_rp perc(.) + w_cd dist(D(v_NOISY), sg D(v_noisy)) + w_cp perc(.)
         + w_lc mean(1 - cos(E(D(v_NOISY)), sg E(x)))
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from spheregen import layers


def stratified_uniform(n: int, device=None) -> torch.Tensor:
    """n values in [0, 1]: one 1, one 0 and (i + U_i)/(n - 2) for the rest (U clamped >= 1e-3), shuffled."""
    if n <= 2:
        return torch.tensor([1.0, 0.0][:n], device=device) if n == 2 else torch.rand(n, device=device)
    k = n - 2
    mid = (torch.arange(k, device=device) + torch.rand(k, device=device).clamp_min(1e-3)) / k
    vals = torch.cat([torch.ones(1, device=device), torch.zeros(1, device=device), mid])
    return vals[torch.randperm(n, device=device)]


def drop_labels(model, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Label dropout: each label becomes the null label with probability label_dropout (per pass)."""
    if labels is None or model.config.num_classes == 0 or model.config.label_dropout <= 0:
        return labels
    return layers.drop_labels(labels, model.config.label_dropout, model.null_label)


def noise_levels(model, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_N, r_n) per sample, multiples of sigma_max for v_NOISY and v_noisy (Sec. 2.2-2.3).

    r and s are stratified; r_n = r s noisy_max. With probability mix_prob, r_N is pushed past alpha to at
    most alpha_mix = min(alpha + mix_extra, mix_max): "code" reuses the mask's own u, r_N = 1 + u (ratio - 1)
    with ratio = tan(alpha_mix)/tan(alpha) (so it reaches only ~1/10 of the way); "uniform" draws the
    angle uniformly in [alpha, alpha_mix].
    """
    cfg = model.config
    r = stratified_uniform(n, device)
    s = stratified_uniform(n, device) * cfg.noisy_max
    r_noisy = r * s
    r_big = r
    if cfg.mix_prob > 0:
        alpha_mix = min(cfg.alpha_deg + cfg.mix_extra_deg, cfg.mix_max_deg)
        ratio = math.tan(math.radians(alpha_mix)) / model.sigma_max
        u = torch.rand(n, device=device)
        if cfg.mix_mode == "code":
            hard = 1 + u * (ratio - 1)
        else:
            ang = cfg.alpha_deg + torch.rand(n, device=device) * (alpha_mix - cfg.alpha_deg)
            hard = torch.tan(torch.deg2rad(ang)) / model.sigma_max
        r_big = torch.where(u <= cfg.mix_prob, hard, r)
    return r_big, r_noisy


def training_loss(model, batch, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of Eq. 7-9 on one batch (x in [-1, 1], y); returns (loss, unweighted terms)."""
    cfg = model.config
    x, y = batch
    y = y if cfg.num_classes > 0 else None
    B = x.shape[0]
    z = model.encoder(x, model._drop(model._labels(y, B, x.device)))
    v = model.spherify(z)
    z_clean = z.detach()
    e = torch.randn_like(v)
    r_big, r_noisy = model.noise_levels(B, x.device)
    v_big = model.noisy_spherify(v, r_big * model.sigma_max, e)
    v_small = model.noisy_spherify(v, r_noisy * model.sigma_max, e)
    y2 = model._labels(y, B, x.device)
    y2 = model._drop(torch.cat([y2, y2])) if y2 is not None else None
    x_big, x_small = model.decoder(torch.cat([v_big, v_small]), y2).chunk(2)

    perc = model._perceptual() if (cfg.w_recon_perc > 0 or cfg.w_con_perc > 0) else None
    x01, big01, small01 = (x + 1) / 2, (x_big.float() + 1) / 2, (x_small.float() + 1) / 2
    terms: dict[str, torch.Tensor] = {}
    loss = x.new_zeros((), dtype=torch.float32)

    def add(name: str, weight: float, fn: Callable[[], torch.Tensor]) -> None:
        nonlocal loss
        if weight > 0:
            val = fn()
            terms[name] = val.detach()
            loss = loss + weight * val

    beta = cfg.dist_beta
    add("recon_dist", cfg.w_recon_dist, lambda: F.smooth_l1_loss(small01, x01, beta=beta))
    add("con_dist", cfg.w_con_dist, lambda: F.smooth_l1_loss(big01, small01.detach(), beta=beta))
    if perc is not None:
        perc = perc.to(x.device)
        add("recon_perc", cfg.w_recon_perc, lambda: perc(x_small.float(), x))
        add("con_perc", cfg.w_con_perc, lambda: perc(x_big.float(), x_small.detach().float()))

    def lat_con() -> torch.Tensor:
        z2 = model.encoder(x_big, model._drop(model._labels(y, B, x.device)))
        return (1 - F.cosine_similarity(z2.flatten(1).float(), z_clean.flatten(1).float(), dim=1)).mean()

    add("lat_con", cfg.w_lat_con, lat_con)
    return loss, terms


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: encoder at enc_lr_scale x the LR; decay only on >= 2-D weights."""
    groups = []
    for module, scale in ((model.encoder, model.config.enc_lr_scale), (model.decoder, 1.0)):
        params = [p for p in module.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay,
                       "lr_scale": scale})
        groups.append({"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale})
    return groups
