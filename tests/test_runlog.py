"""Run folders: names as the reference, the files a run writes (only once entered, only on rank 0), and the
per-epoch line."""
import argparse
import json
import logging
import os
import re
import subprocess

import pytest
import torch
import yaml

import args as args_mod
from utils.runlog import RunLogger, format_epoch_line, run_dir, run_folder_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_args(**kw):
    base = dict(dataset="CIFAR10", arch="resnet18_cifar_moe", ratio=0.5, epochs=100, lr=0.1, epsilon=8 / 255,
                num_steps=2, beta=6.0, n_expert=2, seed=1234, exp_identifier=None, save_dir="results",
                evaluate=False, device="cpu", configs=None)
    base.update(kw)
    return argparse.Namespace(**base)


# ------------------------------------------------------------------------------------------------ names

def test_run_folder_name_as_the_reference_without_its_double_dash():
    assert run_folder_name(make_args(), "train_moe") == \
        "CIFAR10-resnet18_cifar_moe-ratio0.5-epochs100-lr0.1-eps8-steps2-beta6-expert2-seed1234"
    dense = make_args(arch="resnet18_cifar_ori", n_expert=None, ratio=1.0, exp_identifier="dense", lr=0.05,
                      epsilon=2 / 255, num_steps=10, beta=1.5, dataset="Digits", epochs=4, seed=0)
    assert run_folder_name(dense, "train_ori") == \
        "dense_Digits-resnet18_cifar_ori-ratio1-epochs4-lr0.05-eps2-steps10-beta1.5-seed0"


@pytest.mark.parametrize("eps, k", [(k / 255, k) for k in range(0, 33)] + [(0.0313, 8), (0.0157, 4), (0.03, 8)])
def test_eps_in_the_name_is_the_rounded_255_count(eps, k):
    # eps typed as a decimal (0.0313 = 7.98/255) must not be truncated to 7 as int() would
    assert f"-eps{k}-" in run_folder_name(make_args(epsilon=eps))


def test_run_dir_layout(tmp_path):
    args = make_args(save_dir=str(tmp_path), exp_identifier="advmoe")
    name = run_folder_name(args)
    assert run_dir(args, "train_moe") == os.path.join(str(tmp_path), "training", "train_moe", name)
    assert run_dir(args, "train_moe", evaluate=True) == os.path.join(str(tmp_path), "evaluate", "train_moe", name)
    args.evaluate = True  # default: follows --evaluate
    assert run_dir(args, "train_ori") == os.path.join(str(tmp_path), "evaluate", "train_ori", name)
    assert run_dir(args, "train_ori", evaluate=False).split(os.sep)[-3] == "training"


def test_names_from_the_real_parser_are_unique_per_setting():
    parse_args = args_mod.parse_args
    a = parse_args(["--arch", "resnet18_cifar_moe", "--n-expert", "2", "--ratio", "0.5"])
    b = parse_args(["--arch", "resnet18_cifar_moe", "--n-expert", "4", "--ratio", "0.5"])
    c = parse_args(["--arch", "resnet18_cifar_ori", "--ratio", "0.5"], script="train_ori")
    names = {run_folder_name(x) for x in (a, b, c)}
    assert len(names) == 3 and all("--" not in n for n in names)


# ------------------------------------------------------------------------------------------------ RunLogger

def test_nothing_is_written_before_entering(tmp_path):
    folder = tmp_path / "run"
    log = RunLogger(folder, make_args())
    assert not folder.exists()
    with log:
        pass
    assert sorted(os.listdir(folder)) == ["args.yaml", "provenance.json", "setup.log"]


def test_run_logger_writes_its_files(tmp_path, capsys):
    folder = tmp_path / "run"
    args = make_args(configs="c.yaml")
    with RunLogger(folder, args) as log:
        log.info("hello run")
        log.log_metrics({"epoch": 1, "sa": 50.0, "load_clean": torch.tensor([60.0, 40.0])})
        log.log_metrics({"epoch": 2, "sa": 55.5, "ra": torch.tensor(20.25)})
        log.set_status("finished", "ok")
    assert "hello run" in (folder / "setup.log").read_text()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"epoch": 1, "sa": 50.0, "load_clean": [60.0, 40.0]}, {"epoch": 2, "sa": 55.5, "ra": 20.25}]
    saved = yaml.safe_load((folder / "args.yaml").read_text())
    assert saved == {k: v for k, v in vars(args).items() if k != "configs"}
    prov = json.loads((folder / "provenance.json").read_text())
    assert {"git_commit", "git_dirty", "torch", "hostname", "command", "start_time", "device"} <= set(prov)
    assert prov["torch"] == torch.__version__ and prov["device"] == "cpu"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert prov["git_commit"] == head.stdout.strip() and isinstance(prov["git_dirty"], bool)
    assert json.loads((folder / "status.json").read_text())["state"] == "finished"
    assert capsys.readouterr().out.count("hello run") == 1


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_no_duplicated_handlers_across_instances(tmp_path, capsys):
    root = logging.getLogger()
    spy = Collect()  # as if some library had called logging.basicConfig: lines must not reach it too
    root.addHandler(spy)
    before = list(root.handlers)
    try:
        for i in range(3):
            with RunLogger(tmp_path / "run", make_args()) as log:
                log.info(f"line {i}")
        assert root.handlers == before  # nothing added to the root logger either
    finally:
        root.removeHandler(spy)
    assert spy.records == []
    text = (tmp_path / "run" / "setup.log").read_text()
    assert [text.count(f"line {i}") for i in range(3)] == [1, 1, 1]
    assert capsys.readouterr().out.count("line 2") == 1
    assert not [n for n in logging.Logger.manager.loggerDict if n.startswith("advmoe.run.")]


def test_resumed_run_keeps_earlier_provenance(tmp_path):
    for _ in range(2):
        with RunLogger(tmp_path / "run", make_args()):
            pass
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert len(prov["previous"]) == 1 and "previous" not in prov["previous"][0]


def test_non_main_rank_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "run"
    with RunLogger(folder, make_args(), is_main=False) as log:
        log.info("quiet")
        log.log_metrics({"epoch": 1})
        log.set_status("running")
        log.warning("loud")
    assert not folder.exists()
    out = capsys.readouterr().out
    assert "quiet" not in out and "loud" in out


def test_args_yaml_of_a_real_run_reloads_with_configs(tmp_path):
    args = args_mod.parse_args(["--arch", "resnet18_cifar_moe", "--n-expert", "2", "--epsilon", "4/255"])
    with RunLogger(tmp_path / "run", args):
        pass
    again = args_mod.parse_args(["--configs", str(tmp_path / "run" / "args.yaml")])
    assert {**vars(again), "configs": None} == vars(args)


# ------------------------------------------------------------------------------------------------ epoch line

ROW = {"epoch": 3, "epochs": 100, "lr": 0.0976, "train_loss": 1.2345, "sa": 91.23, "ra": 71.1, "best_ra": 71.1,
       "best_epoch": 3, "seconds": 12.34}


def test_epoch_line():
    assert format_epoch_line(ROW) == \
        "epoch   3/100 | lr 0.0976 | loss 1.2345 | SA  91.23% | RA  71.10% | best RA  71.10% (ep 3) | 12.3s"


def test_epoch_lines_align_across_epochs_and_accuracies():
    a = format_epoch_line(ROW)
    b = format_epoch_line({**ROW, "epoch": 100, "sa": 5.0, "ra": 100.0, "lr": 0.1, "train_loss": 0.5})
    assert [m.start() for m in re.finditer(r"\|", a)] == [m.start() for m in re.finditer(r"\|", b)]


def test_epoch_line_moe_extras_and_missing_fields():
    line = format_epoch_line({**ROW, "val_ra": 60.0, "router_robustness": 88.5, "expert_robustness": 70.0,
                              "load_clean": [62.4, 37.6]})
    assert line.endswith("| router rob  88.50% | expert RA  70.00% | load 62/38% | 12.3s")
    assert "val RA  60.00%" in line
    short = format_epoch_line({"epoch": 1, "epochs": 5, "lr": 0.1, "train_loss": 2.0, "seconds": 1.0})
    assert short == "epoch 1/5 | lr 0.1000 | loss 2.0000 | 1.0s"
    assert "loss nan" in format_epoch_line({**ROW, "train_loss": float("nan")})
