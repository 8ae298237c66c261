"""NVG sampler: 9 (K+1) stages of content (CFG on logits, top-k / top-p) and structure (25-step rectified flow, CFG on
the velocity, balanced top-half splits), chained like the official `generate_images` (spec §5, Alg. 2).

Modified from: github.com/Yikai-Wang/nvg (`NVGformer.generate`, `structure_sampling`, `sample`,
`top_k_top_p_filtering`, `get_schedule` in nvgflow.py; `negative_log_sequence`, `generate_images` in eval_gen.py /
generator.py), and HF transformers' `top_k_top_p_filtering`. Tokens are drawn by inverse CDF over the filter's sort
(`sample_tokens`; the official multinomial is `sample_tokens_ref`): the same distribution, another random stream.
Control (spec §7) is part of the same loop: fixed label maps for the first stages (structure-guided generation,
structure transfer) and fixed tokens for the first stages (stage-wise regeneration); see nvg/sample/control.py.
The command line (`python -m nvg.sample`) lives in nvg/sample/__main__.py.

    sampler = Sampler(generator, tokenizer)                  # fast=True: compiled passes (CUDA graphs on a GPU)
    images = sampler.sample(classes, SampleConfig(), seed=0)   # (B, 3, H, W) in [-1, 1]
    vgs = sampler.generate(classes, SampleConfig(), seed=0)    # the visual granularity sequences
VAR's sampler has the same call: nvg.baselines.var.sample.VARSampler(var, vae).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..categorical import check_top_k_top_p, draw_from_cdf
from ..model import NVGGenerator, cfg_schedule
from .fast import PrefixVelocity
from ..quantizer import VGS
from ..structure import check_nested, split_clusters, structure_embedding
from ..tokenizer import Tokenizer


STRUCTURE_SOLVERS = ("euler", "heun")
# structure-flow defaults (steps, solver) per structure transformer: the official 25 Euler steps for the official
# model; for the prefix-cacheable fast variant, the setting chosen from the quality-vs-steps table (README)
DEFAULT_STRUCTURE_SAMPLING = {"full": (25, "euler"), "prefix": (2, "euler")}
# CFG schedules (start, end) of the official evaluation, for models that record none of their own
OFFICIAL_CONTENT_CFG, OFFICIAL_STRUCTURE_CFG = (1.0, 3.5), (1.0, 2.5)


@dataclass
class SampleConfig:
    # CFG scales (start, end), linear over the stages, on the logits and on the structure velocity. None: the model's
    # own (GeneratorConfig.sample_content_cfg / sample_structure_cfg, recorded by its training run), else the official
    # (1, 3.5) and (1, 2.5)
    content_cfg: tuple[float, float] | None = None
    structure_cfg: tuple[float, float] | None = None
    top_p: tuple[float, float] = (1.0, 0.5)  # nucleus mass in (0, 1], falling log-wise over the stages; 1.0 = off
    top_k: int = 0  # 0 = off; 1 = argmax (deterministic, ignores temperature and top-p)
    temperature: float = 1.0
    structure_steps: int | None = None  # solver steps of the structure flow per stage (None: the model's default)
    structure_solver: str | None = None  # "euler" (official) or "heun" (2nd order, two velocity evaluations / step)
    gumbel_split: bool = False  # Gumbel top-k instead of deterministic top-k when splitting clusters
    always_cfg: bool = False  # also run the unconditional pass at scale 1 (official); off = skip it (same result)

    def __post_init__(self):
        for name in ("content_cfg", "structure_cfg"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, cfg_schedule(v, name))
        if self.structure_steps is not None and self.structure_steps < 1:
            raise ValueError(f"structure_steps must be >= 1, got {self.structure_steps}")
        if self.structure_solver is not None and self.structure_solver not in STRUCTURE_SOLVERS:
            raise ValueError(f"structure_solver must be one of {STRUCTURE_SOLVERS}, got {self.structure_solver!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for top_p in self.top_p:
            check_top_k_top_p(self.top_k, top_p)

    def resolved(self, model_config) -> SampleConfig:
        """These settings with the unset ones filled in for the model: the structure flow's steps (the model's
        recorded ones, else the official 25 for the official structure transformer and DEFAULT_STRUCTURE_SAMPLING
        ["prefix"] for the fast one), its solver (Euler) and the CFG schedules (the model's recorded ones, else the
        official)."""
        steps, solver = DEFAULT_STRUCTURE_SAMPLING[getattr(model_config, "structure_attention", "full")]
        steps = getattr(model_config, "sample_structure_steps", None) or steps
        content = self.content_cfg or getattr(model_config, "sample_content_cfg", None) or OFFICIAL_CONTENT_CFG
        structure = self.structure_cfg or getattr(model_config, "sample_structure_cfg", None) or OFFICIAL_STRUCTURE_CFG
        return replace(self, structure_steps=self.structure_steps or steps, structure_solver=self.structure_solver
                       or solver, content_cfg=tuple(content), structure_cfg=tuple(structure))


# ----------------------------------------------------------------------------------------------------------------------
# Schedules


def linear_schedule(start: float, end: float, num: int) -> list[float]:
    """Per-stage scales linspace(start, end, num) (official CFG schedules)."""
    return np.linspace(start, end, num).tolist()


def negative_log_sequence(start: float, end: float, num: int) -> list[float]:
    """Values falling from start to end along -logspace(0, log(num-1), num) rescaled (official top-p schedule)."""
    if num == 1:
        return [start]
    vals = -np.logspace(0, np.log(num - 1), num=num, base=np.e)
    vals = (vals - vals.min()) / (vals.max() - vals.min())
    return (vals * (start - end) + end).tolist()


def time_schedule(steps: int, seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> list[float]:
    """Euler time grid 1 -> 0 (steps + 1 values), FLUX-shifted: t' = e^mu / (e^mu + 1/t - 1), mu linear in seq_len
    (0.5 at 256 positions, 1.15 at 4096). float32 like the official `get_schedule`."""
    mu = base_shift + (max_shift - base_shift) / (4096 - 256) * (seq_len - 256)
    t = torch.linspace(1, 0, steps + 1)
    return (math.exp(mu) / (math.exp(mu) + (1 / t - 1))).tolist()


def filter_top_k_top_p(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits with the tokens outside the top-k and outside the smallest set of mass >= top_p set to -inf.

    The first token whose cumulative probability exceeds top_p is kept (nucleus filtering, Holtzman et al.).
    top_k = 0 and top_p = 1.0 are off; top_p must be in (0, 1].
    """
    check_top_k_top_p(top_k, top_p)
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        logits[logits < kth] = -float("inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        remove = F.softmax(sorted_logits, -1).cumsum(-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(-1, order, remove)] = -float("inf")
    return logits


def sample_tokens(logits_BnV: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """One token per cluster (B, n): argmax when top_k == 1, else a draw from softmax(filter(logits / T)).

    The distribution of `sample_tokens_ref`, drawn by inverse CDF over one descending sort (`nvg.categorical`): the
    top-k (ties with the k-th kept) and top-p sets are the leading run of the sort, found with the same sorted softmax
    and running sum as `filter_top_k_top_p`.
    """
    if top_k == 1:
        return logits_BnV.argmax(-1)
    check_top_k_top_p(top_k, top_p)
    B, n, V = logits_BnV.shape
    x = logits_BnV.float().reshape(B * n, V) / max(temperature, 1e-5)
    if top_k == 0 and top_p == 1.0:
        return draw_from_cdf(F.softmax(x, -1).cumsum(-1), 0, V, generator).view(B, n)
    x, order = torch.sort(x, descending=True)
    keep = torch.full((B * n,), V, dtype=torch.long, device=x.device)
    if top_k > 0:  # the filter keeps every logit >= the k-th largest
        keep = (x >= x[:, min(top_k, V) - 1:min(top_k, V)]).sum(-1)
        x = x.masked_fill(torch.arange(V, device=x.device) >= keep[:, None], -float("inf"))
    cum = F.softmax(x, -1).cumsum(-1)
    if top_p < 1.0:  # the first token whose running mass exceeds top_p is the last one kept
        keep = torch.minimum(keep, 1 + (cum[:, :-1] <= top_p).sum(-1))
    return order.gather(1, draw_from_cdf(cum, 0, keep, generator)[:, None]).view(B, n)


def sample_tokens_ref(logits_BnV: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> Tensor:
    """Reference of `sample_tokens` (the official way): multinomial of softmax(filter_top_k_top_p(logits / T))."""
    if top_k == 1:
        return logits_BnV.argmax(-1)
    B, n, V = logits_BnV.shape
    probs = F.softmax(filter_top_k_top_p(logits_BnV.float() / max(temperature, 1e-5), top_k, top_p), -1)
    return torch.multinomial(probs.view(B * n, V), 1, generator=generator).view(B, n)


# ----------------------------------------------------------------------------------------------------------------------
# The sampler


def _cfg_mix(out: Tensor, B: int, scale: float) -> Tensor:
    """uncond + scale * (cond - uncond) for a batch stacked as [cond; uncond], or out itself when not doubled."""
    if out.shape[0] == B:
        return out
    cond, uncond = out[:B], out[B:]
    return uncond + (cond - uncond) * scale


class Sampler:
    """Faithful NVG sampler for one generator + tokenizer pair (the tokenizer's quantizer embeds the sampled tokens,
    its decoder turns them into images in `sample`).

    `fast=True` runs the two transformer passes through `torch.compile` (CUDA graphs on a GPU: every stage has the
    same shapes, so one graph per pass serves all stages); it computes the same function as the plain path.
    A generator with the prefix structure transformer (GeneratorConfig(structure_attention="prefix"), nvg/prefix.py)
    runs its class + canvas prefix once per stage into static KV caches and each flow step on the N structure tokens
    only (`structure_cache=False`: recompute the whole sequence at every step instead; the same result).
    """

    def __init__(self, model: NVGGenerator, tokenizer: Tokenizer, fast: bool = False, structure_cache: bool = True):
        cfg, quantizer = model.config, tokenizer.quantize
        if quantizer.num_stages != cfg.num_stages or quantizer.dim != cfg.latent_dim or \
                quantizer.codebook_size != cfg.vocab_size:
            raise ValueError(f"generator (stages {cfg.num_stages}, C {cfg.latent_dim}, V {cfg.vocab_size}) does not "
                             f"fit the quantizer (stages {quantizer.num_stages}, C {quantizer.dim}, "
                             f"V {quantizer.codebook_size})")
        self.model, self.tokenizer, self.quantizer, self.fast = model, tokenizer, quantizer, fast
        self._prefix = PrefixVelocity(model, graphs=fast) if (
            cfg.structure_attention == "prefix" and structure_cache) else None
        self._content = model.forward_content
        self._structure = model.forward_structure
        if fast:
            self._cuda_graphs = next(model.parameters()).is_cuda
            mode = "reduce-overhead" if self._cuda_graphs else None
            self._content_c = torch.compile(model.forward_content, dynamic=False, mode=mode)
            self._structure_c = torch.compile(model.forward_structure, dynamic=False, mode=mode)
            self._content, self._structure = self._content_fast, self._structure_fast

    # compiled passes: real (cos, sin) rotations instead of complex ones; outputs cloned because CUDA-graph replays
    # reuse their output buffers
    def _content_fast(self, canvas, y, stage_B, freqs):
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        x0_hat, _ = self._content_c(canvas, y, stage_B, torch.view_as_real(freqs))
        return x0_hat.clone(), None

    def _structure_fast(self, sc, z, t):
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if sc.freqs.is_complex():
            sc.freqs = torch.view_as_real(sc.freqs).contiguous()
        return self._structure_c(sc, z, t).clone()

    # -------------------------------------------------------------------------------------------------- one stage
    def content_stage(self, canvas_BNC, labels_BN, y_B, stage, scale, use_cfg):
        """Content pass of one stage -> (x0_hat of the conditional half (B, N, C), post-CFG logits (B, 2**i, V))."""
        m, B = self.model, y_B.shape[0]
        if use_cfg:
            y2 = torch.cat([y_B, torch.full_like(y_B, m.config.num_classes)])
            canvas2, labels2 = canvas_BNC.repeat(2, 1, 1), labels_BN.repeat(2, 1)
        else:
            y2, canvas2, labels2 = y_B, canvas_BNC, labels_BN
        ids, freqs = m.content_rope(labels2, stage)
        x0_hat, _ = self._content(canvas2, y2, torch.full_like(y2, stage), freqs)
        logits = m.token_logits(x0_hat.float(), canvas2.float(), labels2, stage)
        return x0_hat[:B], _cfg_mix(logits, B, scale), ids[:B]

    def structure_stage(self, canvas_next_BNC, labels_BN, content_ids, y_B, eps_BNK, stage, scale, use_cfg, times,
                        gumbel=False, generator=None, trace=None, solver="euler"):
        """Rectified-flow inpainting of the structure embedding given the canvas after `stage` -> labels of stage+1."""
        m, B, K = self.model, y_B.shape[0], self.model.config.K
        if stage == K - 1:  # two positions per parent: split by the fixed noise, no model (official)
            if trace is not None:
                trace.setdefault("z_final_ch", []).append(eps_BNK[..., stage].clone())
            return split_clusters(labels_BN, eps_BNK[..., stage], stage)
        s = structure_embedding(labels_BN, stage, K).to(eps_BNK.dtype) - 1  # (B, N, K) in {-1, 0, 1}
        z = torch.cat([s[..., :stage], eps_BNK[..., stage:]], -1)
        if use_cfg:
            y2 = torch.cat([y_B, torch.full_like(y_B, m.config.num_classes)])
            canvas2, ids2 = canvas_next_BNC.repeat(2, 1, 1), content_ids.repeat(2, 1, 1)
        else:
            y2, canvas2, ids2 = y_B, canvas_next_BNC, content_ids
        sc = m.structure_context(canvas2, y2, torch.full_like(y2, stage), ids2)
        if self._prefix is not None:
            velocity = self._prefix.stage(sc)
        else:
            def velocity(z2, t):
                return self._structure(sc, z2, torch.full((z2.shape[0],), t, device=z2.device))
        vs = []

        def cfg_velocity(z, t):
            v_all = velocity(z.repeat(2, 1, 1) if use_cfg else z, t)
            if trace is not None:
                vs.append(v_all.float())
            return _cfg_mix(v_all.float(), B, scale)

        for t_curr, t_next in zip(times[:-1], times[1:]):
            v = cfg_velocity(z, t_curr)
            if solver == "heun":  # trapezoid of the velocities at both ends of the Euler prediction
                z_pred = torch.cat([s[..., :stage], (z + (t_next - t_curr) * v)[..., stage:]], -1)
                v = (v + cfg_velocity(z_pred, t_next)) / 2
            z = z + (t_next - t_curr) * v
            z = torch.cat([s[..., :stage], z[..., stage:]], -1)  # known channels stay at the truth
        if trace is not None:
            trace.setdefault("v_first", []).append(vs[0])
            trace.setdefault("v_last", []).append(vs[-1])
            trace.setdefault("z_final_ch", []).append(z[..., stage].clone())
        return split_clusters(labels_BN, z[..., stage], stage, gumbel=gumbel, generator=generator)

    # -------------------------------------------------------------------------------------------------- all stages
    @torch.no_grad()
    def generate(self, classes_B: Tensor, config: SampleConfig | None = None, *, seed: int | None = None,
                 generator: torch.Generator | None = None, eps_BNK: Tensor | None = None,
                 structure: Tensor | None = None, tokens: list[Tensor] | None = None,
                 trace: dict | None = None) -> VGS:
        """Sample a batch of visual granularity sequences.

        Args:
            classes_B: long (B,) class ids in [0, num_classes) (num_classes = unconditional).
            config: sampling settings (unset ones: the model's defaults, see SampleConfig.resolved).
            seed / generator: randomness (structure noise, token sampling, Gumbel splits); same seed, same output.
            eps_BNK: the structure noise (B, N, K) drawn once per image (default N(0, 1) from the generator).
            structure: long (B, S', N) nested label maps for stages 0..S'-1 to use instead of sampling them.
            tokens: list of T long tensors (B, 2**i) of fixed content for stages 0..T-1 (T <= S'; needs `structure`).
            trace: a dict to receive per-stage internals (x0_hat, logits, v_first, v_last, z_final_ch).
        Returns:
            VGS with tokens (list of (B, 2**i)), labels (B, S, N), canvas (B, S, N, C) (stage inputs), f_hat (B, N, C).
        """
        sc = (config or SampleConfig()).resolved(self.model.config)
        m, q, cfg = self.model, self.quantizer, self.model.config
        S, N, K, C = cfg.num_stages, cfg.num_positions, cfg.K, cfg.latent_dim
        dev = next(m.parameters()).device
        classes_B = torch.as_tensor(classes_B, device=dev)
        m.check_classes(classes_B)
        B = classes_B.shape[0]
        if generator is None:
            generator = torch.Generator(dev)
            if seed is not None:
                generator.manual_seed(seed)
            else:
                generator.seed()
        fixed_S = self._check_control(structure, tokens, B, S, N, dev)
        if eps_BNK is None:
            eps_BNK = torch.randn(B, N, K, generator=generator, device=dev)
        if eps_BNK.shape != (B, N, K):
            raise ValueError(f"eps_BNK must be ({B}, {N}, {K}), got {tuple(eps_BNK.shape)}")
        ccfg = linear_schedule(*sc.content_cfg, S)
        scfg = linear_schedule(*sc.structure_cfg, S)
        top_p = negative_log_sequence(*sc.top_p, S)
        times = time_schedule(sc.structure_steps, N)

        canvas = torch.zeros(B, N, C, device=dev)
        labels = structure[:, 0].to(dev) if fixed_S else torch.zeros(B, N, dtype=torch.long, device=dev)
        all_tokens, all_labels, all_canvas = [], [], []
        for i in range(S):
            all_labels.append(labels)
            all_canvas.append(canvas)
            use_c = ccfg[i] != 1.0 or sc.always_cfg
            if tokens is not None and i < len(tokens):
                tok = tokens[i].to(dev)
                ids = m.content_rope(labels, i)[0]
            else:
                x0_hat, logits, ids = self.content_stage(canvas, labels, classes_B, i, ccfg[i], use_c)
                tok = sample_tokens(logits, sc.temperature, sc.top_k, top_p[i], generator)
                if trace is not None:
                    trace.setdefault("x0_hat", []).append(x0_hat.float())
                    trace.setdefault("logits", []).append(logits)
            canvas = canvas + q.embed_stage(i, tok, labels).float()
            all_tokens.append(tok)
            if i + 1 < fixed_S:
                labels = structure[:, i + 1].to(dev)
            elif i < S - 1:
                use_s = scfg[i] != 1.0 or sc.always_cfg
                labels = self.structure_stage(canvas, labels, ids, classes_B, eps_BNK, i, scfg[i], use_s, times,
                                              sc.gumbel_split, generator, trace, sc.structure_solver)
        return VGS(tokens=all_tokens, labels=torch.stack(all_labels, 1), canvas=torch.stack(all_canvas, 1),
                   f_hat=canvas)

    @torch.no_grad()
    def sample(self, classes_B: Tensor, config: SampleConfig | None = None, *, seed: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Class-conditional images (B, 3, H, W) in [-1, 1], fp32: `generate`, then the tokenizer decodes f_hat."""
        vgs = self.generate(classes_B, config, seed=seed, generator=generator)
        return self.tokenizer.decode(vgs.f_hat.float()).float()

    @staticmethod
    def _check_control(structure, tokens, B, S, N, dev) -> int:
        """Validate fixed label maps / tokens; returns the number S' of stages with a fixed label map."""
        if structure is None:
            if tokens is not None:
                raise ValueError("fixed tokens need the label maps of their stages (pass `structure`)")
            return 0
        if (structure.dim() != 3 or structure.shape[0] != B or structure.shape[2] != N
                or not 1 <= structure.shape[1] <= S):
            raise ValueError(f"structure must be (B={B}, S' in 1..{S}, N={N}) label maps, got {tuple(structure.shape)}")
        check_nested(structure, "structure")
        if tokens is not None:
            if len(tokens) > structure.shape[1]:
                raise ValueError(f"{len(tokens)} stages of fixed tokens need at least as many label maps, got "
                                 f"{structure.shape[1]}")
            for i, t in enumerate(tokens):
                if tuple(t.shape) != (B, 2**i):
                    raise ValueError(f"fixed tokens of stage {i} must be ({B}, {2**i}), got {tuple(t.shape)}")
        return structure.shape[1]

