"""Sampling: the NVG sampler (content and structure passes, chained stage by stage) and structure control.

    from nvg.sample import Sampler, SampleConfig
    from nvg.sample import structure_guided, structure_transfer, regenerate

The command line is `python -m nvg.sample` (nvg/sample/__main__.py).
"""
from .control import regenerate, structure_guided, structure_transfer
from .loading import load_generator, load_tokenizer
from .sampler import SampleConfig, Sampler

__all__ = ["Sampler", "SampleConfig", "load_generator", "load_tokenizer", "structure_guided", "structure_transfer", "regenerate"]
