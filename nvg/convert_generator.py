"""Load generator weights laid out like the official NVG release into `NVGGenerator`.

The official checkpoint (`NVGenerator` Lightning module) stores the generator under `nvgformer.*` and its EMA copy under
`ema_model.nvgformer.*`, next to the autoencoder (`first_stage_model.*`) and the DINOv2 teacher (`repa_encoder.*`).
`NVGGenerator` uses the official parameter names, so conversion = choosing the prefix, dropping the other modules and
checking every key and shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import GeneratorConfig, NVGGenerator

_OTHER_MODULES = ("first_stage_model.", "repa_encoder.", "cond_stage_model.")


def select_generator_keys(state_dict: dict, ema: bool = False) -> dict[str, Tensor]:
    """The generator's own keys (official names without prefix) from a flat or full-checkpoint state_dict."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    prefix = "ema_model.nvgformer." if ema else "nvgformer."
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if ema:
        raise KeyError("ema=True but the state_dict has no 'ema_model.nvgformer.*' keys")
    return {k: v for k, v in state_dict.items() if not k.startswith(_OTHER_MODULES + ("ema_model.",))}


def infer_config(sd: dict[str, Tensor], **overrides) -> GeneratorConfig:
    """Generator configuration implied by the shapes of an official state_dict."""
    for key in ("content_embed.weight", "cls_head.linear.weight", "content_class_embed.weight",
                "content_start_embed", "structure_embed.weight"):
        if key not in sd:
            raise KeyError(f"official generator state_dict is missing {key!r}")
    width, latent_dim = sd["content_embed.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("content_blocks.")})
    N = sd["content_start_embed"].shape[1]
    side = int(round(N**0.5))
    if side * side != N:
        raise ValueError(f"content_start_embed has {N} positions, not a square latent")
    kw = dict(depth=depth, width=width, latent_dim=latent_dim, latent_hw=(side, side),
              vocab_size=sd["cls_head.linear.weight"].shape[0],
              num_classes=sd["content_class_embed.weight"].shape[0] - 1,
              structure_down_factor=width // sd["structure_embed.weight"].shape[0],
              scale_factors=tuple(sd["scale_factors"].tolist()) if "scale_factors" in sd else None)
    if "projector.4.weight" in sd:
        kw["repa_dim"] = sd["projector.4.weight"].shape[0]
    kw.update(overrides)
    return GeneratorConfig(**kw)


def load_official_generator(state_dict: dict, cfg: GeneratorConfig | None = None, ema: bool = False,
                            keep_projector: bool = False) -> NVGGenerator:
    """Build an `NVGGenerator` and load official weights into it, strictly.

    Args:
        state_dict: flat generator state_dict (official key names), or a full official checkpoint
            (`{'state_dict': {'nvgformer.*', 'ema_model.nvgformer.*', ...}}`).
        cfg: configuration; None infers it from the shapes.
        ema: take the EMA weights (`ema_model.nvgformer.*`), as the official evaluation does with `--eval_ema`.
        keep_projector: keep the training-only REPA projector (`projector.*`) instead of dropping it.
    Raises:
        KeyError / ValueError naming the first missing, unexpected or wrong-shaped key.
    """
    sd = select_generator_keys(state_dict, ema=ema)
    if not keep_projector:
        sd = {k: v for k, v in sd.items() if not k.startswith("projector.")}
    if cfg is None:
        cfg = infer_config(sd, **({} if keep_projector else {"repa_dim": 0}))
    if cfg.structure_attention != "full":
        raise ValueError(f"official generator weights are for the official full-attention structure transformer; "
                         f"they do not fit structure_attention={cfg.structure_attention!r} (train that variant "
                         f"instead: python -m nvg.train generator --preset nvg-d16-fast)")
    with torch.device("meta"):
        model = NVGGenerator(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise KeyError(f"official generator state_dict is missing {len(missing)} key(s), first {missing[0]!r}")
    if unexpected:
        raise KeyError(f"official generator state_dict has {len(unexpected)} unexpected key(s), first "
                       f"{unexpected[0]!r}")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"official generator key {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    base = expected["rope_ids"]
    if not torch.equal(sd["rope_ids"].float().cpu(), base.float().cpu()):
        raise ValueError("official generator buffer 'rope_ids' differs from the class/grid ids this code builds")
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    return model.eval()
