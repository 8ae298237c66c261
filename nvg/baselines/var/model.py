"""VAR transformer: next-scale prediction with AdaLN blocks (Tian et al., arXiv 2404.02905, §3.3).

Modified from: github.com/FoundationVision/VAR models/var.py (VAR), models/basic_var.py (FFN, AdaLNSelfAttn,
AdaLNBeforeHead). Parameter and buffer names follow the released `var_d{16,20,24,30}.pth`, which load with
`nvg.baselines.var.checkpoint.load_var`.

Sequence (256 px): the token maps of the scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), flattened row-major and
concatenated, L = 680 positions. Position 0 holds the start token (class embedding + pos_start); the positions of
scale k > 0 hold word_embed(area_down(f_hat_{<k}, pn_k)), the cumulative reconstruction of the coarser scales.
Every position adds a learned absolute position embedding and the embedding of its scale ("level"). The logits
at the positions of scale k predict the token map r_k.

Block (pre-norm, AdaLN from the class embedding c, six modulation vectors per block):
    gamma1, gamma2, scale1, scale2, shift1, shift2 = Linear(SiLU(c))
    x = x + gamma1 * attn(LN(x) * (1 + scale1) + shift1)
    x = x + gamma2 * ffn (LN(x) * (1 + scale2) + shift2)          LN without affine, eps 1e-6
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import KVCache, SelfAttention


@dataclass
class VARConfig:
    depth: int = 16
    width: int = 0  # 0: 64 * depth (released rule)
    num_heads: int = 0  # 0: depth (head_dim 64)
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # class id num_classes is the null class used for classifier-free guidance
    vocab_size: int = 4096  # must equal the tokenizer's
    latent_channels: int = 32  # tokenizer code width (VAR's Cvae)
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    drop_path_rate: float = 0.0  # stochastic depth, linear over the blocks; released training: 0.1 * depth / 24
    cond_drop_rate: float = 0.1  # training: a label becomes the null class with this probability
    norm_eps: float = 1e-6
    adaln_gamma_init: float = 1e-5  # the gate rows of each block's AdaLN start this small (VAR's `alng`)

    def __post_init__(self):
        self.width = self.width or 64 * self.depth
        self.num_heads = self.num_heads or self.depth
        self.patch_nums = tuple(self.patch_nums)
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @classmethod
    def from_name(cls, name: str, **overrides) -> VARConfig:
        """The preset `name` of VAR_PRESETS with `overrides` applied (as GeneratorConfig.from_name)."""
        if name not in VAR_PRESETS:
            raise ValueError(f"unknown VAR preset {name!r}; choose one of {sorted(VAR_PRESETS)}")
        return cls(**{**VAR_PRESETS[name], **overrides})


VAR_PRESETS: dict[str, dict] = {
    # released models (ImageNet 256 px, tokenizer var-vae-ch160); parameter counts without the tokenizer
    "var-d16": dict(depth=16, drop_path_rate=0.1 * 16 / 24, adaln_gamma_init=1e-3),  # 310M
    "var-d20": dict(depth=20, drop_path_rate=0.1 * 20 / 24, adaln_gamma_init=1e-3),  # 601M
    "var-d24": dict(depth=24, drop_path_rate=0.1 * 24 / 24, adaln_gamma_init=1e-4),  # 1.03B
    "var-d30": dict(depth=30, drop_path_rate=0.1 * 30 / 24, adaln_gamma_init=1e-5),  # 2.01B
    # CPU-sized model for 32 px images with the var-vae-tiny tokenizer (10 classes); depth and width as nvg-tiny,
    # ~1.37M parameters (nvg-tiny: 1.30M content + structure)
    "var-tiny": dict(depth=4, width=128, num_heads=2, num_classes=10, vocab_size=1024, latent_channels=16,
                     patch_nums=(1, 2, 3, 4, 6, 8), adaln_gamma_init=1e-3),
}


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BLC: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x_BLC), approximate="tanh"))


def drop_path(x_BLC: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a sample's branch with probability `rate`, scale survivors by 1 / (1 - rate)."""
    if rate == 0.0 or not training:
        return x_BLC
    keep_B11 = x_BLC.new_empty(x_BLC.shape[0], 1, 1).bernoulli_(1 - rate)
    return x_BLC * keep_B11 / (1 - rate)


class AdaLNSelfAttn(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float, norm_eps: float, drop_path_rate: float):
        super().__init__()
        self.width, self.drop_path_rate = width, drop_path_rate
        self.attn = SelfAttention(width, num_heads)
        self.ffn = FFN(width, round(width * mlp_ratio))
        self.ln = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # keys ada_lin.1.weight/bias

    def modulation(self, cond_BD: Tensor) -> Tensor:
        """(B, 6, 1, C): gamma1, gamma2, scale1, scale2, shift1, shift2 (constant over a sampling run)."""
        return self.ada_lin(cond_BD).view(-1, 6, 1, self.width)

    def forward(self, x_BLC: Tensor, mod_B61C: Tensor, **attn_args) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_B61C.unbind(1)
        h_BLC = self.attn(self.ln(x_BLC) * (scale1 + 1) + shift1, **attn_args)
        x_BLC = x_BLC + drop_path(h_BLC * gamma1, self.drop_path_rate, self.training)
        h_BLC = self.ffn(self.ln(x_BLC) * (scale2 + 1) + shift2)
        return x_BLC + drop_path(h_BLC * gamma2, self.drop_path_rate, self.training)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, norm_eps: float):
        super().__init__()
        self.width = width
        self.ln = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x_BLC: Tensor, cond_BD: Tensor) -> Tensor:
        scale_B1C, shift_B1C = self.ada_lin(cond_BD).view(-1, 2, 1, self.width).unbind(1)
        return self.ln(x_BLC) * (scale_B1C + 1) + shift_B1C


class VAR(nn.Module):
    def __init__(self, config: VARConfig | None = None):
        super().__init__()
        self.config = cfg = config or VARConfig()
        C, L = cfg.width, cfg.seq_len
        self.first_len = cfg.patch_nums[0] ** 2
        self.word_embed = nn.Linear(cfg.latent_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: null class
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_len, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))  # absolute positions over all scales
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)  # scale ("level") embedding
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear from 0
        self.blocks = nn.ModuleList([AdaLNSelfAttn(C, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, rates[i])
                                     for i in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        # Scale id of every position: the block ids of the block-causal mask (released key `lvl_1L`). The released
        # model also stores the additive mask `attn_bias_for_masking` (L x L of 0 / -inf); it is derived from these
        # ids, so it is not kept here (an EMA of -inf entries turns them into NaN): checkpoint.py checks it on load
        # and adds it back on export.
        scale_L = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", scale_L[None].clone())
        self.begin_ends = []  # [start, stop) of each scale in the sequence
        for pn in cfg.patch_nums:
            start = self.begin_ends[-1][1] if self.begin_ends else 0
            self.begin_ends.append((start, start + pn * pn))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, adaln_init: float = 0.5, head_init: float = 0.02) -> None:
        """Released init: trunc-normal std sqrt(1/(3C)) everywhere, head x0.02, residual outputs / sqrt(2 depth),
        AdaLN scale/shift rows x0.5 and gate rows x`adaln_gamma_init` (blocks start near the identity)."""
        C, depth = self.config.width, self.config.depth
        std = math.sqrt(1 / C / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(head_init)
        self.head_nm.ada_lin[1].weight.mul_(adaln_init)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            block.ada_lin[1].weight[2 * C:].mul_(adaln_init)
            block.ada_lin[1].weight[: 2 * C].mul_(self.config.adaln_gamma_init)

    def additive_mask(self) -> Tensor:
        """The released `attn_bias_for_masking` (1, 1, L, L): 0 where scale(key) <= scale(query), else -inf."""
        scale_L = self.lvl_1L[0]
        mask_LL = torch.where(scale_L[:, None] >= scale_L[None, :], 0.0, -torch.inf)
        return mask_LL.to(self.pos_1LC.dtype)[None, None]

    def level_position(self, start: int, stop: int) -> Tensor:
        """Scale embedding + absolute position embedding of positions [start, stop), (1, l, C)."""
        return self.lvl_embed(self.lvl_1L[:, start:stop]) + self.pos_1LC[:, start:stop]

    def logits(self, x_BLC: Tensor, cond_BD: Tensor) -> Tensor:
        """Final AdaLN + head, computed in fp32 (logits fp32 even under autocast), (B, L, V)."""
        with torch.autocast(x_BLC.device.type, enabled=False):
            return self.head(self.head_nm(x_BLC.float(), cond_BD.float()))

    def forward(self, labels_B: Tensor, x_BLCv: Tensor) -> Tensor:
        """Teacher-forced logits of all L positions, fp32 (B, L, V).

        Args:
            labels_B: long (B,) class ids in [0, num_classes]; during training each is replaced by the null class
                with probability cond_drop_rate.
            x_BLCv: float (B, L - pn_1^2, Cvae), the tokenizer's `indices_to_var_input` (scales 2..K).
        """
        cfg = self.config
        B = labels_B.shape[0]
        if x_BLCv.shape != (B, cfg.seq_len - self.first_len, cfg.latent_channels):
            raise ValueError(f"x_BLCv must be (B={B}, {cfg.seq_len - self.first_len}, {cfg.latent_channels}), "
                             f"got {tuple(x_BLCv.shape)}")
        if labels_B.dtype != torch.long or labels_B.ndim != 1:
            raise ValueError(f"labels must be long (B,), got {labels_B.dtype} {tuple(labels_B.shape)}")
        if self.training and cfg.cond_drop_rate > 0:
            drop_B = torch.rand(B, device=labels_B.device) < cfg.cond_drop_rate
            labels_B = torch.where(drop_B, cfg.num_classes, labels_B)
        cond_BD = self.class_emb(labels_B)
        with torch.autocast(x_BLCv.device.type, enabled=False):  # embeddings in fp32, as released
            sos_B1C = cond_BD[:, None].float() + self.pos_start
            x_BLC = torch.cat((sos_B1C, self.word_embed(x_BLCv.float())), 1) + self.level_position(0, cfg.seq_len)
        scale_L = self.lvl_1L[0]
        for block in self.blocks:
            x_BLC = block(x_BLC, block.modulation(cond_BD), q_block_L=scale_L, k_block_L=scale_L)
        return self.logits(x_BLC, cond_BD)

    def forward_scale(self, x_BlC: Tensor, scale: int, cond_BD: Tensor, mods: list[Tensor],
                      caches: list[KVCache]) -> Tensor:
        """One sampling step: the tokens of scale `scale` attend to the cached coarser scales; fp32 logits (B, l, V).

        x_BlC already includes the level/position embedding; `mods` are the blocks' modulations of cond_BD.
        """
        start = self.begin_ends[scale][0]
        for block, mod_B61C, cache in zip(self.blocks, mods, caches):
            x_BlC = block(x_BlC, mod_B61C, cache=cache, start=start)
        return self.logits(x_BlC, cond_BD)
