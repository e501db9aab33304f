"""sh/check_portable.sh and its table (sh/portable_table.py): a test that fails under one seed offset or thread
count shows as FAIL in that column and fails the check; a setting whose pytest did not run is ERROR."""
import importlib.util
import os
import subprocess

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("portable_table", os.path.join(ROOT, "sh", "portable_table.py"))
pt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pt)

A, B = "tests/test_a.py", "tests/test_b.py"


def test_table_rows_files_then_their_failed_tests():
    ok = {(A, A + "::test_x"): "pass", (A, A + "::test_y[1]"): "pass", (B, B + "::test_z"): "skip"}
    bad = {**ok, (A, A + "::test_y[1]"): "FAIL"}
    rows, good = pt.table([("s0", ok), ("s1", bad)])
    assert rows == [[A, "pass", "FAIL"], ["  ::test_y[1]", "pass", "FAIL"], [B, "skip", "skip"]]
    assert not good
    rows, good = pt.table([("s0", ok), ("s1", ok)])
    assert rows == [[A, "pass", "pass"], [B, "skip", "skip"]] and good
    rows, good = pt.table([("s0", ok), ("s1", None)])  # s1's pytest did not run its tests
    assert rows == [[A, "pass", "ERROR"], [B, "skip", "ERROR"]] and not good
    assert pt.table([("s0", {})]) == ([], False)  # nothing ran is no pass


@pytest.mark.slow  # six pytest runs
def test_a_test_that_fails_under_one_offset_and_one_thread_count_is_found(tmp_path):
    """The whole script on a file of our own: one test fails under seed offset 1 only, one on 2 threads only."""
    (tmp_path / "test_probe.py").write_text(
        "import os\n\n\n"
        "def test_seed():\n    assert os.environ['ADVMOE_TEST_SEED'] != '1'\n\n\n"
        "def test_threads():\n    assert os.environ['OMP_NUM_THREADS'] == os.environ['ADVMOE_TEST_THREADS'] == '1'\n\n\n"
        "def test_fine():\n    pass\n")
    env = {**os.environ, "CHECK_PORTABLE_DIR": str(tmp_path / "work")}
    out = subprocess.run(["bash", os.path.join(ROOT, "sh", "check_portable.sh"), "--seeds", "0 1", "--threads", "1 2",
                          str(tmp_path / "test_probe.py")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 1, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split(" | ")[1:] == ["seed 0, 1 thread", "seed 0, 2 threads", "seed 1, 1 thread",
                                         "seed 1, 2 threads"], lines[0]
    cells = {line.split(" | ")[0].strip(): [c.strip() for c in line.split(" | ")[1:]] for line in lines[2:]}
    assert list(cells)[0].endswith("test_probe.py") and list(cells.values())[0] == ["pass", "FAIL", "FAIL", "FAIL"]
    assert cells["::test_seed"] == ["pass", "pass", "FAIL", "FAIL"]
    assert cells["::test_threads"] == ["pass", "FAIL", "pass", "FAIL"]
    assert "::test_fine" not in cells
    assert sorted(os.listdir(tmp_path / "work")) == sorted(f"seed{s}-threads{t}.{e}" for s in (0, 1) for t in (1, 2)
                                                           for e in ("log", "xml"))


@pytest.mark.slow
def test_a_setting_that_ran_nothing_is_an_error(tmp_path):
    """pytest ending with 4 (usage) or 5 (nothing collected), or no report: ERROR, and the check fails."""
    (tmp_path / "test_fine.py").write_text("def test_fine():\n    pass\n")
    env = {**os.environ, "CHECK_PORTABLE_DIR": str(tmp_path / "work")}
    run = ["bash", os.path.join(ROOT, "sh", "check_portable.sh"), "--seeds", "0", "--threads", "1"]
    out = subprocess.run(run + [str(tmp_path / "test_fine.py")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].split(" | ")[1].strip() == "pass"
    out = subprocess.run(run + ["--quick", str(tmp_path / "test_fine.py::test_missing")], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    assert out.returncode == 1 and "pytest exit 4" in out.stderr, out.stdout + out.stderr
    assert pt.main(["s0=" + str(tmp_path / "missing.xml") + ":0"]) == 1
    report = tmp_path / "work" / "seed0-threads1.xml"
    assert pt.parse_arg(f"s0={report}:2") == ("s0", None)  # interrupted: whatever it reported does not count
    for bad in (["--seeds", "x"], ["--threads"], ["--frobnicate"]):
        out = subprocess.run(["bash", os.path.join(ROOT, "sh", "check_portable.sh"), *bad], capture_output=True,
                             text=True, cwd=ROOT)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (bad, out.stderr)
