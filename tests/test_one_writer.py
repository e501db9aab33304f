"""Runs that cannot lie (issue 19): one writer per run folder, resumes that refuse changed settings, damaged
files and full disks named in one line (exit 2), non-finite numbers never written.

Tiny dense runs on Digits (1 batch per epoch, ratio 0.125), in this process through `run_main` like
tests/test_hostile_inputs.py, except where a second process is the point (the lock, a file-size limit, LANG=C).
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_moe  # noqa: E402
import train_ori  # noqa: E402
from args import parse_args  # noqa: E402
from utils import train as train_mod  # noqa: E402
from utils.lock import LOCK_NAME, hold  # noqa: E402
from conftest import FLAGS, TWO_EPOCHS, assert_one_line, cli, no_signal_handlers, snapshot  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_folder(save):
    base = os.path.join(save, "training", "train_ori")
    return os.path.join(base, os.listdir(base)[0])


def copy_run(finished, dest):
    """A copy of the finished 2-epoch run's save dir: (save dir, run folder)."""
    shutil.copytree(finished[0], dest)
    return dest, run_folder(dest)


def unfinished(finished, dest):
    """A copy whose latest checkpoint says 1 of 2 epochs are done (as if killed after epoch 1): (save, folder)."""
    save, folder = copy_run(finished, dest)
    latest = os.path.join(folder, "checkpoint", "checkpoint.pth.tar")
    ckpt = torch.load(latest, weights_only=True)
    torch.save({**ckpt, "epoch": 1}, latest)
    return save, folder


def script(name, argv, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, f"{name}.py"), *map(str, argv)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# ------------------------------------------------------------------------------------------------------------
# One writer per run folder
# ------------------------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    argv = TWO_EPOCHS + ["--save-dir", tmp_path]
    folder = train_mod.run_dir(parse_args([str(a) for a in argv], script="train_ori"), "train_ori")
    with hold(folder):
        before = snapshot(tmp_path)
        for extra in ([], ["--resume", "auto"]):
            code, err = cli(train_ori.main, argv + extra, capsys)
            assert_one_line(code, err, "in use by", f"pid {os.getpid()}")
            assert snapshot(tmp_path) == before
    assert open(os.path.join(folder, LOCK_NAME)).read() == ""  # released: names nobody


def test_the_lock_of_a_killed_process_never_blocks(tmp_path, capsys):
    folder = tmp_path / "run"
    code = f"import os, sys; sys.path.insert(0, {ROOT!r}); from utils.lock import hold\n" \
           f"with hold({str(folder)!r}):\n    os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code], env=ENV).returncode == -signal.SIGKILL
    assert json.load(open(folder / LOCK_NAME))["pid"]  # the dead holder's record is still there
    with hold(folder):
        pass


def test_a_refused_run_removes_the_folder_its_lock_created(tmp_path, capsys):
    code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", tmp_path / "runs", "--resume", "/dev/null"], capsys)
    assert code == 2
    bad = tmp_path / "bad.pth.tar"
    torch.save({"state_dict": {}}, bad)
    code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", tmp_path / "runs", "--resume", bad], capsys)
    assert code == 2 and not (tmp_path / "runs").exists(), err


def _weights(folder):
    ckpt = torch.load(os.path.join(folder, "checkpoint", "checkpoint.pth.tar"), weights_only=True)
    return ckpt["state_dict"], ckpt["optimizer"]["state"]


def _rows(folder):
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.slow
def test_two_runs_started_at_once_one_runs_one_is_refused_and_the_run_equals_a_run_alone(tmp_path):
    argv = FLAGS + ["--epochs", "3", "--max-batches", "2"]
    both = [script("train_ori", argv + ["--save-dir", tmp_path / "shared"]) for _ in range(2)]
    done = [(p.wait(timeout=300), p.communicate()[1]) for p in both]
    codes = sorted(code for code, _ in done)
    assert codes == [0, 2], done
    refused = next(err for code, err in done if code == 2)
    assert_one_line(2, refused)
    alone = script("train_ori", argv + ["--save-dir", tmp_path / "alone"])
    assert alone.wait(timeout=300) == 0, alone.communicate()[1]
    shared, single = run_folder(tmp_path / "shared"), run_folder(tmp_path / "alone")
    assert _rows(shared) == _rows(single)
    (w1, o1), (w2, o2) = _weights(shared), _weights(single)
    assert all(torch.equal(w1[k], w2[k]) for k in w2)
    assert all(torch.equal(o1[i]["momentum_buffer"], o2[i]["momentum_buffer"]) for i in o2)


# ------------------------------------------------------------------------------------------------------------
# A resume continues the same run or is refused
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changed,named", [
    (["--at", "pgd", "--balance", "none", "--lr-schedule", "step"], ["--at trades (now pgd)", "--lr-schedule"]),
    (["--batch-size", "16"], ["--batch-size 32 (now 16)"]),
    (["--lr", "0.05", "--seed", "7", "--epsilon", "0.1", "--num-steps", "2"], ["--lr", "--seed", "--epsilon"]),
])
def test_resume_with_changed_settings_is_refused_listing_them(finished, tmp_path, capsys, changed, named):
    argv = FLAGS + ["--epochs", "3", "--save-dir", tmp_path / "runs", "--resume", finished[2]] + changed
    code, err = cli(train_ori.main, argv, capsys)
    assert_one_line(code, err, "differ", *named)
    assert not (tmp_path / "runs").exists()


def test_resume_auto_with_another_objective_is_refused(finished, tmp_path, capsys):
    save, folder = unfinished(finished, tmp_path / "save")
    before = snapshot(save)
    argv = TWO_EPOCHS + ["--save-dir", save, "--resume", "auto", "--at", "pgd", "--lr-schedule", "step"]
    code, err = cli(train_ori.main, argv, capsys)
    assert_one_line(code, err, "--at trades (now pgd)", "--lr-schedule cosine (now step)")
    assert snapshot(save) == before


def test_resume_may_extend_epochs_and_change_progress_flags(finished, tmp_path, capsys):
    argv = [a for a in FLAGS if a != "--no-progress"] + ["--epochs", "3", "--save-dir", tmp_path,
                                                          "--resume", finished[2]]
    with no_signal_handlers():
        code, err = cli(train_ori.main, argv, capsys)
    assert code == 0, err
    assert [r["epoch"] for r in _rows(run_folder(tmp_path))] == [3]


def test_a_folder_that_lost_its_latest_checkpoint_is_never_restarted(finished, tmp_path, capsys):
    save, folder = copy_run(finished, tmp_path / "save")
    os.remove(os.path.join(folder, "checkpoint", "checkpoint.pth.tar"))
    before = snapshot(save)
    code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", save, "--resume", "auto"], capsys)
    assert_one_line(code, err, "model_best.pth.tar of epoch", "no checkpoint.pth.tar")
    assert snapshot(save) == before
    os.remove(os.path.join(folder, "checkpoint", "model_best.pth.tar"))  # only the rows are left
    code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", save, "--resume", "auto"], capsys)
    assert_one_line(code, err, "metrics rows up to epoch 2")


@pytest.mark.parametrize("line", [b"[1,2]\n", b'{"epoch":"7"}\n', b'{"epoch":null}\n', b"\xff\xfe{}\n",
                                  b'{"epoch": 1}\nnot json\n'])
def test_damaged_metrics_rows_are_named_not_a_traceback(finished, tmp_path, capsys, line):
    save, folder = unfinished(finished, tmp_path / "save")
    with open(os.path.join(folder, "metrics.jsonl"), "ab") as f:
        f.write(line)
    before = snapshot(save)
    code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", save, "--resume", "auto"], capsys)
    assert_one_line(code, err, "metrics.jsonl", "damaged")
    assert snapshot(save) == before


def test_a_row_cut_short_by_a_kill_is_still_dropped_and_redone(finished, tmp_path, capsys):
    save, folder = unfinished(finished, tmp_path / "save")
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 3, "lr": 0.0')
    with no_signal_handlers():
        code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", save, "--resume", "auto"], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in _rows(folder)] == [1, 2]


# ------------------------------------------------------------------------------------------------------------
# Numbers that are not numbers, flags that do nothing
# ------------------------------------------------------------------------------------------------------------

def test_a_non_finite_row_stops_the_run_and_never_reaches_metrics(tmp_path, capsys, monkeypatch):
    real = train_mod.evaluate_epoch

    def diverged(run, epoch, stats, lr, best_path=None):
        row, is_best, warnings = real(run, epoch, stats, lr, best_path)
        return {**row, "train_loss": float("inf"), "load_clean": [float("nan"), 1.0]}, is_best, warnings
    monkeypatch.setattr(train_mod, "evaluate_epoch", diverged)
    with no_signal_handlers():
        code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", tmp_path], capsys)
    assert code == 1 and "train_loss" in err and "not finite" in err, err
    folder = run_folder(tmp_path)
    text = open(os.path.join(folder, "metrics.jsonl")).read() if os.path.exists(
        os.path.join(folder, "metrics.jsonl")) else ""
    assert "Infinity" not in text and "NaN" not in text
    assert json.load(open(os.path.join(folder, "status.json")))["state"] == "failed"


MOE = ["--arch", "resnet18_cifar_moe", "--n-expert", "2"]


@pytest.mark.parametrize("main,extra,named", [
    (train_moe.main, MOE + ["--balance", "bias", "--balance-strength", "1e30"], "(0, 1]"),
    (train_moe.main, MOE + ["--balance", "switch", "--balance-strength", "1e30"], "weight"),
    (train_moe.main, MOE + ["--balance", "none", "--balance-strength", "0.5"], "--balance none"),
    (train_ori.main, ["--balance-strength", "0.5"], "dense"),
])
def test_balance_strength_out_of_range_or_without_effect(tmp_path, capsys, main, extra, named):
    code, err = cli(main, TWO_EPOCHS + extra + ["--save-dir", tmp_path / "runs"], capsys)
    assert_one_line(code, err, "--balance-strength", named)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------------------
# Full disks, odd locales, Ctrl-C, evaluations of another checkpoint
# ------------------------------------------------------------------------------------------------------------

FSIZE_LIMIT = (
    "import resource, runpy, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.mark.slow
def test_a_checkpoint_save_on_a_full_disk_names_the_file_and_keeps_the_previous_one(finished, tmp_path):
    save, folder = unfinished(finished, tmp_path / "save")
    latest, best = (os.path.join(folder, "checkpoint", f) for f in ("checkpoint.pth.tar", "model_best.pth.tar"))
    before = {p: open(p, "rb").read() for p in (latest, best)}
    limit = os.path.getsize(latest) // 2  # logs fit, a checkpoint does not
    p = subprocess.run([sys.executable, "-c", FSIZE_LIMIT.format(limit=limit), os.path.join(ROOT, "train_ori.py"),
                        *map(str, TWO_EPOCHS), "--save-dir", save, "--resume", "auto"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert_one_line(p.returncode, p.stderr, ".pth.tar", "is intact", "disk full")
    assert {p: open(p, "rb").read() for p in (latest, best)} == before
    assert not [f for f in os.listdir(os.path.dirname(latest)) if f.startswith(".tmp")]


@pytest.mark.slow
def test_a_fresh_run_on_a_full_disk_leaves_nothing(tmp_path):
    p = subprocess.run([sys.executable, "-c", FSIZE_LIMIT.format(limit=512), os.path.join(ROOT, "train_ori.py"),
                        *map(str, TWO_EPOCHS), "--save-dir", tmp_path / "runs"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert_one_line(p.returncode, p.stderr, "disk full")
    assert not (tmp_path / "runs").exists()


def test_a_non_ascii_identifier_under_lang_c_is_logged(tmp_path):
    env = {**ENV, "LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0"}
    ident = "caf\u00e9".encode()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_ori.py"), *map(str, FLAGS), "--epochs", "1",
                        "--save-dir", str(tmp_path), "--exp-identifier", ident], cwd=ROOT, env=env,
                       capture_output=True, timeout=300)
    assert p.returncode == 0 and b"Logging error" not in p.stderr, p.stderr[-2000:]
    log = open(os.path.join(run_folder(tmp_path), "setup.log"), "rb").read()
    assert b"run folder" in log and ident in log


def test_ctrl_c_before_the_first_checkpoint_does_not_promise_a_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "train_one_epoch", interrupted)
    with no_signal_handlers():
        code, _ = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", tmp_path], capsys)
    assert code == 130
    message = json.load(open(os.path.join(run_folder(tmp_path), "status.json")))["message"]
    assert "before the first checkpoint" in message and "resume from the last" not in message


def test_a_second_evaluation_of_another_checkpoint_does_not_replace_the_first(finished, tmp_path, capsys):
    other = tmp_path / "other.pth.tar"
    shutil.copy(finished[2], other)
    argv = TWO_EPOCHS + ["--save-dir", tmp_path / "ev", "--evaluate"]
    code, err = cli(train_ori.main, argv + ["--resume", finished[2]], capsys)
    assert code == 0, err
    before = snapshot(tmp_path / "ev")
    code, err = cli(train_ori.main, argv + ["--resume", other], capsys)
    assert_one_line(code, err, "another checkpoint", finished[2])
    assert snapshot(tmp_path / "ev") == before
    code, err = cli(train_ori.main, argv + ["--resume", finished[2]], capsys)  # the same checkpoint again: fine
    assert code == 0, err


def test_moe_stages_mismatch_names_moe_stages(tmp_path, capsys):
    import models
    full = models.build_model("resnet18_cifar_moe", num_classes=10, ratio=0.125, n_expert=2)
    path = tmp_path / "all_stages.pth.tar"
    torch.save({"arch": "resnet18_cifar_moe", "ratio": 0.125, "n_expert": 2, "routing": "global",
                "moe_stages": None, "top_k": 1, "state_dict": full.state_dict()}, path)
    argv = TWO_EPOCHS[2:] + MOE + ["--moe-stages", "4", "--evaluate", "--resume", path,
                                   "--save-dir", tmp_path / "runs"]
    code, err = cli(train_moe.main, argv, capsys)
    assert_one_line(code, err, "every stage (no --moe-stages)", "--moe-stages 4")


@pytest.mark.parametrize("argv,named", [(["--device", "meta"], "--device meta"), (["--ratio", "0"], "--ratio"),
                                        (["--experts", "0"], "--experts"), (["--batch", "0"], "--batch")])
@pytest.mark.slow
def test_benchmark_bad_sizes_are_one_line(argv, named):
    p = subprocess.run([sys.executable, "-m", "utils.tools.benchmark", "--quick", *argv], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert_one_line(p.returncode, p.stderr, named)


def test_evaluate_builds_the_checkpoints_model_and_refuses_other_normalisation(finished, tmp_path, capsys):
    """--evaluate goes from the checkpoint to its model as auto_attack_eval.py does (the checkpoint's record, the
    flags checked against it): a model evaluated with another input normalisation than it was trained with would
    give meaningless accuracies."""
    argv = TWO_EPOCHS + ["--save-dir", tmp_path / "ev", "--evaluate", "--resume", finished[2], "--normalize"]
    code, err = cli(train_ori.main, argv, capsys)
    assert_one_line(code, err, "trained with --no-normalize", "--normalize")
    assert not (tmp_path / "ev").exists()
