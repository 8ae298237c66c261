"""Building blocks of the NVG generator: FLUX-style parallel block, structure-aware RoPE, embedders, heads.

Paper: Next Visual Granularity Generation (arXiv 2508.12811), §2.2 and App. A.4.
Modified from: github.com/Yikai-Wang/nvg (nvg/modules/generatormodules/layers.py), itself modified from
FLUX (black-forest-labs/flux, `SingleStreamBlock`, `EmbedND`) and timm (`DropPath`).
Parameter names follow the official release so its state_dicts load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------------------
# Rotary position embedding with one rotation frequency set per id axis (FLUX `EmbedND`)


def rope_axes(head_dim: int, K: int) -> list[int]:
    """Rotary dims per id axis: [type] + [2] * K structure channels + [row, col].

    For head_dim 64 and K = 8 (16x16 latent) this is the official [8, 2 x 8, 20, 20]. Generalisation: each structure
    channel keeps 2 dims; each grid axis gets 20 * head_dim / 64 dims (even), reduced if needed so the type axis keeps
    at least 2; the type axis takes the rest. E.g. K = 6 (8x8 latent): [12, 2 x 6, 20, 20]; head_dim 32, K = 6:
    [4, 2 x 6, 8, 8].
    """
    grid = min(20 * head_dim // 64, (head_dim - 2 * K - 2) // 2)
    grid -= grid % 2
    type_dim = head_dim - 2 * K - 2 * grid
    if grid < 2 or type_dim < 2 or type_dim % 2:
        raise ValueError(f"head_dim {head_dim} is too small for RoPE over {K} structure channels + a 2-D grid "
                         f"(needs >= {2 * K + 6})")
    return [type_dim] + [2] * K + [grid, grid]


def rope_freqs(ids_BLA: Tensor, axes_dim: list[int], theta: float = 10_000.0) -> Tensor:
    """Unit rotations cos(a) + i sin(a) as complex64 (B, 1, L, head_dim/2), pairs ordered axis by axis.

    Angle of pair m of axis a = id_a * theta^(-2m / dim_a); computed in float32 like the official float32 `rope_ids`.
    """
    if ids_BLA.shape[-1] != len(axes_dim):
        raise ValueError(f"rope ids have {ids_BLA.shape[-1]} axes, expected {len(axes_dim)}")
    ids = ids_BLA.float()
    angles = []
    for a, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=ids.device) / dim)
        angles.append(ids[..., a, None] * omega)
    ang = torch.cat(angles, -1).unsqueeze(1)
    return torch.complex(torch.cos(ang), torch.sin(ang))


def rope_matrices(ids_BLA: Tensor, axes_dim: list[int], theta: float = 10_000.0) -> Tensor:
    """The same rotations in FLUX's layout (B, 1, L, head_dim/2, 2, 2) = [[cos, -sin], [sin, cos]] (for tests)."""
    f = rope_freqs(ids_BLA, axes_dim, theta)
    cos, sin = f.real, f.imag
    return torch.stack([cos, -sin, sin, cos], -1).unflatten(-1, (2, 2))


def apply_rope(x_BHLD: Tensor, freqs: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2m], x[2m+1]) of every head in float32: (cos x0 - sin x1, sin x0 + cos x1), as FLUX.

    `freqs` is complex (B, 1, L, D/2) (one complex product, fastest in eager mode) or its real view (B, 1, L, D/2, 2)
    = (cos, sin) (friendlier to torch.compile). Returns x's dtype.
    """
    if freqs.is_complex():
        x = torch.view_as_complex(x_BHLD.float().unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(x * freqs).flatten(-2).type_as(x_BHLD)
    x = x_BHLD.float().unflatten(-1, (-1, 2))
    x0, x1, cos, sin = x[..., 0], x[..., 1], freqs[..., 0], freqs[..., 1]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], -1).flatten(-2).type_as(x_BHLD)


def timestep_embedding(t: Tensor, dim: int = 64, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of time_factor * t, float32 (..., dim); t of any shape."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t).float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


# ----------------------------------------------------------------------------------------------------------------------
# Layers


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (the timestep MLP of the structure model)."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """x / rms(x) in float32 (eps 1e-6), cast back, times a learned scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class Modulation(nn.Module):
    """(shift, scale, gate) = Linear(SiLU(vec)), each (B, 1, w)."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, 3 * dim)

    def forward(self, vec_BC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.lin(F.silu(vec_BC))[:, None, :].chunk(3, -1)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability p, rescale survivors."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class ParallelBlock(nn.Module):
    """FLUX single-stream block: attention and MLP share one input projection and one output projection.

    x_mod = (1 + scale) * LayerNorm(x) + shift                      (LayerNorm without affine, eps 1e-6)
    [q k v | h] = linear1(x_mod)                                   (w -> 3w + mlp_ratio*w)
    x = x + drop_path(gate * linear2([SDPA(rope(rms(q)), rope(rms(k)), v) | gelu_tanh(h)]))
    Full bidirectional attention, no mask (`forward`). 15 w^2 parameters for mlp_ratio 4. `project` and `output` are
    the two halves around the attention, for callers with their own attention (the prefix structure transformer,
    nvg/prefix.py).
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.width, self.num_heads, self.head_dim = width, num_heads, width // num_heads
        self.mlp_hidden = int(width * mlp_ratio)
        self.linear1 = nn.Linear(width, 3 * width + self.mlp_hidden)
        self.linear2 = nn.Linear(width + self.mlp_hidden, width)
        self.norm = QKNorm(self.head_dim)
        self.modulation = Modulation(width)
        self.drop_path = drop_path

    def project(self, x_BLC: Tensor, vec_BC: Tensor, freqs: Tensor) -> tuple[Tensor, ...]:
        """Modulated input projection: (q, k, v) each (B, H, L, D) (q, k normed and rotated), MLP input h, gate."""
        B, L, _ = x_BLC.shape
        shift, scale, gate = self.modulation(vec_BC)
        x_mod = (1 + scale) * F.layer_norm(x_BLC, (self.width,), eps=1e-6) + shift
        qkv, h = self.linear1(x_mod).split([3 * self.width, self.mlp_hidden], -1)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, L, D)
        q = self.norm.query_norm(q).to(v.dtype)
        k = self.norm.key_norm(k).to(v.dtype)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        return q, k, v, h, gate

    def output(self, x_BLC: Tensor, attn_BHLD: Tensor, h: Tensor, gate: Tensor) -> Tensor:
        """x + drop_path(gate * linear2([attention | gelu(h)])) from `project`'s h, gate and the attention output."""
        B, L, _ = x_BLC.shape
        attn = attn_BHLD.transpose(1, 2).reshape(B, L, self.width)
        out = self.linear2(torch.cat([attn, F.gelu(h, approximate="tanh")], -1))
        return x_BLC + drop_path(gate * out, self.drop_path, self.training)

    def forward(self, x_BLC: Tensor, vec_BC: Tensor, freqs: Tensor) -> Tensor:
        q, k, v, h, gate = self.project(x_BLC, vec_BC, freqs)
        return self.output(x_BLC, F.scaled_dot_product_attention(q, k, v), h, gate)


class LastLayer(nn.Module):
    """AdaLN output head: Linear((1 + scale) * LayerNorm(x) + shift), (shift, scale) = Linear(SiLU(vec))."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.width = width
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x_BLC: Tensor, vec_BC: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec_BC)[:, None, :].chunk(2, -1)
        return self.linear((1 + scale) * F.layer_norm(x_BLC, (self.width,), eps=1e-6) + shift)


class LinearHead(nn.Module):
    """Plain linear head (the token head: cluster-mean delta (32) -> logits (vocab))."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)
