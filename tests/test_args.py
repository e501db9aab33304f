"""The shared parser: reference flags and defaults, YAML configs, validation, and the one-line CLI errors."""
import argparse
import os
import subprocess
import sys

import pytest
import yaml

from args import (get_args_parser, get_autoattack_parser, load_yaml_defaults, number, parse_args,
                  validate_args)
import args as args_module
from utils import runtime, update
from utils.cli import run_main
from utils.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE, MOE = "resnet18_cifar_ori", "resnet18_cifar_moe"


# The reference's table (shared/reference/README.md), spelled out: flag dest -> default.
REFERENCE_DEFAULTS = {
    "configs": None, "exp_identifier": None, "seed": 1234, "resume": "", "dataset": "CIFAR10",
    "data_dir": "../data/", "num_workers": 6, "batch_size": 128, "test_batch_size": 128, "normalize": False,
    "data_fraction": 0.9, "epochs": 100, "optimizer": "sgd", "momentum": 0.9, "wd": 5e-4, "lr": 0.1,
    "lr_schedule": "cosine", "router_optimizer": "sgd", "router_lr": 0.1, "router_lr_schedule": "cosine",
    "epsilon": 8 / 255, "num_steps": 2, "step_size": 5 / 255, "epsilon_test": 8 / 255, "num_steps_test": 10,
    "step_size_test": 2 / 255, "beta": 6.0, "alpha": 6.0, "evaluate": False, "ratio": 1.0, "n_expert": None,
}
# Our additions.
EXTRA_DEFAULTS = {
    "at": "trades", "device": "auto", "save_dir": "results", "moe_training": "advmoe", "router_objective": "robust",
    "routing": "global", "amp": None, "compile": False, "deterministic": False, "no_progress": False,
    "max_batches": None, "max_test_batches": None, "eval_every": 1, "balance": "median", "balance_strength": 1.0,
    "router_logit_cap": 2.0, "router_grad_clip": 1.0, "grad_clip": 1.0, "sync_bn": False, "sparse": True,
    "moe_stages": None, "top_k": 1, "per_expert": False, "tensorboard": False,
}


def parse(*argv):
    return parse_args([str(a) for a in argv], script="train_moe")


def write_yaml(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


# ------------------------------------------------------------------------------------------------ defaults

def test_defaults_equal_the_reference_table():
    args = parse("--arch", DENSE)
    for dest, default in {**REFERENCE_DEFAULTS, **EXTRA_DEFAULTS}.items():
        assert getattr(args, dest) == pytest.approx(default) if isinstance(default, float) else \
            getattr(args, dest) == default, dest
    assert args.arch == DENSE


def test_every_reference_flag_is_spelled_as_in_the_reference():
    options = {s for a in get_args_parser()._actions for s in a.option_strings}
    for dest in REFERENCE_DEFAULTS:
        assert "--" + dest.replace("_", "-") in options, dest
    for flag in ("--arch", "--amp", "--no-amp", "--sparse", "--no-sparse", "--eval-every"):
        assert flag in options


def test_arch_is_required_and_its_choices_are_the_registry():
    import models
    arch = next(a for a in get_args_parser()._actions if a.dest == "arch")
    assert arch.required and list(arch.choices) == list(models.list_models())
    with pytest.raises(SystemExit) as e:
        parse_args([])
    assert e.value.code == 2


def test_arch_choices_come_from_models_list_models(monkeypatch):
    import models
    for where in (models, models.registry):  # the parser's choices and the spec's check
        monkeypatch.setattr(where, "list_models", lambda: ["tiny_ori", "tiny_moe"])
    assert parse_args(["--arch", "tiny_moe", "--n-expert", "3"]).arch == "tiny_moe"
    with pytest.raises(SystemExit):
        parse_args(["--arch", DENSE])


def test_arch_typo_exits_2_listing_valid_names(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--arch", "resnet18_cifar_mo", "--n-expert", 2)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "resnet18_cifar_mo'" in err and MOE in err and DENSE in err
    assert len(err.strip().splitlines()) == 2  # a short usage line and the error


def test_flag_abbreviations_are_refused():
    with pytest.raises(SystemExit):
        parse("--arch", DENSE, "--epoch", 5)  # would silently mean --epochs with argparse's default


@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), (" 2 / 255 ", 2 / 255), ("0.5", 0.5), ("1e-3", 1e-3),
                                         ("-4/255", -4 / 255), (".5/2", 0.25), (3, 3.0)])
def test_number_accepts_floats_and_fractions(text, value):
    assert number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["8/0", "nan", "inf", "2*3", "__import__('os')", "8/255/2", "", "abc", True])
def test_number_evaluates_nothing_else(text):
    with pytest.raises(argparse.ArgumentTypeError):
        number(text)


def test_fractions_on_the_command_line():
    args = parse("--arch", DENSE, "--epsilon", "4/255", "--step-size", "1/255", "--epsilon-test", "16/255",
                 "--step-size-test", "0.004")
    assert (args.epsilon, args.step_size, args.epsilon_test, args.step_size_test) == \
        pytest.approx((4 / 255, 1 / 255, 16 / 255, 0.004))


def test_boolean_optional_flags():
    assert parse("--arch", DENSE, "--amp").amp is True
    assert parse("--arch", DENSE, "--no-amp").amp is False
    assert parse("--arch", MOE, "--n-expert", 2, "--no-sparse").sparse is False


# ------------------------------------------------------------------------------------------------ YAML

def test_yaml_values_become_defaults_and_the_command_line_wins(tmp_path):
    cfg = write_yaml(tmp_path, {"arch": MOE, "n-expert": 4, "epochs": 7, "lr": 0.05, "epsilon": "4/255",
                                "num_steps": 3, "normalize": True, "lr-schedule": "step", "exp_identifier": "yml"})
    args = parse("--configs", cfg)
    assert (args.arch, args.n_expert, args.epochs, args.lr, args.num_steps, args.normalize, args.lr_schedule,
            args.exp_identifier) == (MOE, 4, 7, 0.05, 3, True, "step", "yml")
    assert args.epsilon == pytest.approx(4 / 255)
    assert args.seed == 1234  # untouched flags keep their defaults
    args = parse("--configs", cfg, "--epochs", 9, "--epsilon", "2/255", "--n-expert", 2)
    assert (args.epochs, args.n_expert, args.lr) == (9, 2, 0.05)
    assert args.epsilon == pytest.approx(2 / 255)


def test_configs_flag_may_come_after_other_flags(tmp_path):
    cfg = write_yaml(tmp_path, {"epochs": 3})
    assert parse("--arch", DENSE, "--configs", cfg).epochs == 3
    assert parse("--arch", DENSE, f"--configs={cfg}").epochs == 3


@pytest.mark.parametrize("data, named", [
    ({"arch": DENSE, "epoks": 3, "lrr": 1}, "epoks, lrr"),
    ({"arch": DENSE, "configs": "other.yaml"}, "configs"),
    ({"arch": DENSE, "help": True}, "help"),
    ("- 1\n- 2\n", "mapping"),
    ("just a string\n", "mapping"),
    ("arch: [unclosed\n", "not valid YAML"),
    ({"arch": DENSE, "epochs": 1.5}, "integer"),
    ({"arch": DENSE, "epochs": True}, "integer"),
    ({"arch": DENSE, "normalize": "yes"}, "true or false"),
    ({"arch": DENSE, "dataset": "MNIST"}, "dataset"),
    ({"arch": DENSE, "epsilon": "8/0"}, "epsilon"),
    ({"arch": DENSE, "data_dir": None}, "data_dir"),
    ({"arch": DENSE, "lr": [0.1, 0.2]}, "single value"),
])
def test_bad_yaml_is_a_usage_error(tmp_path, data, named):
    with pytest.raises(UsageError, match="--configs") as e:
        parse("--configs", write_yaml(tmp_path, data))
    assert named in str(e.value)


def test_unreadable_or_missing_yaml_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="missing.yaml"):
        parse("--arch", DENSE, "--configs", tmp_path / "missing.yaml")
    with pytest.raises(UsageError, match="--configs"):
        parse("--arch", DENSE, "--configs", tmp_path)  # a directory


def test_empty_yaml_changes_nothing(tmp_path):
    assert vars(parse("--arch", DENSE, "--configs", write_yaml(tmp_path, ""))) == \
        {**vars(parse("--arch", DENSE)), "configs": str(tmp_path / "c.yaml")}


def test_yaml_strings_are_converted_like_the_command_line(tmp_path):
    values = load_yaml_defaults(write_yaml(tmp_path, "epochs: '12'\nratio: 1/2\namp: null\n"), get_args_parser())
    assert values == {"epochs": 12, "ratio": 0.5, "amp": None}


# ------------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("flags, named", [
    (["--ratio", 0], "--ratio"),
    (["--ratio", 1.5], "--ratio"),
    (["--ratio", -0.5], "--ratio"),
    (["--epsilon=-1/255"], "--epsilon"),
    (["--epsilon", 8], "8/255"),  # 1/255 units by mistake: the message shows the right form
    (["--epsilon-test", 1.5], "--epsilon-test"),
    (["--step-size", "-0.01"], "--step-size"),
    (["--step-size-test", "-0.01"], "--step-size-test"),
    (["--num-steps", -1], "--num-steps"),
    (["--num-steps-test", -2], "--num-steps-test"),
    (["--epochs", 0], "--epochs"),
    (["--batch-size", 0], "--batch-size"),
    (["--test-batch-size", 0], "--test-batch-size"),
    (["--lr", -0.1], "--lr"),
    (["--eval-every", 0], "--eval-every"),
    (["--max-batches", 0], "--max-batches"),
    (["--data-fraction", 0], "--data-fraction"),
])
def test_out_of_range_values_are_usage_errors(flags, named):
    with pytest.raises(UsageError) as e:
        parse("--arch", DENSE, *flags)
    assert named in str(e.value)


def test_boundary_values_are_accepted():
    args = parse("--arch", DENSE, "--ratio", 1, "--epsilon", 0, "--num-steps", 0, "--epochs", 1, "--batch-size", 1)
    assert (args.ratio, args.epsilon, args.num_steps) == (1.0, 0.0, 0)
    assert parse("--arch", DENSE, "--epsilon", 1, "--ratio", "1/64").ratio == 1 / 64


def test_n_expert_only_with_moe_archs():
    with pytest.raises(UsageError, match="MoE archs"):
        parse("--arch", DENSE, "--n-expert", 2)
    with pytest.raises(UsageError, match=f"--n-expert is required for the MoE arch {MOE}"):
        parse("--arch", MOE)
    with pytest.raises(UsageError, match="--n-expert must be >= 1"):
        parse("--arch", MOE, "--n-expert", 0)
    assert parse("--arch", MOE, "--n-expert", 1).n_expert == 1


def test_evaluate_needs_an_existing_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="--evaluate needs --resume"):
        parse("--arch", DENSE, "--evaluate")
    with pytest.raises(UsageError, match="not 'auto'"):
        parse("--arch", DENSE, "--evaluate", "--resume", "auto")
    with pytest.raises(UsageError, match="no such file"):
        parse("--arch", DENSE, "--evaluate", "--resume", tmp_path / "nope.pth.tar")
    with pytest.raises(UsageError, match="directory"):
        parse("--arch", DENSE, "--resume", tmp_path)
    ckpt = tmp_path / "c.pth.tar"
    ckpt.write_bytes(b"x")
    assert parse("--arch", DENSE, "--evaluate", "--resume", ckpt).resume == str(ckpt)
    assert parse("--arch", DENSE, "--resume", "auto").resume == "auto"


def test_validate_args_checks_a_namespace_built_elsewhere():
    args = parse("--arch", MOE, "--n-expert", 2)
    args.ratio = 0
    with pytest.raises(UsageError, match="--ratio"):
        validate_args(args)


# ------------------------------------------------------------------------------------------------ AutoAttack

def test_autoattack_parser_defaults():
    args = get_autoattack_parser().parse_args(["--source-net", "c.pth.tar"])
    assert (args.arch, args.ratio, args.n_expert, args.normalize, args.routing) == (None,) * 5
    assert (args.dataset, args.data_dir, args.num_workers, args.batch_size, args.seed) == \
        (None, "../data/", 6, 128, 1234)
    assert (args.epsilon, args.version, args.attacks, args.n_ex, args.norm, args.out, args.device,
            args.chunk_size, args.no_progress, args.sparse) == \
        (8, "standard", None, None, "Linf", None, "auto", 500, False, True)
    args = get_autoattack_parser().parse_args(["--source-net", "c", "--version", "custom", "--attacks", "apgd-ce",
                                               "apgd-t", "--epsilon", "4", "--no-normalize", "--arch", MOE])
    assert (args.attacks, args.epsilon, args.normalize, args.arch) == (["apgd-ce", "apgd-t"], 4.0, False, MOE)
    with pytest.raises(SystemExit):
        get_autoattack_parser().parse_args(["--source-net", "c", "--version", "fast"])


# ------------------------------------------------------------------------------------------------ run_main

def _raiser(exc):
    def main(argv):
        raise exc
    return main


def test_run_main_usage_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        run_main(_raiser(UsageError("checkpoint x.pth:\n  is corrupt\n\t(truncated)")))
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: checkpoint x.pth: is corrupt (truncated)\n"


def test_run_main_ctrl_c_exits_130_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        run_main(_raiser(KeyboardInterrupt()))
    assert e.value.code == 130
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_run_main_passes_argv_and_keeps_bugs_as_tracebacks():
    seen = []
    run_main(seen.append, ["--x", "1"])
    assert seen == [["--x", "1"]]
    with pytest.raises(ZeroDivisionError):
        run_main(_raiser(ZeroDivisionError("bug")))


def test_run_main_maps_the_training_loop_stops(capsys):
    with pytest.raises(SystemExit) as e:
        run_main(_raiser(runtime.Interrupted()))
    assert e.value.code == runtime.REQUEUE_EXIT_CODE
    assert "--resume auto" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_main(_raiser(update.NonFiniteError("training loss is not finite (NaN/inf)")))
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == "error: training loss is not finite (NaN/inf)"


def test_entry_script_bad_flag_is_one_line_exit_2_and_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, os.path.join(ROOT, "train_ori.py"), "--arch", DENSE, "--ratio", "0",
           "--save-dir", str(tmp_path / "results")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["error: --ratio must be in (0, 1], got 0.0"]
    assert list(tmp_path.iterdir()) == []


def test_digits_defaults_to_small_batches_unless_told_otherwise():
    args = parse("--arch", DENSE, "--dataset", "Digits")
    assert (args.batch_size, args.num_workers) == (32, 0)
    args = parse("--arch", DENSE, "--dataset", "Digits", "--batch-size", 128, "--num-workers", 2)
    assert (args.batch_size, args.num_workers) == (128, 2)
    assert (parse("--arch", DENSE).batch_size, parse("--arch", DENSE).num_workers) == (128, 6)


def test_readme_flags_table_is_the_parsers():
    """docs/flags.md's table is `args.flags_table()` verbatim: a flag added, renamed or re-defaulted without
    regenerating it fails here."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "flags.md")).read()
    start = readme.index("| flag | default | meaning |")
    assert readme[start:readme.index("\n\n", start)] == args_module.flags_table()
