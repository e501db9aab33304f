"""RA under a routing attack: the whole MoE judged on PGD examples that push the router towards another expert.

The known-answer tests use an MoE set by hand: 1x16x16 images, expert 0 right and expert 1 wrong on every image
(their class scores read the left half and are saturated, so no gradient reaches the image through them), and a
router that reads the right half: expert 0 while the right half's mean stays below 0.5. An image whose mean sits
0.5 eps below the threshold flips under the routing attack, one 2 eps away cannot, so router robustness, RA under
the routing attack and the worst-case RA are known exactly.
"""
import json
import os

import pytest
import torch
from torch import nn

import models
from conftest import MOE, run_dir, run_script, seeded
from models import RoutedNet
from models.base import call
from models.layers.router import BalanceState
from models.spec import ModelSpec
from utils import evaluate as ev
from utils.tools import study

EPS, STEP, STEPS = 0.15, 0.05, 7  # 7 steps of eps/3 from any start in the ball reach its far side
THRESHOLD = 0.5


class _HalfMeanRouter(nn.Module):
    """Logits (d, -d), d = scale * (0.5 - mean of the right half): expert 0 below the threshold, expert 1 above;
    scale 0 with `constant`: logits (1, -1) for every image (a router that no perturbation flips)."""

    def __init__(self, scale=20.0, constant=False):
        super().__init__()
        self.scale, self.constant = scale, constant
        self.balance = BalanceState(2)

    def forward(self, x):  # (B, 1, H, W) -> (B, 2)
        right = x[..., x.shape[-1] // 2:].mean(dim=(1, 2, 3))
        d = right * 0.0 + 1.0 if self.constant else self.scale * (THRESHOLD - right)
        return torch.stack([d, -d], dim=1)


class _HandMoE(RoutedNet):
    """One MoE conv (1x1, bias) whose two output channels, averaged over the left half, are the class scores:
    expert 0 scores (+s, -s), expert 1 (-s, +s), s = 1000 * (mean of the left half - 0.25): for left halves above
    0.25 expert 0 says class 0 and expert 1 class 1, with margins that saturate the softmax (no gradient)."""

    def __init__(self, router):
        super().__init__(ModelSpec("hand_moe", num_classes=2, n_expert=2))
        self.experts = self.conv(1, 2, 1, bias=True)
        with torch.no_grad():
            self.experts.weight.copy_(torch.tensor([1000.0, -1000.0, -1000.0, 1000.0]).view(4, 1, 1, 1))
            self.experts.bias.copy_(torch.tensor([-250.0, 250.0, 250.0, -250.0]))
        self.router = router

    def forward_features(self, x, routing):
        left = x[..., : x.shape[-1] // 2]
        return call(self.experts, left, routing).mean(dim=(2, 3))  # (B, 2)


def _images(right_means, labels=None):
    """Images whose left half is 0.75 and right half the given value; labels 0 unless given."""
    x = torch.full((len(right_means), 1, 16, 16), 0.75)
    x[..., 8:] = torch.tensor(right_means).view(-1, 1, 1, 1)
    y = torch.zeros(len(right_means), dtype=torch.long) if labels is None else torch.tensor(labels)
    return x, y


def _evaluate(model, x, y, **kw):
    cfg = ev.EvalConfig(EPS, STEP, STEPS, seed=seeded(3), progress=False)
    return ev.evaluate(model, [(x, y)], cfg, "cpu", **kw)


# Right-half means: far below (expert 0, cannot flip), just below (expert 0, flips to the wrong expert 1),
# just above (expert 1, wrong, flips to the right expert 0), far above (expert 1, cannot flip).
FAR_0, NEAR_0, NEAR_1, FAR_1 = THRESHOLD - 2 * EPS, THRESHOLD - EPS / 2, THRESHOLD + EPS / 2, THRESHOLD + 2 * EPS


def test_a_flippable_router_gives_the_known_routing_attack_ra_and_router_robustness():
    x, y = _images([FAR_0] * 4 + [NEAR_0] * 3 + [NEAR_1] + [FAR_1] * 2)
    out = _evaluate(_HandMoE(_HalfMeanRouter()), x, y)
    assert out["sa"] == 70.0  # the 7 images on expert 0
    assert out["ra_ste"] == 70.0  # the saturated experts give the loss attacks no gradient
    assert out["expert_robustness"] == 70.0
    assert out["router_robustness"] == 60.0  # FAR_0 and FAR_1 keep their expert
    assert out["ra_routing_attack"] == 50.0  # FAR_0 right, NEAR_0 sent to the wrong expert, NEAR_1 to the right one
    assert out["ra"] == 40.0  # per image worst: FAR_0 only
    assert out["load_clean"] == [70.0, 30.0] and out["load_adv"] == [70.0, 30.0]
    assert out["load_routing_attack"] == [50.0, 50.0]  # FAR_0 and NEAR_1 on expert 0
    assert ev.moe_row(out)["ra_routing_attack"] == 50.0 and ev.moe_row(out)["load_routing_attack"] == [50.0, 50.0]


def test_the_routing_attack_joins_ra_in_model_selection_too():
    """Validation (no dissection) takes the same worst case as the test set."""
    x, y = _images([FAR_0] * 4 + [NEAR_0] * 3 + [NEAR_1] + [FAR_1] * 2)
    out = _evaluate(_HandMoE(_HalfMeanRouter()), x, y, moe_metrics=False)
    assert (out["ra"], out["ra_routing_attack"]) == (40.0, 50.0) and "router_robustness" not in out


def test_a_router_that_cannot_flip_keeps_every_decision_and_its_clean_accuracy():
    x, y = _images([FAR_0, NEAR_0, NEAR_1, FAR_1] * 2, labels=[0, 0, 1, 0, 1, 0, 0, 0])
    out = _evaluate(_HandMoE(_HalfMeanRouter(constant=True)), x, y)
    assert out["router_robustness"] == 100.0 and out["load_routing_attack"] == [100.0, 0.0]
    assert out["ra_routing_attack"] == out["sa"] == 75.0  # expert 0 says class 0 everywhere
    assert out["ra"] == 75.0


def _recording(monkeypatch):
    """Every routing attack's (clean images, examples, training flags seen by its loss) during an evaluation."""
    calls, real_loss, real_pgd = [], ev.router_decision_loss_fn, ev.pgd_attack

    def routing_loss(clean_expert):
        loss = real_loss(clean_expert)

        def tagged(model, x_adv):
            calls[-1]["training"].append(model.training)
            return loss(model, x_adv)
        tagged.routing = True
        return tagged

    def pgd(model, x, loss_fn, **kw):
        if getattr(loss_fn, "routing", False):
            calls.append({"x": x.clone(), "training": []})
            calls[-1]["x_adv"] = real_pgd(model, x, loss_fn, **kw)
            return calls[-1]["x_adv"]
        return real_pgd(model, x, loss_fn, **kw)
    monkeypatch.setattr(ev, "router_decision_loss_fn", routing_loss)
    monkeypatch.setattr(ev, "pgd_attack", pgd)
    return calls


@pytest.mark.parametrize("routing", ["global", "layer"])
def test_routing_attack_invariants_on_a_real_moe(monkeypatch, routing):
    """Eval mode, inside the eps-ball and [0,1], parameters' .grad untouched, the train flag restored; router
    robustness and RA under the routing attack come from the same examples; RA is at most either attack's."""
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=2, routing=routing).train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(seeded(1)))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(seeded(2)))
    calls = _recording(monkeypatch)
    cfg = ev.EvalConfig(8 / 255, 2 / 255, 3, seed=seeded(5), progress=False)
    out = ev.evaluate(model, [(x, y)], cfg, "cpu")
    assert len(calls) == 1 and calls[0]["training"] == [False] * 3
    x_r = calls[0]["x_adv"]
    assert (x_r - x).abs().max() <= 8 / 255 + 1e-6 and x_r.min() >= 0 and x_r.max() <= 1
    assert not torch.equal(x_r, x)
    assert model.training and all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    model.eval()
    with torch.no_grad():
        logits_r, info_r = model(x_r, return_routing=True)
        _, info = model(x, return_routing=True)
    assert out["ra_routing_attack"] == 100 * (logits_r.argmax(1) == y).float().mean().item()
    assert out["router_robustness"] == 100 * ev._same_decision(info_r.expert, info.expert).float().mean().item()
    assert out["ra"] <= min(out["ra_routing_attack"], out["ra_ste"])


def test_metrics_and_evaluate_record_the_routing_attack(tmp_path):
    """metrics.jsonl of a training epoch and of `--evaluate` hold `ra_routing_attack` and the routing-attack load,
    and the printed lines show them."""
    argv = MOE + ["--dataset", "Digits16", "--epochs", "1", "--max-batches", "1", "--test-batch-size", "16",
                  "--save-dir", str(tmp_path)]
    out = run_script("train_moe.py", argv)
    assert out.returncode == 0, out.stderr
    training = run_dir(tmp_path / "training")
    row = [json.loads(line) for line in open(os.path.join(training, "metrics.jsonl"))][-1]
    assert 0 <= row["ra"] <= row["ra_routing_attack"] <= 100 and len(row["load_routing_attack"]) == 2
    assert f"RA route {row['ra_routing_attack']:6.2f}%" in out.stdout + out.stderr
    best = os.path.join(training, "checkpoint", "model_best.pth.tar")
    out = run_script("train_moe.py", argv + ["--evaluate", "--resume", best])
    assert out.returncode == 0, out.stderr
    evaluated = json.loads(open(os.path.join(run_dir(tmp_path / "evaluate"), "metrics.jsonl")).readline())
    assert evaluated["ra_routing_attack"] == row["ra_routing_attack"]  # same weights, same seeded starts
    assert f"ra_routing_attack {evaluated['ra_routing_attack']:.2f}%" in out.stdout + out.stderr


def _result(tmp_path, row, seed, **values):
    a = study.get_args_parser().parse_args(["--report-only", "--seeds", "1,2", "--save-dir", str(tmp_path)])
    j = next(j for j in study.plan(a, [1, 2]) if j.name == row and j.seed == seed)
    folder = tmp_path / "main" / os.path.relpath(j.folder(str(tmp_path / "main")), str(tmp_path / "main"))
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"row": row, "seed": seed, "key": j.key, "n": 360, "aa_n": 360,
                                                        **values}))


def test_the_study_table_shows_the_routing_attack_and_the_pgd_autoattack_gap(tmp_path):
    moe = dict(router_robustness=10.0, load_clean_min=30.0, load_adv_min=20.0)
    _result(tmp_path, "AdvMoE", 1, sa=90.0, ra=40.0, aa=30.0, ra_routing_attack=50.0, **moe)
    _result(tmp_path, "AdvMoE", 2, sa=90.0, ra=44.0, aa=30.0, ra_routing_attack=60.0, **moe)
    _result(tmp_path, "dense r", 1, sa=95.0, ra=35.0, aa=34.0)
    assert study.main(["--report-only", "--seeds", "1,2", "--save-dir", str(tmp_path)]) == 0
    lines = [line for line in (tmp_path / "main" / "table.md").read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = {line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|").split("|")] for line in lines[1:]}
    column = {name: header.index(name) for name in ("PGD RA - AA RA", "RA under routing attack", "min adv load")}
    assert cells["AdvMoE"][column["PGD RA - AA RA"]] == "12.00 ± 2.83"  # gaps 10 and 14, per seed
    assert cells["AdvMoE"][column["RA under routing attack"]] == "55.00 ± 7.07"
    assert cells["AdvMoE"][column["min adv load"]] == "20.00 ± 0.00"
    assert cells["dense r"][column["PGD RA - AA RA"]] == "1.00 ± 0.00"
    assert cells["dense r"][column["RA under routing attack"]] == "-"
    text = (tmp_path / "main" / "table.md").read_text()
    assert "seed 1 SA 90.00 RA 40.00 AA 30.00 RA under routing attack 50.00 router robustness 10.00 min clean load 30.00" in text


def _report_run(save, aa_after_best=True):
    """An MoE run folder (one epoch) with an `--evaluate` of its best checkpoint and an AutoAttack result."""
    import yaml
    run = save / "training" / "train_moe" / "advmoe_run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "args.yaml").write_text(yaml.safe_dump({"arch": "resnet18_cifar_moe", "ratio": 0.25, "n_expert": 2,
                                                   "dataset": "Digits16", "epochs": 1}))
    epoch = {"epoch": 1, "epochs": 1, "sa": 80.0, "ra": 40.0, "val_ra": 41.0, "best_ra": 40.0, "best_epoch": 1,
             "seconds": 10.0, "ra_routing_attack": 70.0, "router_robustness": 20.0, "load_clean": [60.0, 40.0],
             "load_adv": [90.0, 10.0]}
    (run / "metrics.jsonl").write_text(json.dumps(epoch) + "\n")
    (run / "status.json").write_text(json.dumps({"state": "finished", "message": ""}))
    (run / "provenance.json").write_text(json.dumps({"device": "cpu", "world_size": 1}))
    best = run / "checkpoint" / "model_best.pth.tar"
    aa = run / "autoattack.json"
    if not aa_after_best:
        aa.write_text(json.dumps({"robust_accuracy": 30.0, "n_ex": 360}))
        os.utime(aa, (1, 1))
    best.write_bytes(b"weights")
    if aa_after_best:
        aa.write_text(json.dumps({"robust_accuracy": 30.0, "n_ex": 360}))
    evaluation = save / "evaluate" / "train_moe" / "advmoe_run"
    evaluation.mkdir(parents=True)
    (evaluation / "args.yaml").write_text(yaml.safe_dump({"evaluate": True, "arch": "resnet18_cifar_moe"}))
    row = {"checkpoint": str(best), "epoch": 1, "sa": 81.0, "ra": 42.5, "ra_routing_attack": 66.0,
           "router_robustness": 25.0, "load_clean": [55.0, 45.0], "load_adv": [85.0, 15.0]}
    (evaluation / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (evaluation / "status.json").write_text(json.dumps({"state": "finished", "message": ""}))


@pytest.mark.parametrize("stale", [False, True])
def test_the_report_shows_the_routing_attack_and_the_pgd_autoattack_gap(tmp_path, capsys, stale):
    import csv
    from utils.tools import report
    _report_run(tmp_path / "runs", aa_after_best=not stale)
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "table.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["pgd_source"] == "evaluate"  # the routing figures come from the same source as the PGD RA
    assert (row["ra_routing_attack"], row["router_robustness"]) == ("66.0", "25.0")
    assert (row["load_clean_min"], row["load_adv_min"]) == ("45.0", "15.0")
    assert row["pgd_aa_gap"] == ("" if stale else "12.5")  # no gap against an older checkpoint's AutoAttack
    md = (tmp_path / "out" / "table.md").read_text()
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    cells = [c.strip() for c in next(line for line in md.splitlines() if "| resnet18" in line).strip("|").split("|")]
    shown = dict(zip(header, cells))
    assert shown["PGD - AA"] == ("-" if stale else "12.50 ± 0.00")
    assert (shown["RA routing attack"], shown["router rob"], shown["min load clean"], shown["min load adv"]) == \
        ("66.00 ± 0.00", "25.00 ± 0.00", "45.0 ± 0.0", "15.0 ± 0.0")


def test_a_study_job_result_carries_the_evaluation_routing_figures(tmp_path):
    from utils.tools.jobs import Pipeline
    a = study.get_args_parser().parse_args(["--seeds", "1", "--save-dir", str(tmp_path)])
    j = next(j for j in study.plan(a, [1]) if j.name == "AdvMoE")
    out = tmp_path / "job"
    (out / "evaluate" / "run").mkdir(parents=True)
    row = {"sa": 80.0, "ra": 40.0, "n": 360, "ra_routing_attack": 55.0, "router_robustness": 12.0,
           "expert_robustness": 45.0, "load_clean": [60.0, 40.0], "load_adv": [70.0, 30.0],
           "load_routing_attack": [20.0, 80.0]}
    (out / "evaluate" / "run" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (out / "autoattack.json").write_text(json.dumps({"robust_accuracy": 31.0, "n_ex": 360}))
    p = Pipeline(str(out / "runs" / "none"), str(out / "evaluate" / "run"), "train",
                 aa_out=str(out / "autoattack.json"), records=str(out))
    result = study._collect(j, p)
    assert (result["ra_routing_attack"], result["router_robustness"]) == (55.0, 12.0)
    assert result["load_routing_attack"] == [20.0, 80.0] and result["load_adv_min"] == 30.0
    assert study.column_value(result, "ra_minus_aa") == 9.0
    assert json.loads((out / "result.json").read_text())["ra_routing_attack"] == 55.0
