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
