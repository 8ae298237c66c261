"""`python -m nvg.train`: expected errors are one line on stderr with exit code 2, before any work."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, message", [
    (["--steps", "5"], "unknown subcommand '--steps'"),
    (["tokenizer", "--ckpt-every", "0"], "--ckpt-every must be a positive integer, got 0"),
    (["tokenizer", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["tokenizer", "--preset", "nope"], "unknown tokenizer preset 'nope'"),
    (["generator", "--tokenizer", "/nonexistent-run"], "no such checkpoint or run directory: /nonexistent-run"),
    (["var", "--top-p", "0"], "top_p in (0, 1]"),
])
def test_expected_errors_are_one_line_and_exit_2(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "nvg.train", *args, "--out-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("python -m nvg.train: error:") and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists()  # refused before any work
