"""Image and distribution metrics: PSNR, SSIM, codebook usage, Frechet distance, k-NN precision/recall.

Low-level module: depends only on torch (numpy inputs are accepted where noted).
References: SSIM (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03); Frechet distance
(Dowson & Landau 1982, as used by FID, Heusel et al. 2017); improved precision/recall (Kynkaanniemi et al. 2019).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


def _check_pair(a: torch.Tensor, b: torch.Tensor, fn: str) -> None:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TypeError(f"{fn} expects two tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"{fn} expects two image batches of the same shape [B,C,H,W], got {list(a.shape)} and "
                         f"{list(b.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"{fn} expects float images in [-1, 1], got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{fn}: images on different devices ({a.device} and {b.device})")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on the [0, 1] scale (take `.mean()` for the batch mean).

    Args:
        a, b: float [B,C,H,W] in [-1, 1]. Equivalent to 10 log10(1 / mse((a+1)/2, (b+1)/2)) per image;
            the MSE is floored at 1e-10, so identical images give 100 dB rather than infinity.
    Returns:
        float32 [B].
    """
    _check_pair(a, b, "psnr")
    mse = ((a.float() - b.float()) / 2).square().flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-t.square() / (2 * sigma * sigma))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM on the [0, 1] scale, averaged over channels and valid window positions (take `.mean()`).

    Args:
        a, b: float [B,C,H,W] in [-1, 1]. The Gaussian window is shrunk to the largest odd size <= min(H, W)
            for images smaller than `window`.
    Returns:
        float32 [B].
    """
    _check_pair(a, b, "ssim")
    x, y = (a.double() + 1) / 2, (b.double() + 1) / 2  # float64: the variances below are differences of squares
    c = x.shape[1]
    size = min(window, x.shape[2], x.shape[3])
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma, x.device)
    k = (g[:, None] * g[None, :]).expand(c, 1, size, size)  # depthwise 2-D window

    def blur(t):
        return F.conv2d(t, k, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def codebook_usage(ids, vocab_size: int) -> dict:
    """How much of a codebook a set of token ids uses.

    Args:
        ids: integer tensor of any shape (or a list of them, pooled), values in [0, vocab_size).
        vocab_size: codebook size V.
    Returns:
        {"used": distinct codes, "usage": used / V, "perplexity": exp(entropy of the code histogram), "count": N}.
        Perplexity equals V for a uniform use of the codebook and 1 when one code is used.
    """
    if isinstance(ids, list | tuple):
        ids = torch.cat([torch.as_tensor(t).flatten() for t in ids]) if ids else torch.zeros(0, dtype=torch.long)
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"codebook_usage expects integer ids, got {ids.dtype}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    ids = ids.flatten().long()
    if ids.numel() == 0:
        raise ValueError("codebook_usage got no ids")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"ids must lie in [0, {vocab_size}), got range [{lo}, {hi}]")
    counts = torch.bincount(ids.cpu(), minlength=vocab_size).double()
    p = counts[counts > 0] / ids.numel()
    used = int((counts > 0).sum())
    return {"used": used, "usage": used / vocab_size, "perplexity": math.exp(float(-(p * p.log()).sum())),
            "count": ids.numel()}


def _as_f64(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite values")
    return t


def feature_stats(feats) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D,D] (float64) of features [N,D], N >= 2."""
    f = _as_f64(feats, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N>=2, D], got {list(f.shape)}")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """Frechet distance between Gaussians N(mu1, s1) and N(mu2, s2), in float64.

    Equivalent to |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)). The last trace is computed without scipy as
    the sum of the square roots of the eigenvalues of the PSD matrix L^T s2 L, where s1 = L L^T (Cholesky; the
    symmetric square root of s1 when s1 is singular). It is similar to s1 s2 (L^-1 s1 s2 L = L^T s2 L), so it has
    the same spectrum; negative round-off eigenvalues are clamped to 0.
    Args:
        mu1, mu2: [D] means; s1, s2: [D,D] covariances (tensors or numpy arrays).
    """
    mu1, mu2, s1, s2 = (_as_f64(x, n) for x, n in ((mu1, "mu1"), (mu2, "mu2"), (s1, "sigma1"), (s2, "sigma2")))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance expects means [D] and covariances [D,D] with one D, got "
                         f"{list(mu1.shape)}, {list(s1.shape)}, {list(mu2.shape)}, {list(s2.shape)}")
    factor, info = torch.linalg.cholesky_ex(s1)
    if info.item() != 0:  # not positive definite
        factor = _sqrt_psd(s1)
    m = factor.T @ s2 @ factor
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def frechet_distance_features(f1, f2) -> float:
    """Frechet distance between the Gaussians fitted to features f1 [N,D] and f2 [M,D] (unbiased covariances).

    Same value as frechet_distance(*feature_stats(f1), *feature_stats(f2)). When min(N, M) < D (few samples of
    2048-d Inception features) it avoids the D x D eigen-decompositions: with A = (f1 - mu1) / sqrt(N-1) and
    B = (f2 - mu2) / sqrt(M-1), S1 = A^T A and S2 = B^T B, so tr((S1 S2)^(1/2)) is the sum of the singular values
    of the N x M matrix A B^T.
    """
    a, b = _as_f64(f1, "features 1"), _as_f64(f2, "features 2")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"features must be [N>=2,D] and [M>=2,D], got {list(a.shape)} and {list(b.shape)}")
    if min(a.shape[0], b.shape[0]) >= a.shape[1]:
        return frechet_distance(*feature_stats(a), *feature_stats(b))
    mu1, mu2 = a.mean(0), b.mean(0)
    a = (a - mu1) / (a.shape[0] - 1) ** 0.5
    b = (b - mu2) / (b.shape[0] - 1) ** 0.5
    nuclear = torch.linalg.svdvals(a @ b.T).sum()
    return float((mu1 - mu2).square().sum() + a.square().sum() + b.square().sum() - 2 * nuclear)


def _kth_nn_radius(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (the self-distance 0 is the first of k+1)."""
    out = []
    for i in range(0, feats.shape[0], chunk):
        d = torch.cdist(feats[i : i + chunk], feats)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    inside = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i : i + chunk], centres)
        inside.append((d <= radii[None, :]).any(1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real_feats, fake_feats, k: int = 3, chunk: int = 1024) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    Precision: fraction of fake samples inside the real manifold (the union of balls around each real feature with
    radius = distance to its k-th nearest real neighbour). Recall: fraction of real samples inside the fake manifold.
    Args:
        real_feats: [N,D]; fake_feats: [M,D] (tensors or numpy arrays); N, M > k.
    Returns:
        {"precision": float, "recall": float}.
    """
    real = torch.as_tensor(np.asarray(real_feats) if not isinstance(real_feats, torch.Tensor) else real_feats)
    fake = torch.as_tensor(np.asarray(fake_feats) if not isinstance(fake_feats, torch.Tensor) else fake_feats)
    real, fake = real.detach().float().cpu(), fake.detach().float().cpu()
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall expects [N,D] and [M,D] features, got {list(real.shape)} and "
                         f"{list(fake.shape)}")
    if not isinstance(k, int) or k < 1 or min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"need k >= 1 and more than k samples per set, got k={k!r}, N={real.shape[0]}, "
                         f"M={fake.shape[0]}")
    r_real, r_fake = _kth_nn_radius(real, k, chunk), _kth_nn_radius(fake, k, chunk)
    return {"precision": _coverage(fake, real, r_real, chunk), "recall": _coverage(real, fake, r_fake, chunk)}
