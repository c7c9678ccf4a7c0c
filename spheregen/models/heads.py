"""The flow heads SphereAR can use, by `model.flow`; each owns its network, its loss and its sampler
(`loss(x1, h, batch_mul)`, `noise_draws(sampler, steps)`, `sample(h, noise, scale, sampler, steps, temperature)`).
"""

from __future__ import annotations

from torch import nn

from spheregen.errors import UserError
from spheregen.models.flow_head import FlowHead
from spheregen.models.meanflow_head import MeanFlowHead
from spheregen.models.riemannian_head import RiemannianFlowHead

HEADS: dict[str, type[nn.Module]] = {
    "euclidean": FlowHead,  # rectified flow in R^d from Gaussian noise (SphereAR Sec. 3.2, Eq. 7-9)
    "riemannian": RiemannianFlowHead,  # geodesic flow on S^{d-1}(R) from the uniform law (Chen & Lipman 2023)
    "meanflow": MeanFlowHead,  # average velocity u(x_t, t, r) for 1-2 step sampling (Geng et al. 2025)
}
FLOW_TYPES = tuple(HEADS)


def build_head(flow: str, token_dim: int, cond_dim: int, width: int, depth: int, n_adaln: int,
               radius: float = 1.0, guidance_input: bool = False) -> nn.Module:
    """The head for `flow` (one of FLOW_TYPES) with the MLP-AdaLN network of flow_head.FlowHead; a head class
    with `needs_radius` also gets the tokens' sphere radius R; guidance_input (the CFG scale as an input) is the
    MeanFlow head's only."""
    cls = HEADS[flow]
    extra = {"radius": radius} if getattr(cls, "needs_radius", False) else {}
    if guidance_input:
        if cls is not MeanFlowHead:
            raise UserError(f"model.head_guidance needs model.flow = \"meanflow\", not {flow!r}")
        extra["guidance_input"] = True
    return cls(token_dim, cond_dim, width, depth, n_adaln, **extra)
