"""SphereAR: a causal transformer over hyperspherical latent tokens with a token-level flow head
(SphereAR Sec. 3.2-3.3, Sec. 4.1, App. D).

Sequence (teacher forcing): [c_1..c_K ; z_0 .. z_{T-2}] with K class tokens (a null class for CFG and
unconditional models), latents through `proj_in`, the whole sequence through an RMSNorm, pre-norm
RMSNorm/SwiGLU blocks with 2D RoPE in raster order (class tokens at (0, 0), the identity), a final
RMSNorm. Output K-1+k (the last class token for k = 0) predicts z_k; a learned embedding of the target
position k is added before the flow head, which is trained with the rectified-flow loss (flow_head.py).

Sampling runs the conditional and null rows in one batch over a KV cache; at every solver step the head
velocity is guided, v = v_u + s_k (v_c - v_u), with s_k = s (constant) or 1 + (s - 1) k / T (linear);
the solved token is projected to radius R and fed back to both rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from spheregen.checkpoint import PretrainedMixin, register_model
from spheregen.config import from_dict
from spheregen.errors import UserError, check_choice, check_class_ids
from spheregen.layers import Block, KVCache, RMSNorm, drop_labels, grid_positions, rope_angles, swiglu_hidden
from spheregen.models.decode_engine import packed_decoder
from spheregen.models.flow_head import SAMPLERS
from spheregen.models.heads import FLOW_TYPES, build_head
from spheregen.sphere import project

CFG_SCHEDULES = ("constant", "linear")
FIRST_TOKEN_MODES = ("shared", "independent")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> autocast dtype


@dataclass(frozen=True)
class ARSampling:
    """How SphereAR samples (Sec. 3.2, Eq. 9; the authors' sampler: Euler-Maruyama, 100 head steps, linear CFG).

    cfg: guidance scale s (1 = none); cfg_schedule: s_k = s ("constant") or 1 + (s - 1) k / T ("linear");
    sampler / steps: the flow-head solver and its steps per token; temperature scales the initial and SDE noise;
    first_token: "shared" or "independent" for tokens with s_k = 1 (None: the checkpoint's config.first_token).
    """

    cfg: float = 1.0
    cfg_schedule: str = "linear"
    sampler: str = "euler_maruyama"
    steps: int = 100
    temperature: float = 1.0
    first_token: str | None = None
    precision: str | None = None  # autocast of the transformer and head: fp32 | bf16 | fp16; None: bf16 on CUDA
    progress: bool = False

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("cfg_schedule", self.cfg_schedule, CFG_SCHEDULES)
        if self.first_token is not None:
            check_choice("first_token", self.first_token, FIRST_TOKEN_MODES)
        if self.precision is not None:
            check_choice("precision", self.precision, tuple(AMP_DTYPES))
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")


@dataclass
class ARConfig:
    # from the latents (None: filled in by the training setup from the latent cache or tokenizer)
    token_dim: int | None = None  # d, the latent channels per token
    grid: tuple[int, int] | None = None  # (h, w) latent grid, raster order; T = h w tokens
    radius: float | None = None  # R, the sphere the tokens live on
    num_classes: int | None = None  # None: from the data; 0: unconditional (only the null class)
    tokenizer: str | None = None  # tokenizer checkpoint of the latents (the default decoder for sampling);
    # a relative path is relative to the checkpoint directory
    # transformer
    dim: int = 768
    n_layers: int = 24
    n_heads: int = 12
    mlp_multiple_of: int = 256  # SwiGLU hidden = round_up(8 dim / 3, this)
    mlp_hidden: int | None = None  # an explicit SwiGLU hidden width (converted checkpoints); None: the rule above
    n_cls_tokens: int = 16
    rope_theta: float = 10000.0
    # flow head
    head_depth: int = 6
    head_width: int = 768
    head_adaln: int = 2  # shared AdaLN linears, each used by head_depth / head_adaln blocks
    flow: str = "euclidean"  # the head's flow (models/heads.py): "euclidean" rectified flow (the paper),
    # "riemannian" flow matching on the radius-R sphere (the paper's future work), or "meanflow" (few-step)
    head_guidance: bool = False  # the head takes the CFG scale as an input (a MeanFlow head distilled with
    # guidance folded in): sampling then runs only the conditional rows
    # training
    class_dropout: float = 0.1
    diff_batch_mul: int = 4  # independent (t, eps) draws per target token
    # the sphere constraint (off only for the ablation)
    project_inputs: bool = True
    project_outputs: bool = True
    # sampling default for tokens whose guidance scale s_k is 1 (token 0 under the linear schedule):
    # "shared" (native): the null rows take the conditional token, as for every later token;
    # "independent" (the authors' sampler): cond and null rows each solve their own token with their own noise
    first_token: str = "shared"


@register_model("ar")
class SphereAR(PretrainedMixin, nn.Module):
    config_class = ARConfig

    def __init__(self, config: ARConfig):
        super().__init__()
        c = config
        if None in (c.token_dim, c.grid, c.radius, c.num_classes):
            raise UserError("the AR config lacks token_dim / grid / radius / num_classes; they come from the "
                            "latent cache (train with --latents) or must be set in [model]")
        if c.dim % c.n_heads or (c.dim // c.n_heads) % 4:
            raise UserError(f"model.dim {c.dim} / n_heads {c.n_heads} must give a head dim divisible by 4 (2D RoPE)")
        self.config = c
        self.seq_len = c.grid[0] * c.grid[1]
        self.null_class = c.num_classes
        self.cls_embedding = nn.Embedding(c.num_classes + 1, c.n_cls_tokens * c.dim)
        self.proj_in = nn.Linear(c.token_dim, c.dim)
        self.emb_norm = RMSNorm(c.dim)
        check_choice("model.first_token", c.first_token, FIRST_TOKEN_MODES)
        hidden = c.mlp_hidden or swiglu_hidden(c.dim, c.mlp_multiple_of)
        self.blocks = nn.ModuleList(Block(c.dim, c.n_heads, hidden) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim)
        self.pos_for_diff = nn.Embedding(self.seq_len, c.dim)  # the target token's position, added before the head
        check_choice("model.flow", c.flow, FLOW_TYPES)
        self.head = build_head(c.flow, c.token_dim, c.dim, c.head_width, c.head_depth, c.head_adaln, c.radius,
                               guidance_input=c.head_guidance)
        # RoPE: class tokens at (0, 0); input latent k at its own patch centre (col + 1.5, row + 1.5)
        head_dim = c.dim // c.n_heads
        patches = rope_angles(grid_positions(*c.grid, offset=1.5), head_dim, c.rope_theta)
        rope = torch.cat([torch.zeros(c.n_cls_tokens, head_dim // 2), patches[:-1]])
        self.register_buffer("rope", rope, persistent=False)
        self._decoder = None
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, 0.02) with zero bias for the transformer's Linear/Embedding; the head keeps its own init."""
        for name, m in self.named_modules():
            if name.startswith("head"):
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay for < 2-D params, proj_in and the class embedding (as the authors)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                skip = p.dim() < 2 or name.startswith(("proj_in.", "cls_embedding."))
                (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # -- the transformer ----------------------------------------------------------------------------
    def _class_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        return self.cls_embedding(labels).view(len(labels), self.config.n_cls_tokens, self.config.dim)

    def _latent_tokens(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.project_inputs:
            # every AR input on the radius-R sphere (SphereAR Sec. 3.2); off only for the ablation
            z = project(z, self.config.radius)
        return self.proj_in(z.to(self.proj_in.weight.dtype))

    def _run(self, x: torch.Tensor, start: int = 0, caches: list[KVCache] | None = None) -> torch.Tensor:
        """emb_norm -> causal blocks -> norm for positions start..start+len-1 (over the caches if given)."""
        rope = self.rope[start:start + x.shape[1]]
        x = self.emb_norm(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, rope, causal=caches is None, cache=caches[i] if caches else None, start=start)
        return self.norm(x)

    def hidden_states(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: z [B, T, d], labels [B] (null = num_classes) -> head conditions [B, T, dim]."""
        x = torch.cat([self._class_tokens(labels), self._latent_tokens(z[:, :-1])], dim=1)
        h = self._run(x)[:, self.config.n_cls_tokens - 1:]
        return h + self.pos_for_diff.weight[: h.shape[1]]

    def training_loss(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        """Rectified-flow loss (Eq. 8) on every token, labels dropped to the null class with p = class_dropout."""
        z, labels = batch
        if z.shape[1:] != (self.seq_len, self.config.token_dim):
            raise UserError(f"latents of shape {tuple(z.shape[1:])} do not fit this model "
                            f"({self.seq_len} tokens of {self.config.token_dim} channels)")
        labels = drop_labels(labels.to(z.device), self.config.class_dropout, self.null_class)
        if self.num_classes == 0:
            labels = torch.full_like(labels, self.null_class)
        h = self.hidden_states(z, labels)
        extra = {}
        if getattr(self.head, "needs_null_condition", False):  # distilling guidance into the head
            with torch.no_grad():
                h_null = self.hidden_states(z, torch.full_like(labels, self.null_class))
            extra["h_null"] = h_null.reshape(-1, h_null.shape[-1])
        loss = self.head.loss(z.reshape(-1, z.shape[-1]), h.reshape(-1, h.shape[-1]), self.config.diff_batch_mul,
                              **extra)
        return loss, {"flow": loss.detach()}

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, labels, seeds: list[int], sampler: str = "euler_maruyama", steps: int = 100,
                 cfg: float | None = None, cfg_schedule: str = "linear", temperature: float = 1.0,
                 use_cache: bool = True, progress: bool = False, first_token: str | None = None,
                 noise: list[torch.Tensor] | None = None, precision: str | None = None) -> torch.Tensor:
        """Sample latent tokens [B, T, d] for `labels`, sample k drawing all its noise from seed seeds[k].

        cfg None: no guidance (conditional rows only). cfg s: cond and null rows in one batch sharing the
        head's noise, guided velocity at every solver step. Where s_k = 1 (token 0 of the linear schedule),
        first_token "independent" (the authors' sampler) solves every row unguided with its own noise and the
        null rows keep their own token; "shared" guides as elsewhere (None: the config's default).
        noise: explicit noise instead of the seeds' draws, noise[k] [rows, noise_draws, d] with rows = 2B
        (cond rows, then null rows) for an independently solved token, else B. use_cache False recomputes
        the whole prefix at every token (the reference the KV cache is tested against). precision: the
        networks' autocast (fp32 | bf16 | fp16; None: bf16 on CUDA, fp32 elsewhere); the solver runs in fp32.
        """
        c, device = self.config, self.rope.device
        independent = self._check_sampling(sampler, steps, cfg_schedule, first_token or c.first_token, precision)
        B, T = len(seeds), self.seq_len
        labels = sampling_labels(labels, B, self.num_classes, device)
        guided = cfg is not None and self.num_classes > 0 and not c.head_guidance
        scale_input = cfg is not None and self.num_classes > 0 and c.head_guidance  # w is the head's input
        rows = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        if noise is None:
            noise = SeededNoise(seeds, self.head.noise_draws(sampler, steps), c.token_dim, device, T)
        amp = AMP_DTYPES[precision] if precision else (torch.bfloat16 if device.type == "cuda" else None)
        dtype = amp or self.proj_in.weight.dtype
        autocast = torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)
        caches = ([KVCache(len(rows), c.n_heads, c.n_cls_tokens + T - 1, c.dim // c.n_heads, device, dtype)
                   for _ in self.blocks] if use_cache else None)
        step = packed_decoder(self) if use_cache and amp is None else None  # CPU fp32 one-token step, or None
        tokens = torch.empty(B, T, c.token_dim, device=device)
        new = self._class_tokens(rows)  # the inputs not seen yet
        seq, start = new, 0
        with autocast, self.head.fixed_weights():
            for k in tqdm(range(T), disable=not progress, leave=False, desc="tokens", dynamic_ncols=True):
                one = step is not None and new.shape[1] == 1  # one position per row: the packed step
                h = step(new[:, 0], start, caches) if one else (self._run(new, start, caches) if use_cache
                                                                  else self._run(seq))[:, -1]
                start += new.shape[1]
                scale = cfg_scale(cfg, k, T, cfg_schedule) if guided or scale_input else None
                split = guided and independent and scale == 1.0  # the authors' token 0: rows not mixed at s_k = 1
                noise_k = noise.take(2 if split else 1) if isinstance(noise, SeededNoise) else noise[k].to(device)
                z = self.solve_token(h + self.pos_for_diff.weight[k], noise_k, None if split else scale,
                                     sampler, steps, temperature)
                tokens[:, k] = z[:B]
                if k + 1 < T:
                    new = self._latent_tokens(z[:, None])
                    new = new.repeat(2, 1, 1) if guided and not split else new
                    seq = torch.cat([seq, new], dim=1) if not use_cache else seq
        return tokens

    def _check_sampling(self, sampler: str, steps: int, cfg_schedule: str, first_token: str,
                        precision: str | None = None) -> bool:
        ARSampling(sampler=sampler, steps=steps, cfg_schedule=cfg_schedule, first_token=first_token,
                   precision=precision)
        return first_token == "independent"

    def solve_token(self, h: torch.Tensor, noise: torch.Tensor, scale: float | None, sampler: str = "euler_maruyama",
                    steps: int = 100, temperature: float = 1.0) -> torch.Tensor:
        """One token from its head conditions h [R, dim] (transformer output + target-position embedding).

        scale None: every row is solved on its own with its noise row, noise [R, draws, d] -> [R, d].
        scale s: h = [h_cond; h_null] (R = 2B) share noise [B, draws, d]; guided velocity -> [B, d].
        """
        z = self.head.sample(h, noise, scale, sampler, steps, temperature)
        if self.config.project_outputs:
            # Important: project onto the radius-R sphere after the solve and after CFG, for both the
            # next AR input and the decoder (SphereAR Sec. 3.2); never inside the solver.
            z = project(z, self.config.radius)
        return z

    def attach_decoder(self, decoder) -> None:
        """Use `decoder.decode(z [B, T, d]) -> images in [-1, 1]` (a Tokenizer) in generate_images.
        Kept outside the module tree, so it is never saved with the AR weights."""
        object.__setattr__(self, "_decoder", decoder)

    @torch.no_grad()
    def generate_images(self, labels, seeds: list[int], options: ARSampling | dict | None = None) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] for class `labels` [B] (ignored when unconditional); sample k is a
        function of seeds[k] alone. options: ARSampling, or a dict of its fields (an unknown key is an error)."""
        if self._decoder is None:
            raise UserError("no tokenizer attached to decode the AR samples; pass --tokenizer CKPT")
        opts = self.sampling_options(options)
        tokens = self.generate(labels, seeds, sampler=opts.sampler, steps=opts.steps,
                               cfg=None if opts.cfg == 1.0 else opts.cfg, cfg_schedule=opts.cfg_schedule,
                               temperature=opts.temperature, progress=opts.progress, first_token=opts.first_token,
                               precision=opts.precision)
        dec_device = next(self._decoder.parameters()).device if hasattr(self._decoder, "parameters") else None
        tokens = tokens.to(dec_device) if dec_device is not None else tokens
        # the decoder renormalises the (already projected) tokens unless the ablation turned projection off
        images = self._decoder.decode(tokens, project=self.config.project_outputs)
        return images.float().clamp(-1, 1)

    @staticmethod
    def sampling_options(options: ARSampling | dict | None = None) -> ARSampling:
        """ARSampling from itself, a dict of its fields, or None (the defaults)."""
        if isinstance(options, ARSampling):
            return options
        return from_dict(ARSampling, dict(options or {}), "")


def sampling_labels(labels, n: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """One class id per sample as a tensor on `device` (all the null class, num_classes, when unconditional);
    a UserError for a wrong count or an unknown class."""
    if num_classes == 0:
        return torch.full((n,), num_classes, dtype=torch.long, device=device)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) != n:
        raise UserError(f"{len(labels)} labels for {n} seeds; pass one class per sample")
    check_class_ids(labels.tolist(), num_classes)
    return labels.to(device)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, head, class embedding (works on the meta device)."""
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "head": sum(p.numel() for p in model.head.parameters()),
            "cls_embedding": model.cls_embedding.weight.numel()}


class SeededNoise:
    """Every image's noise from its own generator, in one order whatever the batch: token by token, the
    draws of its cond row, then (for a token solved per row) of its null row; `take` serves one token.

    One generator call per image draws many tokens at once (chunks of about 8 MB). When draws * dim is a
    multiple of 16, torch's CPU normal sampler (which fills whole blocks of 16 values) gives exactly the
    values of one call per token, so the chunking changes no sample; otherwise it draws one token per call.
    """

    def __init__(self, seeds: list[int], draws: int, dim: int, device: torch.device, tokens: int):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.draws, self.dim, self.device = draws, dim, device
        self.aligned = (draws * dim) % 16 == 0
        self.chunk = max(1, min(tokens + 1, (1 << 23) // (len(seeds) * draws * dim * 4))) if self.aligned else 1
        self.buf = torch.empty(len(seeds), 0, draws, dim, device=device)  # [B, draw sets, draws, d]

    def take(self, per_image: int = 1) -> torch.Tensor:
        """The next `per_image` draw sets of every image: [per_image * B, draws, d], row j * B + i holding image
        i's j-th set, stored step-major so that a solver step's slice [:, s] is contiguous."""
        if self.buf.shape[1] < per_image:
            n = max(per_image - self.buf.shape[1], self.chunk)
            fresh = torch.stack([self._draw(g, n) for g in self.gens])
            self.buf = torch.cat([self.buf, fresh.to(self.device)], dim=1)
        out, self.buf = self.buf[:, :per_image], self.buf[:, per_image:]
        # [B, j, draws, d] -> [draws, j * B, d] (contiguous) -> [j * B, draws, d]
        return out.permute(2, 1, 0, 3).reshape(self.draws, -1, self.dim).transpose(0, 1)

    def _draw(self, g: torch.Generator, n: int) -> torch.Tensor:
        if self.aligned:
            return torch.randn(n, self.draws, self.dim, generator=g)
        return torch.stack([torch.randn(self.draws, self.dim, generator=g) for _ in range(n)])


def cfg_scale(cfg: float, k: int, T: int, schedule: str) -> float:
    """s_k = s (constant) or 1 + (s - 1) k / T (linear, MAR's schedule in raster order)."""
    return cfg if schedule == "constant" else 1 + (cfg - 1) * k / T

