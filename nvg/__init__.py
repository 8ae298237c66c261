"""NVG: Next Visual Granularity generation (Wang et al., arXiv 2508.12811, ICLR 2026).

Importing the package loads the compiled op library `nvg._C`, which registers `torch.ops.nvg.*`.
"""
import torch  # noqa: F401  (the op library links against torch)

try:
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "nvg's compiled ops (nvg._C) are missing or were built against another torch: "
        "rebuild with `pip install -e .` (or `pip install -e . --no-build-isolation`)"
    ) from e

from . import ops  # noqa: E402,F401

__version__ = "0.1.0"
