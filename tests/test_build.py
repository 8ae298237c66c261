"""CMakeLists.txt builds the same sources as setup.py into an importable nvg._C with the same ops."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_same_module(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "csrc"), src / "csrc")
    shutil.copy(os.path.join(ROOT, "CMakeLists.txt"), src)
    (src / "nvg").mkdir()
    prefix = torch.utils.cmake_prefix_path
    run = dict(check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(tmp_path / "build"), f"-DCMAKE_PREFIX_PATH={prefix}",
                    f"-DPython3_EXECUTABLE={sys.executable}"], **run)
    subprocess.run(["cmake", "--build", str(tmp_path / "build"), "-j2"], **run)
    built = [f for f in os.listdir(src / "nvg") if f.startswith("_C") and f.endswith(".so")]
    assert built, "cmake produced no nvg/_C*.so"
    # Load it in a fresh interpreter (this process already has the setup.py build loaded) and compare outputs.
    code = (
        "import sys, importlib.util, torch;"
        "spec = importlib.util.spec_from_file_location('nvg._C', sys.argv[2]);"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec));"
        "f = torch.arange(48.).view(1, 16, 3).sin();"
        "print(torch.ops.nvg.granularity_cluster(f).flatten().tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(src), str(src / "nvg" / built[0])], cwd=str(tmp_path),
                         **run).stdout.strip()
    import nvg  # noqa: F401

    expected = torch.ops.nvg.granularity_cluster(torch.arange(48.0).view(1, 16, 3).sin()).flatten().tolist()
    assert out == str(expected)


def _env_without_interpreter():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/run_gpu.sh in its dry-run mode: every phase is listed, the CPU ones run (environment, a pip dry run
    without an index, one ahead-of-time Triton compilation), the summary reports each phase and the budget."""
    pytest.importorskip("triton")
    out = tmp_path / "out"
    env = dict(_env_without_interpreter(), NVG_GPU_CHECK_DRY_RUN="1", NVG_GPU_CHECK_AOT_LIMIT="1", OUT=str(out),
               PYTHON=sys.executable)
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "run_gpu.sh")], env=env, capture_output=True,
                         text=True, timeout=240)
    summary = (out / "summary.txt").read_text()
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ["env", "build", "registered", "triton-aot", "tests-ops", "tests-triton", "sanitizer-memcheck",
                 "sanitizer-racecheck", "sanitizer-synccheck", "tests-cuda-rest", "bench-nvg-vs-var-b1",
                 "bench-nvg-vs-var-b64", "bench-ops", "bench-attn", "total"]:
        assert name in summary, name
    # the H200 targets: NVG fast against VAR and NVG faithful at d16, batch 1 and 64
    nvg_vs_var = (out / "bench-nvg-vs-var-b64.log").read_text()
    assert "NVG_BENCH_SIZES=d16" in nvg_vs_var and "d16-64-" in nvg_vs_var and "nvg_fast]" in nvg_vs_var
    assert "tests-triton         skipped (dry run)" in summary
    assert "triton-aot           passed" in summary and "build                passed" in summary
    assert "nvcc" in (out / "env.txt").read_text() or "Cuda compilation tools" in (out / "env.txt").read_text()
    worst = int(summary.split("so the run takes at most ")[1].split()[0])
    assert worst <= 12 * 60


def test_triton_aot_compile_subset(tmp_path):
    """tools/triton_aot_compile.py: counts the Triton variants of the GPU tests and compiles a subset for sm_90;
    the estimate for all of them stays within the GPU check's 3-minute compile budget."""
    pytest.importorskip("triton")
    summary = tmp_path / "aot.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "triton_aot_compile.py"), "--limit", "2", "--jobs",
                    "1", "--json", str(summary)], check=True, env=_env_without_interpreter(), timeout=300)
    import json

    s = json.loads(summary.read_text())
    assert s["compiled"] == 2 and s["variants"] >= 40 and s["over_shared_limit"] == 0
    assert set(s["per_kernel"]) == {"_block_attn_fwd_kernel", "_bwd_delta_kernel", "_block_attn_bwd_dkdv_kernel",
                                    "_block_attn_bwd_dq_kernel"}
    assert s["estimated_s_all"] < 180


def test_bench_rounds_from_env():
    """NVG_BENCH_ROUNDS (the GPU check sets it) overrides the sampling rounds per batch; bad values are refused."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_nvg_vs_var import rounds_from_env
    finally:
        sys.path.pop(0)
    base = {1: 10, 16: 5, 64: 3}
    assert rounds_from_env("", base) == base
    assert rounds_from_env("1:5, 64:2", base) == {1: 5, 16: 5, 64: 2}
    for bad in ("2:5", "1:0", "1", "1:x", "64:-1"):
        with pytest.raises(ValueError, match="NVG_BENCH_ROUNDS"):
            rounds_from_env(bad, base)
