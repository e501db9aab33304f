"""Issue 30, the last holes: a lock whose file is deleted or is a symlink, writes through symlinks leading out of
the folder the user named, a study into a folder it cannot write or trusting a copied result, datasets with no
batch, and `--resume auto` that says what it did and continues a run whose `--epochs` was raised.

Tiny dense runs on Digits in this process through `run_main` (tests/conftest.py), except where a second process
holding the lock is the point.
"""
import errno
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_ori  # noqa: E402
from args import parse_args  # noqa: E402
from utils import data as data_mod  # noqa: E402
from utils import fashion_mnist as fm  # noqa: E402
from utils import train as train_mod  # noqa: E402
from utils import writes  # noqa: E402
from utils.errors import UsageError  # noqa: E402
from utils.lock import LOCK_NAME, hold  # noqa: E402
from utils.tools import report, study  # noqa: E402
from conftest import FLAGS, assert_one_line, cli, no_signal_handlers, snapshot  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def folder_of(argv):
    return train_mod.run_dir(parse_args([str(a) for a in argv], script="train_ori"), "train_ori")


def train(argv, capsys):
    with no_signal_handlers():
        return cli(train_ori.main, argv, capsys)


# ------------------------------------------------------------------------------------------------------------
# The lock
# ------------------------------------------------------------------------------------------------------------

def test_a_run_whose_lock_file_is_deleted_stops_before_writing_anything_more(tmp_path, capsys, monkeypatch):
    """The lock file is deleted during epoch 1 (a cleanup) and a second process takes the folder: the first run
    stops at its checkpoint with one line, exit 2, and writes nothing more (no row, no checkpoint, no status,
    the second holder's lock file kept)."""
    argv = FLAGS + ["--epochs", "2", "--save-dir", tmp_path]
    folder = folder_of(argv)
    lock, ready = os.path.join(folder, LOCK_NAME), str(tmp_path / "ready")
    real, other = train_mod.train_one_epoch, []

    def deleted_then_taken(*args, **kwargs):
        out = real(*args, **kwargs)
        if not other:
            os.remove(lock)
            code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); from utils.lock import hold\n"
                    f"with hold({folder!r}):\n    open({ready!r}, 'w').close(); time.sleep(120)")
            other.append(subprocess.Popen([sys.executable, "-c", code], env=ENV))
            t0 = time.time()
            while not os.path.exists(ready) and time.time() - t0 < 30:
                time.sleep(0.05)
        return out

    monkeypatch.setattr(train_mod, "train_one_epoch", deleted_then_taken)
    try:
        code, err = train(argv, capsys)
        taken = os.stat(lock)
        after = snapshot(folder)
    finally:
        for p in other:
            p.kill()
            p.wait()
    assert_one_line(code, err, "lock file", "deleted or replaced")
    assert "metrics.jsonl" not in after and "checkpoint/" not in after
    assert json.loads(after["status.json"])["state"] == "running"  # not rewritten after the loss
    assert os.path.samestat(taken, os.stat(lock))  # the other holder's lock file is left in place


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, capsys):
    argv = FLAGS + ["--epochs", "1", "--save-dir", tmp_path / "save"]
    folder = folder_of(argv)
    os.makedirs(folder)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    os.symlink(target, os.path.join(folder, LOCK_NAME))
    code, err = train(argv, capsys)
    assert_one_line(code, err, LOCK_NAME, "symbolic link")
    assert target.read_text() == "keep me\n"
    assert sorted(os.listdir(folder)) == [LOCK_NAME]


def test_hold_never_follows_a_symlinked_lock(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("data")
    os.makedirs(tmp_path / "run")
    os.symlink(target, tmp_path / "run" / LOCK_NAME)
    with pytest.raises(UsageError, match="symbolic link"):
        with hold(tmp_path / "run"):
            pass
    assert target.read_text() == "data"


# ------------------------------------------------------------------------------------------------------------
# One way to write inside a folder
# ------------------------------------------------------------------------------------------------------------

def test_writes_refuse_a_link_leading_outside_the_folder_and_allow_one_inside(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("victim")
    os.symlink(outside / "victim", out / "file.txt")  # the file itself is a link
    os.symlink(outside, out / "sub")  # a folder on the way is a link
    for path in (out / "file.txt", out / "sub" / "new.txt"):
        with pytest.raises(UsageError, match="symbolic link leading outside"):
            writes.write_text_atomic(path, "x", root=out)
        with pytest.raises(UsageError, match="symbolic link leading outside"):
            with writes.open_append(path, root=out) as f:
                f.write("x")
    assert (outside / "victim").read_text() == "victim" and os.listdir(outside) == ["victim"]
    (out / "real.txt").write_text("old")
    os.symlink(out / "real.txt", out / "inner")  # a link that stays inside is fine
    with writes.open_append(out / "inner", root=out) as f:
        f.write("+")
    assert (out / "real.txt").read_text() == "old+"


WRITE_CALLS = re.compile(r"""open\([^)]*["'][wax]b?\+?["']|os\.replace\(|shutil\.copy(file)?\(|\.write_text\(|"""
                         r"""\.write_bytes\(|savefig\((?!f,)|os\.fdopen\(|NamedTemporaryFile\(""")


def test_every_writer_of_the_tools_and_the_library_goes_through_utils_writes():
    """No file is opened for writing anywhere but utils/writes.py (dataset placement in prepare_data, which
    moves or links a user's own dataset files, excepted by name)."""
    allowed = {os.path.join("utils", "writes.py")}
    found = []
    for top in ("utils", "models", "."):
        names = [os.path.join(top, n) for n in os.listdir(os.path.join(ROOT, top)) if n.endswith(".py")]
        if top == "utils":
            names += [os.path.join(top, "tools", n) for n in os.listdir(os.path.join(ROOT, top, "tools"))
                      if n.endswith(".py")]
        for name in sorted(set(os.path.normpath(n) for n in names) - allowed):
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if WRITE_CALLS.search(line) and "shutil.copy2(source, target)" not in line:
                        found.append(f"{name}:{n}: {line.strip()}")
    assert not found, found


def test_report_refuses_a_table_that_links_outside_its_out_folder(tmp_path, capsys):
    out, victim = tmp_path / "out", tmp_path / "victim.md"
    victim.write_text("my notes\n")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "args.yaml").write_text("arch: resnet18_cifar_ori\ndataset: Digits\nratio: 0.125\nepochs: 1\n")
    assert report.main([str(tmp_path / "runs"), "--out", str(out)]) == 0  # the report's own files
    os.remove(out / "table.md")
    os.symlink(victim, out / "table.md")
    capsys.readouterr()
    assert report.main([str(tmp_path / "runs"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "table.md" in err and "symbolic link" in err and len(err.strip().splitlines()) == 1
    assert victim.read_text() == "my notes\n"


# ------------------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------------------

def study_main(argv):
    sys.exit(study.main(argv))


STUDY = ["--report-only", "--seeds", "1", "--only", "dense_r"]


def test_a_study_into_a_folder_it_cannot_write_is_one_line(tmp_path, capsys, monkeypatch):
    """A read-only file system (EROFS) under --save-dir; as root a chmod does not stop writes, so mkdir fails as
    it does on a read-only mount."""
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    code, err = cli(study_main, STUDY + ["--save-dir", tmp_path / "ro"], capsys)
    assert_one_line(code, err, "--save-dir", "Read-only")
    assert not (tmp_path / "ro").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder")
def test_a_study_into_a_read_only_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        code, err = cli(study_main, STUDY + ["--save-dir", tmp_path / "ro"], capsys)
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert_one_line(code, err, "--save-dir")


def test_a_result_copied_from_other_settings_is_refused(tmp_path, capsys):
    a = study.get_args_parser().parse_args(STUDY + ["--save-dir", str(tmp_path)])
    j, = study.plan(a, [1])
    other, = study.plan(study.get_args_parser().parse_args(STUDY + ["--epochs", "9"]), [1])
    folder = j.folder(str(tmp_path / "main"))
    os.makedirs(folder)
    path = os.path.join(folder, "result.json")
    with open(path, "w") as f:
        json.dump({"row": j.name, "seed": 1, "key": other.key, "sa": 90.0, "ra": 20.0, "n": 360}, f)
    code, err = cli(study_main, STUDY + ["--save-dir", tmp_path], capsys)
    assert_one_line(code, err, path, other.key, j.key)
    assert not (tmp_path / "main" / "table.md").exists()


# ------------------------------------------------------------------------------------------------------------
# Data with no batch
# ------------------------------------------------------------------------------------------------------------

def _write_idx(path, shape):
    header = bytes([0, 0, 0x08, len(shape)]) + b"".join(int(d).to_bytes(4, "big") for d in shape)
    with open(path, "wb") as f:
        f.write(header + bytes(int(torch.tensor(shape).prod())))


def test_fashion_mnist_files_that_announce_0_images_are_refused_naming_the_file(tmp_path):
    for train in (True, False):
        images, labels = fm.FILES[train]
        _write_idx(tmp_path / images, (0, 28, 28))
        _write_idx(tmp_path / labels, (0,))
    for train in (True, False):
        with pytest.raises(UsageError, match=re.escape(str(tmp_path / fm.FILES[train][0])) + ".*0 images"):
            fm.read_split(str(tmp_path), train)


def test_a_split_without_any_batch_is_refused(monkeypatch, tmp_path):
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    some = TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    monkeypatch.setattr(data_mod, "build_datasets", lambda *a, **k: (empty, some))
    cfg = data_mod.LoaderConfig("Digits", str(tmp_path), 32, 32, 0, 0)
    with pytest.raises(UsageError, match=f"Digits training split in {re.escape(str(tmp_path))}: it holds 0 images"):
        data_mod.build_loaders(cfg, torch.device("cpu"))
    with pytest.raises(UsageError, match="3 images, fewer than one batch of 4"):
        data_mod.check_has_batches(DataLoader(TensorDataset(torch.zeros(3)), batch_size=4, drop_last=True), "x")
    data_mod.check_has_batches(DataLoader(TensorDataset(torch.zeros(3)), batch_size=4), "x")  # a short batch


# ------------------------------------------------------------------------------------------------------------
# --resume auto says what it did; raising --epochs continues the run
# ------------------------------------------------------------------------------------------------------------

def _rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_auto_says_what_it_did_and_raising_epochs_continues_the_finished_run(tmp_path, capsys):
    one = FLAGS + ["--epochs", "1", "--save-dir", tmp_path / "s", "--resume", "auto"]
    first = folder_of(one)
    assert train(one, capsys)[0] == 0
    before = snapshot(first)
    two = FLAGS + ["--epochs", "2", "--save-dir", tmp_path / "s", "--resume", "auto"]
    second = folder_of(two)
    assert second != first and "-epochs1-" in first and "-epochs2-" in second
    code, err = train(two, capsys)
    assert code == 0, err
    with open(os.path.join(second, "setup.log")) as f:
        said = f.read()
    assert f"resuming {first} at epoch 2" in said, said
    assert snapshot(first) == before  # the finished run is left as it was
    assert _rows(second)[0] == _rows(first)[0] and [r["epoch"] for r in _rows(second)] == [1, 2]
    assert torch.load(os.path.join(second, "checkpoint", "checkpoint.pth.tar"), weights_only=True)["epoch"] == 2
    # the same as continuing it by hand from its checkpoint
    by_hand = FLAGS + ["--epochs", "2", "--save-dir", tmp_path / "h", "--resume",
                       os.path.join(first, "checkpoint", "checkpoint.pth.tar")]
    code, _ = train(by_hand, capsys)
    assert code == 0
    a = torch.load(os.path.join(second, "checkpoint", "checkpoint.pth.tar"), weights_only=True)["state_dict"]
    b = torch.load(os.path.join(folder_of(by_hand), "checkpoint", "checkpoint.pth.tar"),
                   weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the continued run's folder now compares changed flags with its own checkpoint
    code, err = train(two + ["--at", "pgd"], capsys)
    assert_one_line(code, err, "--at trades (now pgd)")
    # its own folder again: resumed there, nothing left to do
    code, err = train(two, capsys)
    assert code == 0 and "nothing to do" in err


def test_resume_auto_without_a_checkpoint_says_it_starts_a_new_run(tmp_path, capsys):
    argv = FLAGS + ["--epochs", "1", "--save-dir", tmp_path, "--resume", "auto"]
    code, err = train(argv, capsys)
    assert code == 0, err
    with open(os.path.join(folder_of(argv), "setup.log")) as f:
        assert f"no checkpoint in {folder_of(argv)}: starting a new run" in f.read()


def test_a_run_with_other_flags_is_not_continued_by_raising_epochs(tmp_path, capsys):
    one = FLAGS + ["--epochs", "1", "--save-dir", tmp_path, "--resume", "auto"]
    assert train(one, capsys)[0] == 0
    two = FLAGS + ["--epochs", "2", "--save-dir", tmp_path, "--resume", "auto", "--at", "pgd"]
    assert train(two, capsys)[0] == 0
    with open(os.path.join(folder_of(two), "setup.log")) as f:
        assert "no checkpoint in" in f.read()  # a new run: --at differs from the 1-epoch run's (not in the name)
