import math

import numpy as np
import pytest
import torch

from nvg.eval.metrics import (
    codebook_usage,
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    precision_recall,
    psnr,
    ssim,
)

# one intra-op thread (tests/conftest.py): on a shared 2-core machine the LAPACK thread pool mostly spins (eigh of
# 128x128 took 1.7 s with 2 threads under load, 4 ms with 1)
pytestmark = pytest.mark.usefixtures("one_thread")


def _random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_closed_form_commuting_gaussians():
    # Covariances that share eigenvectors: FD = |mu1-mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    d = 16
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    a, b = torch.rand(d, dtype=torch.float64) + 0.1, torch.rand(d, dtype=torch.float64) * 3
    mu1, mu2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_identical_is_zero_and_matches_scipy():
    s1, s2 = _random_spd(32, 1), _random_spd(32, 2)
    mu1, mu2 = torch.zeros(32, dtype=torch.float64), torch.full((32,), 0.5, dtype=torch.float64)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy not installed: scipy cross-check skipped")
    s1n, s2n = s1.numpy(), s2.numpy()
    ref = 8.0 + np.trace(s1n) + np.trace(s2n) - 2 * np.trace(np.real(scipy_linalg.sqrtm(s1n @ s2n)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_frechet_rank_deficient_features():
    # Fewer samples than dimensions (as with 2048-d Inception features on small sets): finite and >= 0.
    f1, f2 = np.random.default_rng(0).normal(size=(2, 50, 128))
    v = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert math.isfinite(v) and v > 0
    mu, sigma = feature_stats(f1)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-7 * float(sigma.trace())  # round-off of 78 zero eigenvalues


@pytest.mark.parametrize("n, m", [(20, 30), (300, 40), (200, 250)])
def test_frechet_from_features_matches_stats(n, m):
    # Low-rank route (min(n, m) < D = 128) and the covariance route give the same distance (up to the round-off
    # of the covariance route: sqrt of the ~1e-16 noise of each zero eigenvalue adds ~1e-8 per missing rank).
    g = torch.Generator().manual_seed(n + m)
    f1 = torch.randn(n, 128, generator=g, dtype=torch.float64)
    f2 = 1.2 * torch.randn(m, 128, generator=g, dtype=torch.float64) + 0.3
    expected = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert frechet_distance_features(f1, f2) == pytest.approx(expected, rel=1e-7)
    assert abs(frechet_distance_features(f1, f1)) < 1e-9 * float(feature_stats(f1)[1].trace())


def test_frechet_bad_shapes():
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N>=2"):
        feature_stats(np.zeros((1, 4)))


def test_psnr_known_value():
    a = torch.zeros(2, 3, 8, 8)
    b = torch.full_like(a, 0.2)  # 0.1 apart on the [0, 1] scale -> mse 0.01 -> 20 dB
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0))
    assert psnr(a, a).tolist() == [100.0, 100.0]


def test_ssim_closed_form_and_ordering():
    # Constant images: SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1), with the structure terms equal to 1.
    a, b = torch.full((1, 3, 16, 16), -0.2), torch.full((1, 3, 16, 16), 0.4)  # 0.4 and 0.7 on [0, 1]
    c1 = 0.01**2
    expected = (2 * 0.4 * 0.7 + c1) / (0.4**2 + 0.7**2 + c1)
    torch.testing.assert_close(ssim(a, b), torch.tensor([expected]))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    s_small, s_big = ssim(x, (x + 0.05 * noise).clamp(-1, 1)), ssim(x, (x + 0.5 * noise).clamp(-1, 1))
    assert (s_small > s_big).all() and (s_small < 1).all()
    torch.testing.assert_close(ssim(x, x + 0.1), ssim(x + 0.1, x))  # symmetric
    assert ssim(x[:, :, :7, :7], x[:, :, :7, :7]).shape == (4,)  # window shrinks to 7


def test_image_metric_errors():
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:1])
    with pytest.raises(TypeError, match="float"):
        ssim(x.byte(), x.byte())
    with pytest.raises(ValueError, match="same shape"):
        ssim(x[0], x[0])


def test_codebook_usage():
    u = codebook_usage(torch.arange(64).repeat(10), 64)
    assert u["used"] == 64 and u["usage"] == 1.0 and u["perplexity"] == pytest.approx(64) and u["count"] == 640
    one = codebook_usage([torch.full((2, 4), 5), torch.full((3,), 5)], 64)
    assert one["used"] == 1 and one["perplexity"] == pytest.approx(1.0) and one["count"] == 11
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        codebook_usage(torch.tensor([0, 8]), 8)
    with pytest.raises(TypeError, match="integer"):
        codebook_usage(torch.zeros(3), 8)


def test_precision_recall_hand_example():
    real = torch.arange(10, dtype=torch.float32)[:, None]  # k=1 radius of every real point is 1
    fake = torch.tensor([[0.5], [100.0], [101.0], [102.0]])
    pr = precision_recall(real, fake, k=1)
    assert pr["precision"] == pytest.approx(0.25)
    # Fake k=1 radii: 0.5 -> 99.5, the others 1; the ball around 0.5 covers every real point.
    assert pr["recall"] == pytest.approx(1.0)


def test_precision_recall_identical_and_disjoint():
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(f, f) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(f, f + 100.0) == {"precision": 0.0, "recall": 0.0}
    # A collapsed generator (all samples near one real point) is precise but has low recall.
    pr = precision_recall(f, f[:1] + 1e-3 * torch.randn(50, 8), k=3)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.1
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(f[:3], f, k=3)
