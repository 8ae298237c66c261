"""Builds nvg._C: the custom ops' C++ CPU kernels, plus the CUDA kernels when a CUDA torch and toolkit are present.

Build switches (read once here):
  NVG_USE_CUDA=0/1        force the CUDA build off/on (default: on when torch.version.cuda and nvcc are found)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default 9.0, Hopper)
  NVG_DEBUG=1             -O0 -g
"""
import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("NVG_DEBUG", "0") == "1"


def cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"  # nvcc on PATH may be a wrapper that misleads torch's guess
    if home is None and shutil.which("nvcc"):
        home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    return home


def want_cuda():
    flag = os.environ.get("NVG_USE_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and cuda_home() is not None


def sources(use_cuda):
    # One source list for setup.py and CMakeLists.txt: csrc/*.cpp always, csrc/cuda/*.cu with CUDA.
    srcs = sorted(glob.glob("csrc/*.cpp"))
    if use_cuda:
        srcs += sorted(glob.glob("csrc/cuda/*.cu"))
    return srcs


def extension():
    use_cuda = want_cuda()
    opt = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
    # at::parallel_for is OpenMP-backed: without -fopenmp it runs serially. -ffp-contract=off: no fused multiply-adds
    # in the double-precision decisions, so CPU and CUDA kernels round identically on every platform.
    cxx = opt + ["-fopenmp", "-ffp-contract=off"]
    if not use_cuda:
        return CppExtension("nvg._C", sources(False), extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                            py_limited_api=False)
    home = cuda_home()
    os.environ.setdefault("CUDA_HOME", home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    include_dirs = []
    try:  # pip-installed CUDA torch ships cusparse.h etc. here; <ATen/cuda/CUDAContext.h> needs them
        import nvidia  # a namespace package: no __file__, look through its __path__

        for base in getattr(nvidia, "__path__", []):
            for sub in ("cu13", "cu12"):
                d = os.path.join(base, sub, "include")
                if os.path.isdir(d):
                    include_dirs.append(d)
    except ImportError:
        pass
    # No --use_fast_math: nearest-code and clustering decisions compare distances exactly.
    nvcc = ["-O3", "-lineinfo"] if not DEBUG else ["-O0", "-g", "-G"]
    return CUDAExtension("nvg._C", sources(True), include_dirs=include_dirs,
                         define_macros=[("NVG_WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
