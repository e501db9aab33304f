"""Router health: batch-independent routing, balanced starts and steps, NaN stops a run, experts stay in use."""
import json
import os

import pytest
import torch

import models
from args import parse_args
from utils import advmoe
from utils.train import fit

from test_train import MOE, run_dir, run_script


def _model(n_expert=2, seed=0):
    torch.manual_seed(seed)
    return models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=n_expert)


def _images(b=64, seed=1):
    g = torch.Generator().manual_seed(seed)
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
def test_balance_router_init_spreads_images_and_matches_train_statistics(n_expert):
    model = _model(n_expert)
    x, _ = _images(128)
    assert _load(model, x).max() >= 0.9 * len(x)  # a fresh router sends (nearly) everything to one expert
    bn = model.router.bn1
    advmoe.balance_router_init(model, x)
    feats = model.router.conv1(model.normalize(x))  # (B, 16, H, W): the first BatchNorm's input
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, feats.var((0, 2, 3)), rtol=1e-3)
    load = _load(model, x)
    assert load.min() > 0
    if n_expert == 2:
        assert abs(int(load[0]) - int(load[1])) <= 2


def test_router_step_recentres_the_bias_on_its_batch():
    model = _model()
    x, y = _images(32)
    advmoe.balance_router_init(model, x)
    with torch.no_grad():
        model.router.fc.bias += torch.tensor([50.0, -50.0])  # everything on expert 0
    assert _load(model, x).tolist() == [32, 0]
    cfg = advmoe.StepConfig(num_steps=1, balance_bias=True)
    opt = torch.optim.SGD(model.router_parameters(), lr=0.0)  # no gradient step: the controller alone acts
    model.train()
    advmoe.router_step(model, x, y, cfg, opt)
    load = _load(model, x)
    assert abs(int(load[0]) - int(load[1])) <= 2

    off = _model()
    advmoe.balance_router_init(off, x)
    with torch.no_grad():
        off.router.fc.bias += torch.tensor([50.0, -50.0])
    advmoe.router_step(off.train(), x, y, advmoe.StepConfig(num_steps=1, balance_bias=False),
                       torch.optim.SGD(off.router_parameters(), lr=0.0))
    assert _load(off, x).tolist() == [32, 0]


def test_center_router_bias_averages_the_shift_over_processes():
    model = _model()
    logits = torch.tensor([[3.0, 1.0], [5.0, 1.0], [4.0, 0.0]])
    bias = model.router.fc.bias.detach().clone()
    advmoe.center_router_bias(model, logits, average=lambda t: t / 2)  # as if the other rank's shift were 0
    # margins against the mean logit: (1, -1), (2, -2), (2, -2); medians (2, -2), halved by the average
    assert torch.allclose(model.router.fc.bias, bias - torch.tensor([2.0, -2.0]) / 2)


def test_non_finite_router_stops_with_error():
    model = _model().train()
    x, y = _images(8)
    with torch.no_grad():
        model.router.fc.weight[0, 0] = float("nan")
    opt, router_opt = (torch.optim.SGD(p, lr=0.01) for p in (model.backbone_parameters(), model.router_parameters()))
    with pytest.raises(advmoe.NonFiniteError, match="not finite"):
        advmoe.advmoe_step(model, x, y, advmoe.StepConfig(num_steps=1), opt, router_opt)


@pytest.mark.slow
def test_nan_mid_run_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    args = parse_args(MOE + ["--epochs", "2", "--max-batches", "2", "--save-dir", str(tmp_path)], script="train_moe")
    real, calls = advmoe.advmoe_step, []

    def failing_step(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # first batch of epoch 2
            raise advmoe.NonFiniteError("router-step loss is not finite (NaN/inf); stopping, last good checkpoint kept")
        return real(*a, **kw)
    monkeypatch.setattr(advmoe, "advmoe_step", failing_step)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(advmoe.NonFiniteError):
        fit(args, "train_moe")
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
        assert min(row["load_clean"]) >= 15 and not row["collapse"], row["load_clean"]
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
    advmoe.joint_step(free, x, y, advmoe.StepConfig(num_steps=1, grad_clip=0.0, router_grad_clip=0.0),
                      torch.optim.SGD(free.parameters(), lr=0.0))
    assert _norm(free.router_parameters()) > 1e-3 and _norm(free.backbone_parameters()) > 1e-3
    model = _model().train()
    clipped = _record_clips(monkeypatch)
    advmoe.joint_step(model, x, y, advmoe.StepConfig(num_steps=1, router_grad_clip=1e-3, grad_clip=5e-4),
                      torch.optim.SGD(model.parameters(), lr=0.0))
    assert clipped == [({id(p) for p in model.router_parameters()}, 1e-3),
                       ({id(p) for p in model.backbone_parameters()}, 5e-4)]
    assert _norm(model.router_parameters()) <= 1e-3 * (1 + 1e-4)
    assert _norm(model.backbone_parameters()) <= 5e-4 * (1 + 1e-4)


def test_expert_step_clips_the_backbone_and_dense_training_clips_everything(monkeypatch):
    x, y = _images(8)
    model = _model().train()
    clipped = _record_clips(monkeypatch)
    advmoe.expert_step(model, x, y, advmoe.StepConfig(num_steps=1, grad_clip=5e-4),
                       torch.optim.SGD(model.backbone_parameters(), lr=0.0))
    assert clipped == [({id(p) for p in model.backbone_parameters()}, 5e-4)]
    assert _norm(model.backbone_parameters()) <= 5e-4 * (1 + 1e-4)
    clipped.clear()
    torch.manual_seed(0)
    dense = models.build_model("resnet18_cifar_ori", ratio=0.125).train()
    advmoe.joint_step(dense, x, y, advmoe.StepConfig(num_steps=1, grad_clip=5e-4, router_grad_clip=1e-3),
                      torch.optim.SGD(dense.parameters(), lr=0.0))
    assert clipped == [({id(p) for p in dense.parameters()}, 5e-4)]
    assert _norm(dense.parameters()) <= 5e-4 * (1 + 1e-4)
    clipped.clear()
    advmoe.joint_step(dense, x, y, advmoe.StepConfig(num_steps=1, grad_clip=0.0),
                      torch.optim.SGD(dense.parameters(), lr=0.0))
    assert clipped == [] and _norm(dense.parameters()) > 5e-4  # 0: off
