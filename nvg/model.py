"""NVG generator: content transformer f_c and half-width structure transformer f_s (rectified flow).

Paper: Next Visual Granularity Generation (arXiv 2508.12811), §2.2, App. A.4; spec §3.
Modified from: github.com/Yikai-Wang/nvg (`NVGformer` in nvg/modules/generatormodules/nvgflow.py).
Both transformers live in one module whose parameter and buffer names are the official ones (`content_blocks.*`,
`structure_blocks.*`, `x0_head.*`, `cls_head.*`, `rope_ids`, `scale_factors`, ...), so official state_dicts load as is.

Shapes: B batch, S = K+1 stages, N = 2**K latent positions (16x16 = 256, K = 8), C latent channels (32),
w content width (64 * depth), ws = w / 2 structure width, V vocabulary (4096).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .prefix import forward_structure_prefix
from .blocks import LastLayer, LinearHead, MLPEmbedder, ParallelBlock, rope_axes, rope_freqs, timestep_embedding
from .structure import rope_ids_content, rope_ids_structure, structure_embedding

# Official per-stage canvas normalisers sigma_0..sigma_8 and the final-canvas scale sigma_9 (16x16 latent, K = 8).
OFFICIAL_SCALE_FACTORS = (1.0, 4.1993, 3.4706, 3.0520, 2.7430, 2.4842, 2.2407, 2.0088, 1.7954, 1.6080)


def cfg_schedule(value, name: str) -> tuple[float, float]:
    """(start, end) CFG scales as floats; anything else (not two finite numbers) is refused by name."""
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
        raise ValueError(f"{name} must be two finite numbers (start, end), got {value!r}")
    return pair


@dataclass
class GeneratorConfig:
    depth: int = 16
    width: int = 0  # content width; 0 = 64 * depth (official)
    head_dim: int = 64  # both transformers; structure-aware RoPE axes are laid out for it
    mlp_ratio: float = 4.0
    structure_down_factor: int = 2  # structure width and heads = content's / this
    structure_depth: int = 0  # structure blocks; 0 = depth (official: both transformers have `depth` blocks)
    num_classes: int = 1000  # class id num_classes is the null class of classifier-free guidance
    vocab_size: int = 4096
    latent_dim: int = 32
    latent_hw: tuple[int, int] = (16, 16)  # h*w = 2**K positions -> K+1 stages
    drop_path: bool = True  # stochastic depth rising linearly 0 -> 0.1 * depth / 24 over the blocks
    # sigma_0..sigma_K canvas scales and the final-canvas scale; None = official (K = 8) or ones (set from data)
    scale_factors: tuple[float, ...] | None = None
    repa_dim: int = 0  # > 0 adds the training-only REPA projector (w -> 2048 -> 2048 -> repa_dim)
    repa_depth: int = 8  # REPA aligns the output of this content block
    # "full": the official structure transformer (every token attends to every token, one AdaLN vector with time);
    # "prefix": the fast variant of nvg/prefix.py (class + canvas tokens blind to the structure tokens and to time,
    # cached once per stage when sampling). Not interchangeable: weights of one do not work in the other.
    structure_attention: str = "full"
    # the sampler's default CFG schedules (start, end) for this model, recorded by its training run (nvg.sample's
    # --content-cfg / --structure-cfg when not given); None: the official (1, 3.5) / (1, 2.5)
    sample_content_cfg: tuple[float, float] | None = None
    sample_structure_cfg: tuple[float, float] | None = None
    # and its default structure-flow steps (None: the variant's, 25 official Euler steps or the fast variant's 2)
    sample_structure_steps: int | None = None

    def __post_init__(self):
        self.latent_hw = tuple(self.latent_hw)
        for name in ("sample_content_cfg", "sample_structure_cfg"):
            if getattr(self, name) is not None:
                setattr(self, name, cfg_schedule(getattr(self, name), name))
        steps = self.sample_structure_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"sample_structure_steps must be None or an integer >= 1, got {steps!r}")
        if self.width == 0:
            self.width = 64 * self.depth
        if self.structure_depth < 0:
            raise ValueError(f"structure_depth must be >= 0 (0 = depth), got {self.structure_depth}")
        if self.structure_attention not in STRUCTURE_ATTENTION:
            raise ValueError(f"structure_attention must be one of {STRUCTURE_ATTENTION}, got {self.structure_attention!r}")
        N = self.latent_hw[0] * self.latent_hw[1]
        if N < 4 or N & (N - 1):
            raise ValueError(f"latent h*w must be a power of two >= 4, got {self.latent_hw}")
        if self.width % self.head_dim or self.width % self.structure_down_factor:
            raise ValueError(f"width {self.width} must be a multiple of head_dim {self.head_dim} and of "
                             f"structure_down_factor {self.structure_down_factor}")
        if self.scale_factors is not None and len(self.scale_factors) != self.num_stages + 1:
            raise ValueError(f"scale_factors needs {self.num_stages + 1} values (stages + final), got "
                             f"{len(self.scale_factors)}")

    @property
    def num_positions(self) -> int:
        return self.latent_hw[0] * self.latent_hw[1]

    @property
    def K(self) -> int:  # structure channels = number of splits
        return int(math.log2(self.num_positions))

    @property
    def num_stages(self) -> int:
        return self.K + 1

    @property
    def num_heads(self) -> int:
        return self.width // self.head_dim

    @property
    def structure_width(self) -> int:
        return self.width // self.structure_down_factor

    @property
    def structure_heads(self) -> int:
        return max(1, self.num_heads // self.structure_down_factor)

    @classmethod
    def from_name(cls, name: str, **overrides) -> GeneratorConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown generator preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(cls(**PRESETS[name]), **overrides) if overrides else cls(**PRESETS[name])


STRUCTURE_ATTENTION = ("full", "prefix")

PRESETS: dict[str, dict] = {
    "nvg-d12": dict(depth=12),  # 108.4M content + 27.5M structure (paper ablations)
    "nvg-d16": dict(depth=16),  # 255.2M + 64.4M
    "nvg-d20": dict(depth=20),  # 496.6M + 125.0M
    "nvg-d24": dict(depth=24),  # 856.3M + 215.2M
    # CPU presets for the embedded Fashion-MNIST (latent size, vocabulary and classes come from the tokenizer)
    # head_dim 32: 4 content heads and 2 structure heads (with 64, the structure transformer has a single head)
    "nvg-tiny": dict(depth=2, width=128, head_dim=32, num_classes=10, vocab_size=1024, latent_dim=16,
                     latent_hw=(8, 8), drop_path=False),  # 0.55M content + 0.14M structure
    "nvg-test": dict(depth=1, width=128, num_classes=10, vocab_size=64, latent_dim=8, latent_hw=(4, 4),
                     drop_path=False),
}
# the fast variants (prefix-cacheable structure transformer, nvg/prefix.py): "nvg-tiny-fast", "nvg-d16-fast", ...
PRESETS.update({f"{name}-fast": dict(kw, structure_attention="prefix") for name, kw in list(PRESETS.items())
                if name != "nvg-test"})


# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class StructureContext:
    """Per-stage inputs of the structure transformer that do not change across Euler steps."""

    tokens_BLC: Tensor  # (B, 1+N, ws): class token + embedded canvas
    class_vec_BC: Tensor  # (B, ws): class embedding + stage embedding
    freqs: Tensor  # complex (B, 1, 1+2N, head_dim/2) RoPE rotations
    extras: dict = field(default_factory=dict)


def drop_path_rates(depth: int, on: bool) -> list[float]:
    """Official stochastic depth of `depth` blocks: rising linearly 0 -> 0.1 * depth / 24, or zeros."""
    return [0.1 * depth / 24 * i / max(depth - 1, 1) if on else 0.0 for i in range(depth)]


class NVGGenerator(nn.Module):
    """Content generator f_c + structure generator f_s with the official parameter layout."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.config = cfg
        K, N, C, w, ws = cfg.K, cfg.num_positions, cfg.latent_dim, cfg.width, cfg.structure_width
        S = cfg.num_stages
        dp = drop_path_rates(cfg.depth, cfg.drop_path)
        self.rope_axes = rope_axes(cfg.head_dim, K)
        if ws // cfg.structure_heads != cfg.head_dim:
            raise ValueError(f"structure head_dim {ws // cfg.structure_heads} != {cfg.head_dim}: use a width with an "
                             f"even number of heads")
        # content model
        self.content_start_embed = nn.Parameter(torch.randn(1, N, C))  # stage-0 input (the canvas is still empty)
        self.content_embed = nn.Linear(C, w)
        self.content_class_embed = nn.Embedding(cfg.num_classes + 1, w)
        self.content_stage_embed = nn.Embedding(S, w)
        self.content_blocks = nn.ModuleList([ParallelBlock(w, cfg.num_heads, cfg.mlp_ratio, dp[i])
                                             for i in range(cfg.depth)])
        self.x0_head = LastLayer(w, C)
        self.cls_head = LinearHead(C, cfg.vocab_size)
        # structure model (stages 0..K-2 are modelled; the last split is taken from the noise)
        self.structure_embed = nn.Linear(K, ws)
        self.structure_class_embed = nn.Embedding(cfg.num_classes + 1, ws)
        self.structure_content_cond_embed = nn.Linear(C, ws)
        self.structure_stage_embed = nn.Embedding(S - 2, ws)
        self.structure_time_embed = MLPEmbedder(64, ws)
        self.structure_blocks = nn.ModuleList([ParallelBlock(ws, cfg.structure_heads, cfg.mlp_ratio, p)
                                               for p in drop_path_rates(cfg.structure_depth or cfg.depth,
                                                                        cfg.drop_path)])
        self.structure_head = LastLayer(ws, K)
        if cfg.repa_dim > 0:
            self.projector = nn.Sequential(nn.Linear(w, 2048), nn.SiLU(), nn.Linear(2048, 2048), nn.SiLU(),
                                           nn.Linear(2048, cfg.repa_dim))
        # buffers kept for the official layout: base RoPE ids (structure axes 0) and the canvas scales
        base = rope_ids_content(torch.zeros(1, N, dtype=torch.long, device="cpu"), 0, K, cfg.latent_hw).float()
        base[:, 1:, 1:K + 1] = 0
        self.register_buffer("rope_ids", base)
        sf = cfg.scale_factors or (OFFICIAL_SCALE_FACTORS if K == 8 else (1.0,) * (S + 1))
        self.register_buffer("scale_factors", torch.tensor(sf, dtype=torch.float32, device="cpu"))
        self._init_weights()


    @classmethod
    def from_checkpoint(cls, path, ema: bool | None = None, device="cpu") -> NVGGenerator:
        """A generator written by `python -m nvg.train generator` (checkpoint or run directory), in eval mode, with
        its EMA weights when the run kept them (unless ema=False). Its tokenizer: nvg.sample.load_generator."""
        from . import checkpoint

        return checkpoint.load_model(path, "generator", lambda m: cls(GeneratorConfig(**m)), ema, device)[0]
    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (self.content_class_embed, self.content_stage_embed, self.structure_class_embed,
                    self.structure_stage_embed):
            nn.init.normal_(emb.weight, std=0.02)

    # ------------------------------------------------------------------------------------------------------ helpers
    def param_counts(self) -> tuple[int, int]:
        """(content, structure) parameter counts, REPA projector excluded (it is training-only)."""
        content = sum(p.numel() for n, p in self.named_parameters() if n.split(".")[0] in _CONTENT_PREFIXES)
        structure = sum(p.numel() for n, p in self.named_parameters() if n.startswith("structure_"))
        return content, structure

    def check_classes(self, y_B: Tensor) -> None:
        if y_B.dim() != 1 or y_B.dtype.is_floating_point:
            raise ValueError(f"class ids must be an integer tensor (B,), got {y_B.dtype} {tuple(y_B.shape)}")
        if torch.compiler.is_compiling():  # the value check is a host sync (a graph break): eager callers only
            return
        if y_B.numel() and (y_B.min() < 0 or y_B.max() > self.config.num_classes):
            raise ValueError(f"class ids must be in [0, {self.config.num_classes}] ({self.config.num_classes} = null class), "
                             f"got min {y_B.min().item()} max {y_B.max().item()}")

    def content_rope(self, labels_BN: Tensor, stage: int) -> tuple[Tensor, Tensor]:
        """(content ids (B, 1+N, K+3), complex RoPE rotations) of one stage's content pass."""
        ids = rope_ids_content(labels_BN, stage, self.config.K, self.config.latent_hw)
        return ids, rope_freqs(ids, self.rope_axes)

    def cluster_mean(self, x_BNC: Tensor, labels_BN: Tensor, n: int) -> Tensor:
        """Mean of x over each of the n clusters of labels (B, n, C) (= official one-hot bmm / counts)."""
        B, N, C = x_BNC.shape
        sums = x_BNC.new_zeros(B, n, C).scatter_add_(1, labels_BN.unsqueeze(-1).expand(B, N, C), x_BNC)
        return sums / (N // n)  # clusters are equal-size by construction

    # ------------------------------------------------------------------------------------------------------ content
    def content_input(self, canvas_BNC: Tensor, stage_B: Tensor) -> Tensor:
        """Content tokens before the class token: canvas * sigma_stage, or the learned start embedding at stage 0."""
        x = canvas_BNC * self.scale_factors[stage_B].view(-1, 1, 1).to(canvas_BNC.dtype)
        start = self.content_start_embed.expand_as(x).to(x.dtype)
        return torch.where((stage_B == 0).view(-1, 1, 1), start, x)

    def forward_content(self, canvas_BNC: Tensor, y_B: Tensor, stage_B: Tensor, freqs: Tensor,
                        return_layer: int = 0) -> tuple[Tensor, Tensor | None]:
        """Predicted final canvas x0_hat (B, N, C) of the content pass (+ block `return_layer` output if > 0)."""
        tokens = torch.cat([self.content_class_embed(y_B)[:, None], self.content_embed(
            self.content_input(canvas_BNC, stage_B))], 1)  # (B, 1+N, w)
        vec = self.content_class_embed(y_B) + self.content_stage_embed(stage_B)  # (B, w)
        hidden = None
        for i, block in enumerate(self.content_blocks):
            tokens = block(tokens, vec, freqs)
            if i + 1 == return_layer:
                hidden = tokens[:, 1:]
        return self.x0_head(tokens[:, 1:], vec) / self.scale_factors[-1], hidden

    def token_logits(self, x0_hat_BNC: Tensor, canvas_BNC: Tensor, labels_BN: Tensor, stage: int) -> Tensor:
        """Logits (B, 2**stage, V) = cls_head(per-cluster mean of (x0_hat - canvas))."""
        return self.cls_head(self.cluster_mean(x0_hat_BNC - canvas_BNC, labels_BN, 2**stage))

    # ---------------------------------------------------------------------------------------------------- structure
    def structure_context(self, canvas_BNC: Tensor, y_B: Tensor, stage_B: Tensor, content_ids: Tensor
                          ) -> StructureContext:
        """Step-invariant inputs of the structure pass: class token, canvas tokens (canvas after the stage, unscaled),
        class + stage conditioning and the RoPE of the stage."""
        ctx = self.structure_class_embed(y_B)  # (B, ws)
        tokens = torch.cat([ctx[:, None], self.structure_content_cond_embed(canvas_BNC)], 1)
        freqs = rope_freqs(rope_ids_structure(content_ids), self.rope_axes)
        return StructureContext(tokens, ctx + self.structure_stage_embed(stage_B), freqs)

    def forward_structure(self, sc: StructureContext, z_BNK: Tensor, t_B: Tensor) -> Tensor:
        """Velocity v (B, N, K) = eps - s of the rectified flow z_t = t eps + (1 - t) s at times t (B,)."""
        if self.config.structure_attention == "prefix":
            return forward_structure_prefix(self, sc, z_BNK, t_B)
        vec = sc.class_vec_BC + self.structure_time_embed(timestep_embedding(t_B, 64).to(z_BNK.dtype))
        tokens = torch.cat([sc.tokens_BLC, self.structure_embed(z_BNK)], 1)  # (B, 1+2N, ws)
        for block in self.structure_blocks:
            tokens = block(tokens, vec, sc.freqs)
        return self.structure_head(tokens[:, -self.config.num_positions:], vec)

    # -------------------------------------------------------------------------------------------- teacher forcing
    def forward(self, canvas_BSNC: Tensor, labels_BSN: Tensor, y_B: Tensor, eps_BNK: Tensor | None = None,
                t_BS: Tensor | None = None, generator: torch.Generator | None = None) -> dict:
        """Teacher-forced pass over all stages of a batch of visual granularity sequences (official `forward`).

        Content: B*S sequences (stage i sees canvas_i and labels s_i). Structure: B*(S-2) sequences (stage k sees the
        canvas after stage k, i.e. canvas_{k+1}, the known channels 0..k-1 and noise elsewhere, at a logit-normal t).
        Args:
            canvas_BSNC: float (B, S, N, C) canvas_i of each stage (canvas_0 = 0).
            labels_BSN: long (B, S, N) nested label maps.
            y_B: long (B,) class ids (num_classes = null).
            eps_BNK, t_BS: optional structure noise (B, N, K) and times (B, S-2) (drawn from `generator` if None:
                eps first, then u ~ N(0, 1) and t = sigmoid(u), the official order of draws).
        Returns: dict with x0_hat (B, S, N, C), logits (list of S tensors (B, 2**i, V)), struct_v and struct_pred
            (= eps - v) (B, S-2, N, K), struct_target (B, S-2, N, K) in {-1, 1}, eps_s, z_t, t, repa_hidden.
        """
        cfg = self.config
        B, S, N, C = canvas_BSNC.shape
        K, Ks = cfg.K, cfg.num_stages - 2
        if (S, N, C) != (cfg.num_stages, cfg.num_positions, cfg.latent_dim) or labels_BSN.shape != (B, S, N):
            raise ValueError(f"expected canvas (B, {cfg.num_stages}, {cfg.num_positions}, {cfg.latent_dim}) and labels "
                             f"(B, {cfg.num_stages}, {cfg.num_positions}), got {tuple(canvas_BSNC.shape)} and "
                             f"{tuple(labels_BSN.shape)}")
        self.check_classes(y_B)
        dev = canvas_BSNC.device
        labels = labels_BSN.long()
        stages = torch.arange(S, device=dev)
        # ---- content: B*S sequences
        ids = torch.stack([rope_ids_content(labels[:, i], i, K, cfg.latent_hw) for i in range(S)], 1)  # (B,S,1+N,A)
        freqs = rope_freqs(ids.flatten(0, 1), self.rope_axes)
        y_rep = y_B.repeat_interleave(S)
        stage_rep = stages.repeat(B)
        repa_layer = cfg.repa_depth if cfg.repa_dim > 0 else 0
        x0_hat, hidden = self.forward_content(canvas_BSNC.flatten(0, 1), y_rep, stage_rep, freqs, repa_layer)
        x0_hat = x0_hat.view(B, S, N, C)
        logits = [self.token_logits(x0_hat[:, i], canvas_BSNC[:, i], labels[:, i], i) for i in range(S)]
        # ---- structure: B*(S-2) sequences, data = full embedding of the finest labels in {-1, 1}
        s_gt = (structure_embedding(labels[:, -1], K, K).to(canvas_BSNC.dtype) - 1)[:, None].expand(B, Ks, N, K)
        if eps_BNK is None:
            eps_BNK = torch.randn(B, 1, N, K, generator=generator, device=dev).squeeze(1)
        if t_BS is None:
            t_BS = torch.sigmoid(torch.randn(B, Ks, 1, 1, generator=generator, device=dev)).view(B, Ks)
        known = torch.arange(K, device=dev).view(1, K) < torch.arange(Ks, device=dev).view(Ks, 1)  # (Ks, K)
        eps_s = torch.where(known[None, :, None, :], s_gt, eps_BNK[:, None].to(s_gt.dtype))  # (B, Ks, N, K)
        t = t_BS.to(s_gt.dtype)[..., None, None]
        z_t = t * eps_s + (1 - t) * s_gt
        sc = self.structure_context(canvas_BSNC[:, 1:-1].flatten(0, 1), y_B.repeat_interleave(Ks),
                                    stages[:Ks].repeat(B), ids[:, :Ks].flatten(0, 1))
        v = self.forward_structure(sc, z_t.flatten(0, 1), t_BS.flatten()).view(B, Ks, N, K)
        repa = self.projector(hidden).view(B, S, N, -1) if hidden is not None else None
        return dict(x0_hat=x0_hat, logits=logits, struct_v=v, struct_pred=eps_s - v, struct_target=s_gt,
                    eps_s=eps_s, z_t=z_t, t=t_BS, repa_projected=repa)


_CONTENT_PREFIXES = {"content_start_embed", "content_embed", "content_class_embed", "content_stage_embed",
                     "content_blocks", "x0_head", "cls_head"}


def generator_loss(out: dict, f_hat_BNC: Tensor, tokens: list[Tensor], repa_target: Tensor | None = None,
                   repa_weight: float = 0.5) -> tuple[Tensor, dict]:
    """Official training loss: (1/S) [sum_i (mse(x0_hat_i, f_hat) + CE_i (+ w_repa * REPA_i))
    + sum_k S/(S-2) * mse(struct_pred_k, struct_target_k)].

    Args:
        out: `NVGGenerator.forward` output.
        f_hat_BNC: final quantized latent (target of every stage).
        tokens: list of S long tensors (B, 2**i), the code of every cluster.
        repa_target: optional (B, N, D) normalised-ish DINOv2 patch features; uses out['repa_projected'].
    Returns: (loss, dict of detached 0-d tensors: final_i, ce_i, acc_i, struct_k, loss). No host sync: the training
        loop reads them on logging steps only.
    """
    S = len(out["logits"])
    terms, loss = {}, 0.0
    f_hat_BNC = f_hat_BNC.float()
    for i in range(S):
        final = F.mse_loss(out["x0_hat"][:, i].float(), f_hat_BNC)
        lg = out["logits"][i].flatten(0, 1).float()
        lg = lg - lg.amax(-1, keepdim=True).detach()
        target = tokens[i].flatten()
        ce = F.cross_entropy(lg, target)
        loss = loss + final + ce
        terms[f"final_{i}"], terms[f"ce_{i}"] = final.detach(), ce.detach()
        terms[f"acc_{i}"] = (lg.detach().argmax(-1) == target).float().mean()
        if repa_target is not None:
            proj = F.normalize(out["repa_projected"][:, i].float(), dim=-1)
            repa = 1 - (proj * F.normalize(repa_target, dim=-1)).sum(-1).mean()
            loss = loss + repa_weight * repa
            terms[f"repa_{i}"] = repa.detach()
    Ks = out["struct_pred"].shape[1]
    for k in range(Ks):
        st = F.mse_loss(out["struct_pred"][:, k].float(), out["struct_target"][:, k].float())
        loss = loss + st * S / Ks
        terms[f"struct_{k}"] = st.detach()
    loss = loss / S
    terms["loss"] = loss.detach()
    return loss, terms
