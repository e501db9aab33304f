"""Router health: batch-independent routing, balanced starts and steps, NaN stops a run, experts stay in use."""
import copy
import json
import os

import pytest
import torch

import models
import train
from args import parse_args
from conftest import MOE, run_dir, run_script, seeded
from models.layers import hard_top1
from utils import advmoe, balance, losses, steps, update
from utils.evaluate import routing_report
from utils.update import StepContext


def _model(n_expert=2, seed=0):
    torch.manual_seed(seeded(seed))
    return models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=n_expert)


def _images(b=64, seed=1):
    g = torch.Generator().manual_seed(seeded(seed))
    return torch.rand(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)


def _load(model, x):
    with torch.no_grad():
        return torch.bincount(model.route(x).argmax(1), minlength=model.n_expert)


def test_routing_does_not_depend_on_the_batch_in_train_mode():
    model = _model().train()
    x, _ = _images(16)
    with torch.no_grad():
        together = model.route(x)
        alone = torch.cat([model.route(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(together, alone, atol=1e-5)
    bns = [m for m in model.router.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.router.training


@pytest.mark.parametrize("n_expert", [2, 4])
def test_init_router_spreads_images_and_matches_train_statistics(n_expert):
    model = _model(n_expert)
    x, _ = _images(128)
    # A fresh router sends (nearly) everything to one expert (what init_router is for); how nearly is what the
    # random weights give, so the start is made a full collapse: expert 0's bias above every other logit.
    with torch.no_grad():
        logits = model.route(x)
        model.router.fc.bias[0] += (logits[:, 1:].max() - logits[:, 0].min()).clamp(min=0) + 1.0
    assert _load(model, x).tolist() == [len(x)] + [0] * (n_expert - 1)
    bn = model.router.bn1
    balance.init_router(model, x)
    feats = model.router.conv1(model.normalize(x))  # (B, 16, H, W): the first BatchNorm's input
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, feats.var((0, 2, 3)), rtol=1e-3)
    load = _load(model, x)
    assert load.min() > 0
    if n_expert == 2:
        assert abs(int(load[0]) - int(load[1])) <= 2


@pytest.mark.slow
def test_init_router_centres_every_layer_router():
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=2, routing="layer")
    x, _ = _images(64)
    balance.init_router(model, x)
    for router, logits in balance.router_logits_on(model, x):
        load = torch.bincount(logits.argmax(1), minlength=2)
        assert abs(int(load[0]) - int(load[1])) <= 2, load


def _collapsed(seed=0):
    model = _model(seed=seed)
    x, y = _images(32)
    balance.init_router(model, x)
    with torch.no_grad():  # everything on expert 0, by 5 at least: the gap 10, more if the images are spread wider
        logits = model.route(x)
        gap = max(10.0, float((logits[:, 1] - logits[:, 0]).max()) + 5.0)
        model.router.fc.bias += torch.tensor([gap / 2, -gap / 2])
    assert _load(model, x).tolist() == [32, 0]
    return model.train(), x, y


def _after_update(model, x, mode, strength, logit_cap=0.0, probe=None):
    balance.RouterUpkeep(mode, strength, logit_cap, probe=probe).after_router_update(model, x)


def test_median_balancing_recentres_the_output_bias():
    model, x, _ = _collapsed()
    _after_update(model, x, "median", 1.0)
    load = _load(model, x)
    assert abs(int(load[0]) - int(load[1])) <= 2
    assert torch.equal(model.router.balance.select_bias, torch.zeros(2))  # median moves the output bias only


def test_bias_balancing_moves_only_the_selection_bias():
    model, x, _ = _collapsed()
    fc_bias = model.router.fc.bias.detach().clone()
    logits_before = model.route(x)
    _after_update(model, x, "bias", 1.0)  # the whole balancing shift at once
    assert torch.equal(model.router.fc.bias, fc_bias)
    assert torch.allclose(model.route(x), logits_before)  # the router's logits (the gate's) are unchanged
    with torch.no_grad():
        load = torch.bincount(model.route_scores(x).argmax(1), minlength=2)
    assert abs(int(load[0]) - int(load[1])) <= 2  # decisions are balanced by the selection bias


def test_bias_sign_balancing_moves_by_fixed_steps_from_the_running_load():
    model, x, _ = _collapsed()
    state = model.router.balance
    _after_update(model, x, "bias-sign", 0.25)
    # load [1, 0] -> running estimate 0.9 * 0.5 + 0.1 * [1, 0] = [0.55, 0.45]: expert 0 over-loaded
    assert torch.allclose(state.load_ema, torch.tensor([0.55, 0.45]))
    assert torch.allclose(state.select_bias, torch.tensor([-0.25, 0.25]))
    _after_update(model, x, "bias-sign", 0.25)
    assert torch.allclose(state.select_bias, torch.tensor([-0.5, 0.5]))


@pytest.mark.parametrize("mode", ["none", "switch", "entropy"])
def test_other_modes_leave_biases_alone_after_updates(mode):
    model, x, _ = _collapsed()
    fc_bias = model.router.fc.bias.detach().clone()
    _after_update(model, x, mode, 1.0)
    assert torch.equal(model.router.fc.bias, fc_bias) and not model.router.balance.select_bias.any()
    assert _load(model, x).tolist() == [32, 0]


def test_balancing_measures_the_probe_images_not_the_batch():
    model, x, _ = _collapsed()
    probe, _ = _images(64, seed=5)
    torch.manual_seed(seeded(0))
    _after_update(model, x, "median", 1.0, probe=probe)
    model2, _, _ = _collapsed()
    balance.track_router_statistics(model2, x)  # the upkeep's first part, on the training batch
    torch.manual_seed(seeded(0))
    drawn = probe[torch.randint(len(probe), (64,))]  # 64 probe images drawn from torch's RNG
    balance.center_router_bias(model2.router, model2.route(drawn))
    assert torch.allclose(model.router.fc.bias, model2.router.fc.bias)
    model3, _, _ = _collapsed()
    _after_update(model3, x, "median", 1.0)  # no probe: the batch itself
    assert not torch.allclose(model.router.fc.bias, model3.router.fc.bias)


def test_logit_cap_scales_the_router_without_changing_decisions():
    model, x, _ = _collapsed()
    with torch.no_grad():  # the router's output layer scaled so that its median margin is 8 (over the cap of 2)
        top = model.route(x).topk(2, dim=1).values
        factor = 8.0 / (top[:, 0] - top[:, 1]).median()
        model.router.fc.weight.mul_(factor)
        model.router.fc.bias.mul_(factor)
        model.router.balance.select_bias.copy_(torch.tensor([0.3, -0.3]))
    scores = model.route_scores(x)
    top = model.route(x).topk(2, dim=1).values
    assert torch.isclose((top[:, 0] - top[:, 1]).median(), torch.tensor(8.0), rtol=1e-4)
    _after_update(model, x, "none", 0.0, logit_cap=2.0)
    top = model.route(x).topk(2, dim=1).values
    assert torch.isclose((top[:, 0] - top[:, 1]).median(), torch.tensor(2.0), rtol=1e-4)
    assert torch.equal(model.route_scores(x).argmax(1), scores.argmax(1))
    factor = float(model.router.balance.select_bias[0] / 0.3)
    assert 0 < factor < 1 and torch.allclose(model.route_scores(x), scores * factor, rtol=1e-4, atol=1e-5)


def test_hard_top1_selects_with_the_bias_and_gates_with_the_raw_softmax():
    logits = torch.tensor([[1.0, 0.0], [0.2, 0.0]], requires_grad=True)
    bias = torch.tensor([0.0, 0.5])
    expert, gate = hard_top1(logits, bias)
    assert expert.tolist() == [0, 1] and torch.equal(gate.detach(), torch.ones(2))
    gate.sum().backward()
    p = torch.softmax(logits.detach(), 1)
    # d p_chosen / d logits = p_c (e_c - p), from the raw logits
    want = torch.stack([p[0, 0] * (torch.tensor([1.0, 0.0]) - p[0]), p[1, 1] * (torch.tensor([0.0, 1.0]) - p[1])])
    assert torch.allclose(logits.grad, want)


def test_balancing_losses_are_zero_or_one_when_balanced_and_grow_with_collapse():
    balanced = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    collapsed = torch.tensor([[4.0, 0.0], [4.0, 0.0]])
    assert torch.isclose(balance.switch_loss(balanced, 2), torch.tensor(1.0))
    assert balance.switch_loss(collapsed, 2) > 1.9
    assert torch.isclose(balance.entropy_loss(balanced, 2), torch.tensor(0.0), atol=1e-6)
    assert balance.entropy_loss(collapsed, 2) > 0.6
    logits = collapsed.clone().requires_grad_(True)
    balance.entropy_loss(logits, 2).backward()
    assert (logits.grad[:, 0] > 0).all()  # lowering the over-used expert's logit lowers the loss


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["switch", "entropy"])
def test_loss_balancing_enters_the_router_loss(mode):
    model, x, y = _collapsed()
    plain = losses.robust_loss(copy.deepcopy(model), x, y, steps.StepConfig(num_steps=1, balance="none"),
                               torch.Generator().manual_seed(seeded(1)))  # a copy: its pass moves BatchNorms
    assert balance.loss_balancing(steps.StepConfig(balance="none"), 2) is None
    cfg = steps.StepConfig(num_steps=1, balance=mode, balance_strength=0.5)
    out = losses.robust_loss(model, x, y, cfg, torch.Generator().manual_seed(seeded(1)))
    torch.testing.assert_close(out["loss"], plain["loss"])
    balance.add_balance_term(out, balance.loss_balancing(cfg, 2))
    term = balance.balance_loss(mode, out["router_logits"], 2)
    assert torch.allclose(out["loss"], plain["loss"] + 0.5 * term, atol=1e-5)
    assert term > 0.5  # collapsed: switch -> ~2, entropy -> ~log 2

    # and the router step adds it: the router's gradient is that of the robust loss plus the balancing term
    grads = []
    for balancing in (None, balance.loss_balancing(cfg, 2)):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.router_parameters(), lr=0.0)
        advmoe.router_step(m, x, y, cfg, StepContext(router_optimizer=opt, generator=torch.Generator().manual_seed(seeded(1))),
                           balance=balancing)
        grads.append(m.router.fc.bias.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_center_router_bias_averages_the_shift_over_processes():
    model = _model()
    logits = torch.tensor([[3.0, 1.0], [5.0, 1.0], [4.0, 0.0]])
    bias = model.router.fc.bias.detach().clone()
    balance.center_router_bias(model.router, logits, average=lambda t: t / 2)  # as if the other rank's were 0
    # margins against the mean logit: (1, -1), (2, -2), (2, -2); medians (2, -2), halved by the average
    assert torch.allclose(model.router.fc.bias, bias - torch.tensor([2.0, -2.0]) / 2)


def test_routing_report_shows_loads_with_and_without_augmentation():
    model, x, _ = _collapsed()
    shifted = torch.roll(x, shifts=2, dims=3)
    report = routing_report(model.eval(), x, shifted)
    assert report["load_train_plain"] == [100.0, 0.0]
    assert len(report["load_train_aug"]) == 2 and sum(report["load_train_aug"]) == pytest.approx(100.0)
    with torch.no_grad():
        top = model.route(x).topk(2, dim=1).values
    # the median as the report takes it: the mean of the two middle margins of an even count (torch.median takes
    # the lower one: equal at seed offset 0 by chance, 9.98 against 10.0 under offsets 1 and 2)
    assert report["router_margin_p50"] == pytest.approx(float((top[:, 0] - top[:, 1]).quantile(0.5)), rel=1e-4)
    chosen = torch.softmax(model.route(x), 1).max(1).values
    assert report["router_saturated"] == pytest.approx(100 * float((chosen > 0.99).float().mean()))
    assert report["select_bias"] == [0.0, 0.0]


def test_non_finite_router_stops_with_error():
    model = _model().train()
    x, y = _images(8)
    with torch.no_grad():
        model.router.fc.weight[0, 0] = float("nan")
    opt, router_opt = (torch.optim.SGD(p, lr=0.01) for p in (model.backbone_parameters(), model.router_parameters()))
    with pytest.raises(update.NonFiniteError, match="not finite"):
        advmoe.advmoe_step(model, x, y, steps.StepConfig(num_steps=1), StepContext(opt, router_opt))


@pytest.mark.slow
def test_nan_mid_run_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    args = parse_args(MOE + ["--epochs", "2", "--max-batches", "2", "--save-dir", str(tmp_path)], script="train_moe")
    real, calls = advmoe.advmoe_step, []

    def failing_step(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # first batch of epoch 2
            raise update.NonFiniteError("router-step loss is not finite (NaN/inf); stopping, last good checkpoint kept")
        return real(*a, **kw)
    monkeypatch.setattr(advmoe, "advmoe_step", failing_step)
    with pytest.raises(update.NonFiniteError):
        train.run(args, "train_moe")
    folder = run_dir(tmp_path)
    ckpt = torch.load(os.path.join(folder, "checkpoint", "checkpoint.pth.tar"), weights_only=True)
    assert ckpt["epoch"] == 1
    status = json.load(open(os.path.join(folder, "status.json")))
    assert status["state"] == "failed" and "not finite" in status["message"]
    assert "not finite" in open(os.path.join(folder, "setup.log")).read()


@pytest.mark.slow
def test_multi_epoch_advmoe_router_finite_and_every_expert_used(tmp_path):
    argv = MOE + ["--epochs", "3", "--max-batches", "8", "--max-test-batches", "2", "--save-dir", str(tmp_path)]
    out = run_script("train_moe.py", argv)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in open(os.path.join(run_dir(tmp_path), "metrics.jsonl"))]
    assert len(rows) == 3
    for row in rows:
        # The loads the short training leaves are its own (on one machine at least 15% on each expert): what
        # holds is that they are shares of the test images and that `collapse` says whether one expert has 95%.
        assert len(row["load_clean"]) == 2 and sum(row["load_clean"]) == pytest.approx(100.0)
        assert row["collapse"] == (max(row["load_clean"]) >= 95.0), row["load_clean"]
        assert all(v == v for v in (row["train_loss"], row["sa"], row["ra"]))  # no NaN
    ckpt = torch.load(os.path.join(run_dir(tmp_path), "checkpoint", "checkpoint.pth.tar"), weights_only=True)
    router = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("router.")}
    assert router and all(torch.isfinite(v.float()).all() for v in router.values())


def _norm(params):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))


def _record_clips(monkeypatch):
    clipped = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, c: clipped.append(({id(p) for p in params}, c)) or real(params, c))
    return clipped


def test_joint_step_clips_router_and_backbone_each_on_its_own(monkeypatch):
    x, y = _images(8)
    free = _model().train()  # the same step unclipped: both groups' gradients are above the clip norms
    steps.joint_step(free, x, y, steps.StepConfig(num_steps=1, grad_clip=0.0, router_grad_clip=0.0), StepContext(torch.optim.SGD(free.parameters(), lr=0.0)))
    assert _norm(free.router_parameters()) > 1e-3 and _norm(free.backbone_parameters()) > 1e-3
    model = _model().train()
    clipped = _record_clips(monkeypatch)
    steps.joint_step(model, x, y, steps.StepConfig(num_steps=1, router_grad_clip=1e-3, grad_clip=5e-4), StepContext(torch.optim.SGD(model.parameters(), lr=0.0)))
    assert clipped == [({id(p) for p in model.router_parameters()}, 1e-3),
                       ({id(p) for p in model.backbone_parameters()}, 5e-4)]
    assert _norm(model.router_parameters()) <= 1e-3 * (1 + 1e-4)
    assert _norm(model.backbone_parameters()) <= 5e-4 * (1 + 1e-4)


def test_expert_step_clips_the_backbone_and_dense_training_clips_everything(monkeypatch):
    x, y = _images(8)
    model = _model().train()
    clipped = _record_clips(monkeypatch)
    advmoe.expert_step(model, x, y, steps.StepConfig(num_steps=1, grad_clip=5e-4), StepContext(torch.optim.SGD(model.backbone_parameters(), lr=0.0)))
    assert clipped == [({id(p) for p in model.backbone_parameters()}, 5e-4)]
    assert _norm(model.backbone_parameters()) <= 5e-4 * (1 + 1e-4)
    clipped.clear()
    torch.manual_seed(seeded(0))
    dense = models.build_model("resnet18_cifar_ori", ratio=0.125).train()
    steps.joint_step(dense, x, y, steps.StepConfig(num_steps=1, grad_clip=5e-4, router_grad_clip=1e-3), StepContext(torch.optim.SGD(dense.parameters(), lr=0.0)))
    assert clipped == [({id(p) for p in dense.parameters()}, 5e-4)]
    assert _norm(dense.parameters()) <= 5e-4 * (1 + 1e-4)
    clipped.clear()
    steps.joint_step(dense, x, y, steps.StepConfig(num_steps=1, grad_clip=0.0), StepContext(torch.optim.SGD(dense.parameters(), lr=0.0)))
    assert clipped == [] and _norm(dense.parameters()) > 5e-4  # 0: off
