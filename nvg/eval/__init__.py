"""Offline evaluation: feature networks (FD-proxy CNN, Inception-v3), metrics (Fréchet distance, precision/recall,
PSNR/SSIM, codebook usage), sample evaluation with floors, and tokenizer evaluation. Nothing is downloaded.

The command line is `python -m nvg.eval` (nvg/eval/__main__.py).
"""
from .samples import evaluate_samples, format_rows, load_images

__all__ = ["evaluate_samples", "format_rows", "load_images"]
