"""utils/tools/benchmark.py --steps: training steps of this tree and of another source tree, timed side by side
(each tree in its own step_worker.py process); bad rows and trees are one line and exit 2.

Times are never asserted on: only that every row gets a time from each tree and the report's lines are there.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
TINY = ["--steps", "--rows", "dense:0.125", "moe:0.125:2", "--image-size", "8", "--train-batch", "4",
        "--train-repeats", "2", "--warmup", "0"]


# Appended to the copy's utils/flops.py: its step builder writes one line to BUILT (beside utils/) per step built.
MARKING_STEP_BUILDER = """

_built = make_train_step


def make_train_step(*args, **kwargs):
    import os
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "BUILT"), "a") as f:
        f.write("step\\n")
    return _built(*args, **kwargs)
"""


def bench(*argv):
    return subprocess.run([sys.executable, "-m", "utils.tools.benchmark", *TINY, *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_steps_against_a_tree_times_every_row_on_both_sides(tmp_path):
    """--against a copy of this tree (a stand-in for a worktree of main) whose step builder leaves a mark: the main
    side runs the copy's code (one mark per row), every row has a time from each side, two per side (the repeats),
    and the speed-ups and the per-FLOP check are printed."""
    tree = tmp_path / "main"
    for name in ("models", "utils"):
        shutil.copytree(os.path.join(ROOT, name), tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tree / "utils" / "flops.py", "a") as f:
        f.write(MARKING_STEP_BUILDER)
    p = bench("--against", str(tree))
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "main s/batch" in out and "this s/batch" in out
    for label in ("dense r=0.125 TRADES", "MoE r=0.125 N=2 AdvMoE"):
        row = next(line for line in out.splitlines() if line.startswith(label))
        assert re.search(r"\d+\.\d+x \(\d+\.\d+x\)$", row), row  # main's time, this tree's, the speed-ups
        for side in ("main", "this"):
            times = re.search(rf"{side} {re.escape(label)}: ([\d. ]+?)(;|$)", out, re.M).group(1).split()
            assert len(times) == 2 and all(float(t) > 0 for t in times)
    assert open(tree / "BUILT").read() == "step\n" * 2  # the copy's code built main's two rows
    assert "per FLOP (main, wall)" in out and "per FLOP (this, CPU)" in out and "speed-up over main" in out


@pytest.mark.parametrize("argv,named", [(["--rows", "dense"], "--rows"), (["--rows", "moe:0.5"], "--rows"),
                                        (["--rows", "dense:2"], "--rows"), (["--image-size", "4"], "--image-size"),
                                        (["--against", "/nonexistent/tree"], "--against")])
def test_steps_bad_input_is_one_line_exit_2(argv, named):
    p = bench(*argv)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in p.stderr, p.stderr
