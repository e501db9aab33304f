"""sh/gpu_check.sh in its CPU mode, so that the one-call GPU check keeps working between GPU loans."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "sh", "gpu_check.sh")
ENV = dict(os.environ)


@pytest.mark.slow
def test_cpu_quick_mode_passes_every_step_and_prints_one_summary(tmp_path):
    out = subprocess.run(["bash", SCRIPT, "--device", "cpu", "--quick", "--out", str(tmp_path / "check")],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = out.stdout[out.stdout.index("gpu_check summary"):]
    for name in ("pytest", "benchmark", "digits_advmoe"):
        assert any(line.split()[:2] == [name, "PASS"] for line in summary.splitlines()), summary
    assert "overall: PASS" in summary
    assert "MoE r=0.5 N=2 sparse" in summary and "epoch 2/2" in summary


def test_bad_options_exit_2_and_write_nothing(tmp_path):
    for argv in (["--bogus"], ["--out", str(tmp_path)]):
        (tmp_path / "keep").write_text("x")  # --out must be a new or empty folder
        out = subprocess.run(["bash", SCRIPT, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
        assert out.returncode == 2 and out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1
        assert sorted(os.listdir(tmp_path)) == ["keep"]
