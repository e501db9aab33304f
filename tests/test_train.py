"""End-to-end runs of train_ori.py / train_moe.py on Digits at tiny settings: resume exactness, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import models
import train
from args import parse_args
from conftest import DENSE, MOE, ROOT, THREADS, TINY, run_dir, run_script
from utils.attack import ce_loss_fn, pgd_attack
from utils.runtime import eval_start_seed
from utils.steps import StepConfig
from utils.data import LoaderConfig, build_loaders
from utils.errors import UsageError

# The resume tests train for several epochs: on 16x16 digits a batch costs a quarter of a 32x32 one.
SMALL = ["--dataset", "Digits16", "--test-batch-size", "32"]


def final_weights(save_dir):
    ckpt = torch.load(os.path.join(run_dir(save_dir), "checkpoint", "checkpoint.pth.tar"), weights_only=True)
    return ckpt["state_dict"], ckpt


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _spawn(script, argv):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_for(path_fn, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path_fn() or proc.poll() is not None:
            return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("script,base", [("train_ori.py", DENSE), ("train_moe.py", MOE)])
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, script, base):
    argv = base + SMALL + ["--epochs", "3", "--max-batches", "3"]
    ref = run_script(script, argv + ["--save-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    ref_weights, ref_ckpt = final_weights(tmp_path / "ref")

    save = tmp_path / "killed"
    proc = _spawn(script, argv + ["--save-dir", str(save)])
    # The file itself, not its `.tmp-checkpoint.pth.tar.*` temp file (a kill before the rename leaves no checkpoint).
    ckpt_exists = lambda: any(f == "checkpoint.pth.tar" for _, _, fs in os.walk(save) for f in fs)  # noqa: E731
    _wait_for(ckpt_exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, killed = final_weights(save)
    assert 0 < killed["epoch"] < 3  # the kill landed mid-run: the resume has epochs left to train
    resumed = run_script(script, argv + ["--save-dir", str(save), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    weights, ckpt = final_weights(save)
    assert ckpt["epoch"] == ref_ckpt["epoch"] == 3
    assert_same_weights(weights, ref_weights)
    for key in ("optimizer",):
        assert str(ckpt[key]["param_groups"]) == str(ref_ckpt[key]["param_groups"])
    rows = [line for line in open(os.path.join(run_dir(save), "metrics.jsonl")) if line.strip()]
    assert len(rows) == 3  # no epoch logged twice after the resume


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(tmp_path):
    argv = MOE + SMALL + ["--epochs", "2", "--max-batches", "12"]
    ref = run_script("train_moe.py", argv + ["--save-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    ref_weights, _ = final_weights(tmp_path / "ref")

    save = tmp_path / "term"
    proc = _spawn("train_moe.py", argv + ["--save-dir", str(save)])
    metrics_has_row = lambda: any(  # noqa: E731
        os.path.getsize(os.path.join(d, f)) > 0 for d, _, fs in os.walk(save) for f in fs if f == "metrics.jsonl")
    _wait_for(metrics_has_row, proc)
    time.sleep(1.0)  # into epoch 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    _, ckpt = final_weights(save)
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] > 0
    resumed = run_script("train_moe.py", argv + ["--save-dir", str(save), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    weights, ckpt = final_weights(save)
    assert ckpt["epoch"] == 2
    assert_same_weights(weights, ref_weights)


@pytest.mark.slow
def test_evaluate_records_sa_and_ra(tmp_path):
    """--evaluate of a checkpoint gives the SA and RA its training run measured on the same test batch (same
    weights, same seeded random starts); SA and RA are counted by hand (RA: the run's PGD from the batch's seeded
    random start). Not `ra <= sa`: RA does not count clean-correct points only, and after 2 batches SA was 6-8%
    here, RA once equal to it."""
    argv = DENSE + ["--epochs", "1", "--max-batches", "2", "--save-dir", str(tmp_path)]
    assert run_script("train_ori.py", argv).returncode == 0
    training = run_dir(tmp_path / "training")
    trained = [json.loads(line) for line in open(os.path.join(training, "metrics.jsonl"))][-1]
    best = os.path.join(training, "checkpoint", "model_best.pth.tar")
    out = run_script("train_ori.py", argv + ["--evaluate", "--resume", best])
    assert out.returncode == 0, out.stderr
    row = json.loads(open(os.path.join(run_dir(tmp_path / "evaluate"), "metrics.jsonl")).readline())
    assert row["n"] == 64 and (row["sa"], row["ra"]) == (trained["sa"], trained["ra"])
    assert f"SA {row['sa']:.2f}% | RA {row['ra']:.2f}%" in out.stdout + out.stderr

    flags = parse_args(argv, script="train_ori")
    _, _, test_loader, _ = build_loaders(LoaderConfig("Digits", "unused", batch_size=32, test_batch_size=64,
                                                      num_workers=0, seed=flags.seed), "cpu")
    model = models.build_model("resnet18_cifar_ori", num_classes=10, ratio=0.125)
    model.load_state_dict(torch.load(best, weights_only=True)["state_dict"])
    x, y = next(iter(test_loader))
    # on the run's thread count (conftest: this session's, which the run inherits): the same computation
    assert torch.get_num_threads() == THREADS
    with torch.no_grad():
        correct = (model.eval()(x).argmax(1) == y).sum().item()
    x_adv = pgd_attack(model, x, ce_loss_fn(y), eps=flags.epsilon_test, step_size=flags.step_size_test,
                       num_steps=flags.num_steps_test, random_start="uniform",
                       generator=torch.Generator().manual_seed(eval_start_seed(flags.seed, 0)))
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).sum().item()
    assert row["sa"] == pytest.approx(100 * correct / 64)
    assert row["ra"] == pytest.approx(100 * robust / 64)


def _snapshot(path):
    return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
                  for d, _, fs in os.walk(path) for f in fs)


BAD_INPUTS = [
    ("train_ori.py", ["--arch", "resnet18_cifar_orx"]),                       # unknown arch
    ("train_ori.py", DENSE + ["--ratio", "1.5"]),                             # ratio out of range
    ("train_ori.py", DENSE + ["--ratio", "0"]),
    ("train_ori.py", DENSE + ["--epsilon", "-0.1"]),                          # negative eps
    ("train_ori.py", DENSE + ["--num-steps", "-1"]),                          # negative steps
    ("train_moe.py", MOE + ["--grad-clip", "-1"]),                            # negative clip norm
    ("train_ori.py", DENSE + ["--n-expert", "4"]),                            # n_expert for a dense arch
    ("train_moe.py", ["--arch", "resnet18_cifar_moe"] + TINY),                # missing --n-expert
    ("train_ori.py", ["--arch", "resnet18_cifar_moe", "--n-expert", "2"] + TINY),  # MoE arch in dense script
    ("train_ori.py", ["--arch", "resnet18_cifar_ori"] + TINY[2:] + ["--dataset", "CIFAR10", "--data-dir",
                                                                     "/nonexistent/data"]),  # missing dataset
]


@pytest.mark.slow
@pytest.mark.parametrize("script,argv", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, script, argv):
    out = run_script(script, argv + ["--save-dir", str(tmp_path / "runs")])
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_bad_checkpoints_exit_2_and_overwrite_nothing(tmp_path):
    argv = DENSE + SMALL + ["--epochs", "1", "--max-batches", "1", "--save-dir", str(tmp_path / "runs")]
    assert run_script("train_ori.py", argv).returncode == 0
    before = _snapshot(tmp_path / "runs")
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(b"not a checkpoint at all")
    other = tmp_path / "other.pth.tar"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(3)}, "arch": "vgg16_bn_ori"}, other)
    best = os.path.join(run_dir(tmp_path / "runs"), "checkpoint", "model_best.pth.tar")
    cases = [
        argv + ["--evaluate", "--resume", str(tmp_path / "missing.pth.tar")],
        argv + ["--evaluate", "--resume", str(corrupt)],
        argv + ["--evaluate", "--resume", str(other)],
        [a if a != "0.125" else "0.25" for a in argv] + ["--evaluate", "--resume", best],  # other ratio
        argv,  # a fresh run into a folder that already holds a checkpoint
    ]
    for case in cases:
        out = run_script("train_ori.py", case)
        assert out.returncode == 2, (case, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert _snapshot(tmp_path / "runs") == before


# ------------------------------------------------------------------------------------------------ settings

def test_step_settings_are_the_flags_and_default_to_the_command_lines():
    """One source of settings: `StepConfig()` is the step a user runs by default under the paper recipe, and a
    run's step reads every setting from its flags (none missing, no fallback)."""
    args = parse_args(["--arch", "resnet18_cifar_moe", "--n-expert", "2", "--advmoe-recipe", "paper"],
                      script="train_moe")
    assert StepConfig.from_args(args) == StepConfig()
    assert StepConfig.from_args(parse_args(["--arch", "resnet18_cifar_ori"], script="train_ori")) == StepConfig()
    args = parse_args(MOE + ["--at", "pgd", "--epsilon", "4/255", "--step-size", "1/255", "--beta", "3",
                             "--alpha", "2", "--router-objective", "reference", "--balance", "switch",
                             "--balance-strength", "0.5", "--router-grad-clip", "0", "--grad-clip", "2"],
                      script="train_moe")
    assert StepConfig.from_args(args) == StepConfig(
        at="pgd", eps=4 / 255, step_size=1 / 255, num_steps=1, beta=3.0, alpha=2.0, router_objective="reference",
        attack_router_kl="router-step", balance="switch", balance_strength=0.5, router_grad_clip=0.0, grad_clip=2.0)
    del args.grad_clip
    with pytest.raises(AttributeError):
        StepConfig.from_args(args)


def test_unknown_moe_training_is_a_usage_error_for_code_calling_run(tmp_path):
    """The parser refuses unknown --moe-training values; `train.run` called from code must too (not train joint)."""
    args = parse_args(MOE + ["--epochs", "1", "--max-batches", "1", "--save-dir", str(tmp_path / "runs")],
                      script="train_moe")
    args.moe_training = "jiont"
    with pytest.raises(UsageError, match="--moe-training 'jiont'"):
        train.run(args, "train_moe")
    assert not (tmp_path / "runs").exists()
