"""Per-expert evaluation, fast adversarial training and --tensorboard (issue 13, items 3-5)."""
import copy
import os
import json
import sys
import types

import pytest
import torch
import yaml

import models
from utils import advmoe, steps
from utils.tools import report
from utils.errors import UsageError
from utils.evaluate import EvalConfig, evaluate, evaluate_per_expert, forced_routing
from utils.update import StepContext
from utils.losses import robust_loss
from utils.scalars import ScalarLog, summary_writer_class
from conftest import seeded

EPS = 0.1


def _batch(b=8, seed=1):
    g = torch.Generator().manual_seed(seeded(seed))
    return torch.rand(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)


def _always_picks(model, e):
    """A copy of `model` whose router(s) always pick expert `e`: zero weights, bias favouring e."""
    fixed = copy.deepcopy(model)
    routers = [fixed.router] if fixed.routing_mode == "global" else \
        [m.router for m in fixed.modules() if isinstance(m, models.base.MoEConv2d)]
    with torch.no_grad():
        for r in routers:
            r.fc.weight.zero_()
            r.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(e), fixed.n_expert).float() * 10)
    return fixed


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["global", "layer"])
def test_forcing_an_expert_equals_a_model_whose_router_always_picks_it(routing):
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=3, routing=routing).eval()
    x, y = _batch()
    loader = [(x, y), _batch(seed=2)]
    cfg = EvalConfig(eps=EPS, step_size=EPS / 4, num_steps=3, seed=5, progress=False)
    per_expert = evaluate_per_expert(model, loader, cfg, "cpu")
    for e in range(3):
        fixed = _always_picks(model, e)
        with torch.no_grad():
            torch.testing.assert_close(model(x, expert=forced_routing(model, e, len(x), "cpu")), fixed(x))
        ev = evaluate(fixed, loader, cfg, "cpu", moe_metrics=False)
        assert per_expert["per_expert_sa"][e] == ev["sa"]
        assert per_expert["per_expert_ra"][e] == ev["ra"]
    # the experts differ (their own random weights): the forcing reaches every layer, not just the first
    with torch.no_grad():
        outs = [model(x, expert=forced_routing(model, e, len(x), "cpu")) for e in range(3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


class Counter:
    """Counts torch.autograd.grad / backward calls and eval/train-mode forwards of the whole model."""

    def __init__(self, model, monkeypatch):
        self.grads = self.backwards = 0
        self.forwards = {"eval": 0, "train": 0}
        model.register_forward_pre_hook(lambda m, a: self.forwards.__setitem__(
            "train" if m.training else "eval", self.forwards["train" if m.training else "eval"] + 1))
        grad, backward = torch.autograd.grad, torch.autograd.backward

        def counted_grad(*a, **k):
            self.grads += 1
            return grad(*a, **k)

        def counted_backward(*a, **k):
            self.backwards += 1
            return backward(*a, **k)
        monkeypatch.setattr(torch.autograd, "grad", counted_grad)
        monkeypatch.setattr(torch.autograd, "backward", counted_backward)


def test_fast_attack_is_one_fgsm_step_inside_the_eps_ball(monkeypatch):
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_ori", ratio=0.125).train()
    x, y = _batch()
    counter = Counter(model, monkeypatch)
    out = robust_loss(model, x, y, steps.StepConfig(at="fast", eps=EPS, step_size=0.5, num_steps=7, beta=6.0),
                      generator=torch.Generator().manual_seed(seeded(3)))
    assert counter.grads == 1 and counter.forwards == {"eval": 1, "train": 1}  # one gradient per attack
    delta = out["x_adv"] - x
    assert delta.abs().max() <= EPS + 1e-6 and out["x_adv"].min() >= 0 and out["x_adv"].max() <= 1
    # the FGSM step of 1.25 eps from a uniform start leaves most pixels on the ball's surface or at [0,1]
    on_edge = (delta.abs() > EPS - 1e-6) | (out["x_adv"] == 0) | (out["x_adv"] == 1)
    assert on_edge.float().mean() > 0.5


@pytest.mark.parametrize("kind", ["advmoe", "joint"])
def test_fast_at_steps_take_one_gradient_per_attack(monkeypatch, kind):
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=2).train()
    x, y = _batch()
    cfg = steps.StepConfig(at="fast", eps=EPS, num_steps=5)
    counter = Counter(model, monkeypatch)
    if kind == "advmoe":
        opt = torch.optim.SGD(model.backbone_parameters(), lr=0.01)
        router_opt = torch.optim.SGD(model.router_parameters(), lr=0.01)
        out = advmoe.advmoe_step(model, x, y, cfg, StepContext(opt, router_opt))
        attacks = 2  # router step and expert step
    else:
        out = steps.joint_step(model, x, y, cfg, StepContext(torch.optim.SGD(model.parameters(), lr=0.01)))
        attacks = 1
    assert counter.grads == attacks and counter.backwards == attacks
    assert (out["x_adv"] - x).abs().max() <= EPS + 1e-6


class _FakeWriter:
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_writer_gets_every_number_of_a_row(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_FakeWriter))
    log = ScalarLog(summary_writer_class(), str(tmp_path))
    log.write({"epoch": 3, "sa": 90.5, "load_clean": [40.0, 60.0], "collapse": False, "checkpoint": "x"}, 3)
    log.close()
    w = _FakeWriter.made[-1]
    assert w.log_dir == str(tmp_path / "tensorboard") and w.closed
    assert w.scalars == [("epoch", 3.0, 3), ("sa", 90.5, 3), ("load_clean/0", 40.0, 3), ("load_clean/1", 60.0, 3),
                         ("collapse", 0.0, 3)]


def test_tensorboard_missing_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.raises(UsageError, match="pip install tensorboard"):
        summary_writer_class()


def test_report_table_shows_each_expert_next_to_the_routed_model(tmp_path):
    folder = tmp_path / "evaluate" / "train_moe" / "run"
    folder.mkdir(parents=True)
    (folder / "args.yaml").write_text(yaml.safe_dump({"evaluate": True, "arch": "resnet18_cifar_moe", "n_expert": 2}))
    row = {"checkpoint": "/x/checkpoint/model_best.pth.tar", "sa": 90.0, "ra": 40.0,
           "per_expert_sa": [88.5, 70.25], "per_expert_ra": [45.0, 20.5]}
    (folder / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "status.json").write_text(json.dumps({"state": "finished", "message": ""}))
    table = report.markdown_table(report.collect([str(tmp_path)]))
    header, _, line = table.splitlines()[:3]
    assert header.endswith("| expert 0 alone: SA | expert 0 alone: PGD RA | expert 1 alone: SA | "
                           "expert 1 alone: PGD RA |")
    assert line.endswith("| 90.00 ± 0.00 | 40.00 ± 0.00 | - | - | - | - | - | 88.50 ± 0.00 | 45.00 ± 0.00 | "
                         "70.25 ± 0.00 | 20.50 ± 0.00 |")  # AA .. PGD - AA: none


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")  # no training step: no optimizer step
def test_collapse_of_validation_ra_is_reported_and_the_best_checkpoint_kept(monkeypatch, tmp_path):
    from args import parse_args
    from utils import train
    from utils.run import build_run
    from utils.runlog import RunLogger, checkpoint_paths, run_dir
    args = parse_args(["--arch", "resnet18_cifar_ori", "--dataset", "Digits", "--ratio", "0.125", "--epochs", "3",
                       "--save-dir", str(tmp_path), "--no-progress", "--at", "fast"], script="train_ori")
    run = build_run(args, "train_ori", torch.device("cpu"))
    val_ra = iter([60.0, 55.0, 20.0])  # epoch 3: below half of the best (60)
    monkeypatch.setattr(train, "evaluate", lambda model, loader, cfg, device, desc, **kw:
                        {"sa": 90.0, "ra": next(val_ra) if desc == "val" else 33.0})
    folder = run_dir(args, "train_ori")
    latest, best = checkpoint_paths(folder)
    rows = []
    with RunLogger(folder, args) as log:
        for e in range(3):  # the end of each epoch, without its training
            row, is_best, warnings = train.evaluate_epoch(run, e, {"loss_sum": 1.0, "correct": 0, "seen": 1}, 0.1)
            train.save_epoch(run, row, is_best, warnings, log, None, latest, best)
            rows.append(row)
    assert [r.get("catastrophic_overfitting", False) for r in rows] == [False, False, True]
    assert "catastrophic overfitting?" in open(os.path.join(folder, "setup.log")).read()
    assert torch.load(best, weights_only=True)["best_epoch"] == 1


def test_report_method_names_the_options_that_differ_from_the_released_code():
    assert report.method_of({"arch": "a_moe", "moe_stages": None, "top_k": 1, "at": "trades"}, "train_moe") == "advmoe"
    assert report.method_of({"arch": "a_moe", "moe_stages": [3, 4], "top_k": 2, "at": "fast"}, "train_moe") == \
        "advmoe stages 3,4 top-2 fast-AT"
    assert report.method_of({"arch": "a_ori", "at": "fast"}, "train_ori") == "dense fast-AT"
