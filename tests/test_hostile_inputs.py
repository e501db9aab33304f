"""Hostile and odd inputs (issue 14): nothing the user did not ask to replace is replaced, bad input is one
bounded line and exit 2, a run that fails after its folder exists says "failed" in status.json.

Most cases call the entry scripts' `main` in this process through `run_main` (what `python script.py` does),
so torch is imported once; the one case that hung the old code runs in a subprocess with a timeout. One tiny
dense run (2 epochs of 1 batch on Digits) made once per module provides the real run folder and checkpoints.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import auto_attack_eval  # noqa: E402  (the entry scripts: their `main` is what users run)
from args import parse_autoattack_args  # noqa: E402
import train_ori  # noqa: E402
from utils import autoattack_eval as aa  # noqa: E402
from utils import train as train_mod  # noqa: E402
from utils.cli import run_main  # noqa: E402
from conftest import FLAGS, TWO_EPOCHS, assert_one_line, cli, no_signal_handlers, snapshot  # noqa: E402,F401

CHEAP_AA = {"apgd": {"n_restarts": 1, "n_iter": 2}}
AA_FLAGS = ["--dataset", "Digits", "--data-dir", "unused", "--device", "cpu", "--num-workers", "0", "--n-ex", "4",
            "--version", "custom", "--attacks", "apgd-ce", "--no-progress"]


def edited_checkpoint(finished, path, **changes):
    """The finished run's checkpoint with keys changed (a value None removes the key), saved at `path`."""
    ckpt = torch.load(finished[2], weights_only=True)
    for key, value in changes.items():
        if value is None:
            del ckpt[key]
        else:
            ckpt[key] = value
    torch.save(ckpt, path)
    return str(path)


# ------------------------------------------------------------------------------------------------------------
# Data loss: every pre-existing file byte-identical afterwards
# ------------------------------------------------------------------------------------------------------------

def test_autoattack_out_never_replaces_the_checkpoint_or_another_file(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(aa, "attack_chunk", lambda *a, **k: pytest.fail("the attack ran"))
    ckpt = tmp_path / "model.pth.tar"
    shutil.copy(finished[2], ckpt)
    other = tmp_path / "other.pth.tar"
    shutil.copy(finished[2], other)
    before = snapshot(tmp_path)
    for out, extra in [(ckpt, []), (ckpt, ["--overwrite"]), (other, [])]:
        code, err = cli(auto_attack_eval.main, ["--source-net", ckpt, "--out", out] + AA_FLAGS + extra, capsys)
        assert_one_line(code, err, str(out))
        assert snapshot(tmp_path) == before, (out, extra)


def test_autoattack_overwrite_and_reruns_replace_reports(finished, tmp_path):
    """--overwrite replaces another file; a report of this tool whose chunks are kept is replaced without it
    (a rerun, or other settings: rerunning the first settings rebuilds the first report from its chunks)."""
    other = tmp_path / "notes.json"
    other.write_text("{}")
    argv = ["--source-net", finished[2], "--out", other] + AA_FLAGS

    def evaluate(*extra):
        args = parse_autoattack_args([str(a) for a in argv + list(extra)])
        return aa.evaluate_checkpoint(args, attack_params=CHEAP_AA, progress=False)
    first = evaluate("--overwrite")
    assert json.loads(other.read_text())["robust_accuracy"] == first["robust_accuracy"]
    assert evaluate()["resumed_chunks"] == 1
    assert evaluate("--epsilon", 2)["resumed_chunks"] == 0
    assert json.loads(other.read_text())["epsilon_255"] == 2
    assert evaluate()["chunks_dir"] == first["chunks_dir"]


def test_resume_of_another_checkpoint_into_a_folder_holding_a_run_is_refused(finished, tmp_path, capsys):
    other = edited_checkpoint(finished, tmp_path / "other.pth.tar", epoch=1)
    before = snapshot(finished[0])
    code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", finished[0], "--resume", other], capsys)
    assert_one_line(code, err, "already holds a run")
    assert snapshot(finished[0]) == before


def test_fresh_run_into_a_folder_holding_only_model_best_is_refused(finished, tmp_path, capsys):
    save = tmp_path / "save"
    shutil.copytree(finished[0], save)
    os.remove(os.path.join(save, os.path.relpath(finished[2], finished[0])))
    before = snapshot(save)
    code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", save], capsys)
    assert_one_line(code, err, "model_best.pth.tar")
    assert snapshot(save) == before


@pytest.mark.parametrize("ident", ["../../../../escaped", "/ABSOLUTE/escaped", "a/b", "..", "x" * 300])
def test_exp_identifier_cannot_leave_save_dir_or_overflow_a_name(tmp_path, capsys, ident):
    inner = tmp_path / "a" / "b" / "c"
    inner.mkdir(parents=True)
    before = snapshot(tmp_path)
    ident = ident.replace("/ABSOLUTE", str(tmp_path))
    code, err = cli(train_ori.main, FLAGS + ["--epochs", "1", "--save-dir", inner, "--exp-identifier", ident],
                    capsys)
    assert_one_line(code, err, "--exp-identifier")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------------------
# One bounded line and exit 2 instead of a traceback
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,arch,layer,minimum", [("0.01", "resnet18_cifar_ori", "layer1", "1/64"),
                                                      ("1e-6", "resnet18_cifar_ori", "layer1", "1/64"),
                                                      ("0.05", "wrn_28_4_cifar_ori", "conv1", "1/16")])
def test_ratio_below_the_narrowest_layer(tmp_path, capsys, ratio, arch, layer, minimum):
    argv = FLAGS + ["--epochs", "1", "--save-dir", tmp_path / "runs", "--ratio", ratio, "--arch", arch]
    code, err = cli(train_ori.main, argv, capsys)
    assert_one_line(code, err, layer, minimum)
    assert not (tmp_path / "runs").exists()


def yaml_bomb(levels=6):
    """A few hundred bytes under a real key whose value expands to 9**levels items (megabytes when printed)."""
    lines = ["seed:", "  - &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return ("\n".join(lines) + "\n").encode()


CONFIGS = {
    "not UTF-8": (b"arch: resnet18_cifar_ori\nexp_identifier: \xff\xfe\n", "UTF-8"),
    "nested 20000 deep": (b"seed: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested"),
    "alias bomb": (yaml_bomb(), "seed"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_hostile_config_files(tmp_path, capsys, case):
    data, named = CONFIGS[case]
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    code, err = cli(train_ori.main, FLAGS + ["--configs", path, "--save-dir", tmp_path / "runs"], capsys)
    assert_one_line(code, err, "--configs", named)
    assert not (tmp_path / "runs").exists()


def test_save_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    code, err = cli(train_ori.main, FLAGS + ["--epochs", "1", "--save-dir", tmp_path / "file" / "runs"], capsys)
    assert_one_line(code, err, "is a file")
    assert snapshot(tmp_path) == before


def read_only(monkeypatch, folder):
    """Make `folder` read-only, also for root (who may write anyway): os.access then answers as for a user."""
    os.chmod(folder, 0o555)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if os.path.abspath(p) == str(folder) and mode & os.W_OK else real(p, mode, **kw)))


def test_save_dir_in_a_read_only_folder(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(monkeypatch, locked)
    code, err = cli(train_ori.main, FLAGS + ["--epochs", "1", "--save-dir", locked / "runs"], capsys)
    os.chmod(locked, 0o755)
    assert_one_line(code, err, "cannot write")
    assert os.listdir(locked) == []


def test_autoattack_default_output_in_a_read_only_folder(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(aa, "attack_chunk", lambda *a, **k: pytest.fail("the attack ran"))
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(finished[2], locked / "model.pth.tar")
    before = snapshot(tmp_path)
    read_only(monkeypatch, locked)
    code, err = cli(auto_attack_eval.main, ["--source-net", locked / "model.pth.tar"] + AA_FLAGS, capsys)
    os.chmod(locked, 0o755)
    assert_one_line(code, err, "--out", "cannot write")
    assert snapshot(tmp_path) == before


def test_autoattack_out_naming_a_folder_fails_before_the_attack(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(aa, "attack_chunk", lambda *a, **k: pytest.fail("the attack ran"))
    (tmp_path / "reports").mkdir()
    before = snapshot(tmp_path)
    code, err = cli(auto_attack_eval.main, ["--source-net", finished[2], "--out", tmp_path / "reports"] + AA_FLAGS,
                    capsys)
    assert_one_line(code, err, "is a folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_seed_out_of_range(tmp_path, capsys, where):
    i = FLAGS.index("--seed")  # FLAGS' own --seed (the seed offset's) would override the config file's
    flags = FLAGS[:i] + FLAGS[i + 2:] + ["--epochs", "1", "--save-dir", tmp_path / "runs"]
    if where == "yaml":
        (tmp_path / "c.yaml").write_text(f"seed: {2**70}\n")
        flags += ["--configs", tmp_path / "c.yaml"]
    else:
        flags += ["--seed", str(2**70)]
    code, err = cli(train_ori.main, flags, capsys)
    assert_one_line(code, err, "--seed")
    code, err = cli(auto_attack_eval.main, ["--source-net", "x", "--seed", str(2**70)], capsys)
    assert_one_line(code, err, "--seed")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("changes,named", [({"best_acc": None}, "best_acc"), ({"epoch": "two"}, "epoch"),
                                           ({"epoch": 1.5}, "epoch")])
def test_our_checkpoint_with_damaged_fields(finished, tmp_path, capsys, changes, named):
    path = edited_checkpoint(finished, tmp_path / "damaged.pth.tar", **changes)
    flags = FLAGS + ["--epochs", "3", "--save-dir", tmp_path / "runs", "--resume", path]
    code, err = cli(train_ori.main, flags, capsys)
    assert_one_line(code, err, named)
    assert not (tmp_path / "runs").exists()


def test_unexpected_exception_in_a_run_leaves_status_failed(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected")
    monkeypatch.setattr(train_mod, "train_one_epoch", broken)
    with no_signal_handlers(), pytest.raises(RuntimeError):
        run_main(train_ori.main, FLAGS + ["--epochs", "1", "--save-dir", str(tmp_path)])
    folder = os.path.join(tmp_path, "training", "train_ori", os.listdir(tmp_path / "training" / "train_ori")[0])
    status = json.load(open(os.path.join(folder, "status.json")))
    assert status["state"] == "failed" and "something nobody expected" in status["message"], status


@pytest.mark.parametrize("env,named", [({"WORLD_SIZE": "2"}, "RANK"), ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
                                       ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR")])
def test_bad_launcher_environment(tmp_path, capsys, monkeypatch, env, named):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err = cli(train_ori.main, FLAGS + ["--epochs", "1", "--save-dir", tmp_path / "runs"], capsys)
    assert_one_line(code, err, named)
    assert not (tmp_path / "runs").exists()


def test_rank_not_below_world_size_exits_instead_of_hanging(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29513"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_ori.py"), *FLAGS, "--epochs", "1",
                          "--save-dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60)
    assert_one_line(out.returncode, out.stderr, "RANK=5", "WORLD_SIZE=2")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------------------
# Misleading messages
# ------------------------------------------------------------------------------------------------------------

class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_naming_the_global(tmp_path, capsys):
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": RunsACommand(tmp_path / "ran")}, path)
    code, err = cli(train_ori.main, FLAGS + ["--evaluate", "--resume", path, "--save-dir", tmp_path / "runs"],
                    capsys)
    assert_one_line(code, err, "system", "run arbitrary code")
    assert "corrupt" not in err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("mode", ["evaluate", "resume"])
def test_nan_checkpoint_is_bad_input_not_a_result_or_a_failed_run(finished, tmp_path, capsys, mode):
    ckpt = torch.load(finished[2], weights_only=True)
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    path = edited_checkpoint(finished, tmp_path / "nan.pth.tar", state_dict=nan)
    flags = FLAGS + ["--epochs", "3", "--save-dir", tmp_path / "runs", "--resume", path]
    code, err = cli(train_ori.main, flags + (["--evaluate"] if mode == "evaluate" else []), capsys)
    assert_one_line(code, err, "NaN")
    assert not (tmp_path / "runs").exists()


def test_resume_with_nothing_left_to_train_says_so(finished, tmp_path, capsys):
    code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", tmp_path / "runs", "--resume", finished[2]], capsys)
    assert_one_line(code, err, "already trained 2 epochs", "--epochs is 2")
    assert not (tmp_path / "runs").exists()
    before = snapshot(finished[0])  # the run's own folder, finished: nothing to do, nothing rewritten
    code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", finished[0], "--resume", "auto"], capsys)
    assert code == 0 and "nothing to do" in err, err
    assert snapshot(finished[0]) == before
    killed = tmp_path / "killed"  # killed after its last checkpoint, before its status said so
    shutil.copytree(finished[0], killed)
    status = os.path.join(killed, os.path.relpath(finished[1], finished[0]), "status.json")
    with open(status, "w") as f:
        json.dump({"state": "running"}, f)
    code, err = cli(train_ori.main, TWO_EPOCHS + ["--save-dir", killed, "--resume", "auto"], capsys)
    assert code == 0 and json.load(open(status))["state"] == "finished", err


def test_autoattack_epsilon_must_be_a_radius(finished, tmp_path, capsys):
    for value in ("inf", "nan", "300"):
        code, err = cli(auto_attack_eval.main, ["--source-net", finished[2], "--out", tmp_path / "r.json", "--epsilon",
                                                value] + AA_FLAGS, capsys)
        assert code == 2 and "--epsilon" in err and "Traceback" not in err, (value, err)
    assert os.listdir(tmp_path) == []


def test_momentum_and_special_resume_files(tmp_path, capsys):
    flags = FLAGS + ["--epochs", "1", "--save-dir", tmp_path / "runs"]
    assert_one_line(*cli(train_ori.main, flags + ["--momentum", "5"], capsys), "--momentum")
    assert_one_line(*cli(train_ori.main, flags + ["--resume", "/dev/null"], capsys), "not a regular file")
    (tmp_path / "empty.pth.tar").write_bytes(b"")
    assert_one_line(*cli(train_ori.main, flags + ["--resume", tmp_path / "empty.pth.tar"], capsys), "empty")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("device", ["meta", "mps", "xla"])
def test_devices_other_than_cpu_and_cuda_are_bad_input(tmp_path, capsys, device):
    """`--device meta` used to fail deep in training with a traceback and leave status.json at "running"."""
    flags = FLAGS[:-2] + ["--device", device, "--epochs", "1", "--save-dir", tmp_path / "runs"]
    assert_one_line(*cli(train_ori.main, flags, capsys), f"--device {device}")
    assert not (tmp_path / "runs").exists()
