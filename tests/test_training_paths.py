"""Training paths that the end-to-end tests do not cover: layer routing, joint MoE training through the CLI,
PGD-AT for an MoE, the load-balancing loss, best-epoch selection on the validation split, the router's own
optimizer settings, and two processes (gloo): gradient averaging equals one process on the whole batch,
--sync-bn on CPU is a usage error. Tiny settings: one or two batches."""
import copy
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import models
import train as entry
from args import parse_args
from conftest import DENSE, MOE, run_dir, run_script, seeded
from utils import advmoe, balance, run as run_state, steps, train
from utils.attack import ce_loss_fn, pgd_attack
from utils.distributed import DistEnv, average_gradients
from utils.errors import UsageError
from utils.update import StepContext

ONE = ["--epochs", "1", "--max-batches", "2", "--dataset", "Digits16", "--test-batch-size", "32"]  # 16x16: fast


def _args(argv, tmp_path, script="train_moe"):
    return parse_args(argv + ["--save-dir", str(tmp_path / "runs")], script=script)


def _checkpoint(folder, name="checkpoint.pth.tar"):
    return torch.load(os.path.join(folder, "checkpoint", name), weights_only=True)


# ------------------------------------------------------------------------------------------------ routing

@pytest.mark.slow
def test_layer_routing_trains_its_routers_and_evaluates(tmp_path):
    """--routing layer: every MoE layer has its own router, the router step moves all of them, and --evaluate
    rebuilds the model with layer routers and reproduces the training run's test SA and RA."""
    trained = entry.run(_args(MOE + ONE + ["--routing", "layer"], tmp_path), "train_moe")
    folder = run_dir(tmp_path / "runs" / "training")
    ckpt = _checkpoint(folder)
    assert ckpt["routing"] == "layer" and "router" not in ckpt
    keys = list(ckpt["state_dict"])
    assert not any(k.startswith("router.") for k in keys)
    n_moe = sum(isinstance(m, models.layers.MoEConv2d) for m in models.build_model(
        "resnet18_cifar_moe", num_classes=10, ratio=0.125, n_expert=2, routing="layer").modules())
    assert len({k.rsplit(".router.", 1)[0] for k in keys if ".router." in k}) == n_moe > 1
    moved = [s["momentum_buffer"] for s in ckpt["router_optimizer"]["state"].values()]
    n_router = len(ckpt["router_optimizer"]["param_groups"][0]["params"])
    assert len(moved) == n_router and sum(bool(b.abs().sum() > 0) for b in moved) == n_router

    best = os.path.join(folder, "checkpoint", "model_best.pth.tar")
    evaluated = entry.run(_args(MOE + ONE + ["--routing", "layer", "--evaluate", "--resume", best], tmp_path),
                    "train_moe")
    assert (evaluated["sa"], evaluated["ra"], evaluated["ra_ste"]) == (trained["sa"], trained["ra"],
                                                                      trained["ra_ste"])


@pytest.mark.slow
def test_joint_moe_training_through_the_cli(tmp_path):
    """--moe-training joint: one optimizer over router and experts (no router optimizer, no router lr)."""
    out = run_script("train_moe.py", MOE + ONE + ["--moe-training", "joint", "--save-dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    ckpt = _checkpoint(run_dir(tmp_path))
    assert ckpt["args"]["moe_training"] == "joint"
    assert "router_optimizer" not in ckpt and "router_scheduler" not in ckpt
    n_params = sum(1 for k, v in ckpt["state_dict"].items() if v.is_floating_point()
                   and not k.endswith(("running_mean", "running_var")))
    assert len(ckpt["optimizer"]["param_groups"][0]["params"]) == n_params
    assert len(ckpt["optimizer"]["state"]) == n_params  # router parameters included: every one stepped
    row = [line for line in open(os.path.join(run_dir(tmp_path), "metrics.jsonl"))][-1]
    assert "router_lr" not in row


@pytest.mark.slow
def test_pgd_at_for_an_moe_through_the_flags(tmp_path, monkeypatch):
    """--at pgd reaches both AdvMoE steps, and the step's adversarial examples are PGD-CE ones against the MoE:
    in the eps-ball, in [0, 1], with a higher cross-entropy than the clean images; no TRADES clean pass."""
    real, seen = advmoe.robust_loss, []

    def spy(model, x, y, cfg, generator=None, router_kl=False):
        out = real(model, x, y, cfg, generator, router_kl)
        seen.append((cfg.at, out))
        return out
    monkeypatch.setattr(advmoe, "robust_loss", spy)
    args = _args(MOE + ["--epochs", "1", "--max-batches", "1", "--at", "pgd", "--epsilon", "16/255"], tmp_path)
    entry.run(args, "train_moe")
    assert [at for at, _ in seen] == ["pgd", "pgd"]  # router step, expert step
    for _, out in seen:
        assert "logits_clean" not in out
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_moe", num_classes=10, ratio=0.125, n_expert=2).train()
    g = torch.Generator().manual_seed(seeded(1))
    x, y = torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    opt = torch.optim.SGD(model.backbone_parameters(), lr=0.0)
    # The step's attack is PGD on the cross-entropy from a uniform start: the same as the attack called by hand
    # with the same generator, on the model as it was before the step moved its BatchNorm statistics (not
    # "the loss went up", which is what one untrained model's attack happens to do).
    want = pgd_attack(copy.deepcopy(model), x, ce_loss_fn(y), eps=16 / 255, step_size=4 / 255, num_steps=3,
                      random_start="uniform", generator=torch.Generator().manual_seed(seeded(2)))
    out = advmoe.expert_step(model, x, y, steps.StepConfig(at="pgd", eps=16 / 255, step_size=4 / 255,
                                                            num_steps=3),
                             StepContext(opt, generator=torch.Generator().manual_seed(seeded(2))))
    x_adv = out["x_adv"]
    assert (x_adv - x).abs().max() <= 16 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv, want)


# ------------------------------------------------------------------------------------------------ balancing

def test_load_balance_loss_is_one_balanced_n_collapsed_and_pushes_load_off_the_busy_expert():
    balanced = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    assert balance.switch_loss(balanced, 4).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[60.0, 0.0, 0.0, 0.0]] * 8)
    assert balance.switch_loss(collapsed, 4).item() == pytest.approx(4.0)
    assert balance.switch_loss([balanced, collapsed[:4]], 4).item() == pytest.approx(2.5)  # layers averaged
    busy = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [1.0, 0.5, 0.2], [0.0, 1.0, 0.0]], requires_grad=True)
    grad, = torch.autograd.grad(balance.switch_loss(busy, 3), busy)
    # Expert 0 takes 3 of 4 images: descending the loss lowers its logits and raises the others'.
    assert (grad[:, 0] > 0).all() and (grad[:, 1:] < 0).all()


# ------------------------------------------------------------------------------------------------ selection

def test_best_epoch_is_selected_on_the_validation_split_not_the_test_set(tmp_path, monkeypatch):
    """Validation RA 50 then 40, test RA 10 then 90: the best epoch is 1 (validation), whose test RA is 10."""
    ras = {"val": iter([50.0, 40.0]), "test": iter([10.0, 90.0])}
    monkeypatch.setattr(train, "evaluate", lambda model, loader, cfg, device, desc, **kw: {"sa": 99.0,
                                                                                          "ra": next(ras[desc])})
    row = entry.run(_args(DENSE + ["--epochs", "2", "--max-batches", "1"], tmp_path, "train_ori"), "train_ori")
    assert (row["best_epoch"], row["best_ra"]) == (1, 10.0)
    folder = run_dir(tmp_path / "runs" / "training")
    best = _checkpoint(folder, "model_best.pth.tar")
    assert (best["epoch"], best["best_epoch"], best["best_acc"]) == (1, 1, 10.0)


def test_test_at_end_tests_the_best_checkpoint_once_after_the_last_epoch(tmp_path, monkeypatch):
    """--test-at-end, validation RA 40, 50, 30: the test split is evaluated once, after epoch 3, on epoch 2's
    weights (model_best's, not the last epoch's); only the last row has the test keys, and model_best records them."""
    val_ras, tested = iter([40.0, 50.0, 30.0]), []

    def fake_evaluate(model, loader, cfg, device, desc, **kw):
        if desc == "val":
            return {"sa": 99.0, "ra": next(val_ras)}
        tested.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"sa": 77.0, "ra": 33.0}
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    argv = DENSE + ["--epochs", "3", "--max-batches", "1", "--test-at-end"]
    row = entry.run(_args(argv, tmp_path, "train_ori"), "train_ori")
    folder = run_dir(tmp_path / "runs" / "training")
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    assert [("ra" in r, "sa" in r, r.get("best_ra")) for r in rows] == [(False, False, None)] * 2 + [(True, True, 33.0)]
    assert (row["ra"], row["sa"], row["test_epoch"], row["best_epoch"]) == (33.0, 77.0, 2, 2)
    best, last = _checkpoint(folder, "model_best.pth.tar"), _checkpoint(folder)
    assert len(tested) == 1 and (best["epoch"], best["best_acc"], best["sa_record"]) == (2, 33.0, 77.0)
    assert all(torch.equal(tested[0][k], v) for k, v in best["state_dict"].items())
    assert any(not torch.equal(tested[0][k], v) for k, v in last["state_dict"].items())  # not the last epoch's
    assert last["best_acc"] == 33.0


def test_test_at_end_needs_a_validation_split(tmp_path):
    with pytest.raises(UsageError, match="--test-at-end .* --data-fraction"):
        _args(DENSE + ["--test-at-end", "--data-fraction", "1"], tmp_path, "train_ori")


# ------------------------------------------------------------------------------------------------ router optimizer

@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\(\)`")
def test_the_router_has_its_own_optimizer_lr_and_schedule(tmp_path):
    argv = MOE + ["--epochs", "4", "--lr", "0.1", "--lr-schedule", "cosine", "--router-optimizer", "adam",
                  "--router-lr", "0.03", "--router-lr-schedule", "step"]
    run = run_state.build_run(_args(argv, tmp_path), "train_moe", torch.device("cpu"))
    assert isinstance(run.router_optimizer, torch.optim.Adam) and isinstance(run.optimizer, torch.optim.SGD)
    router = {id(p) for p in run.model.router_parameters()}
    assert {id(p) for g in run.router_optimizer.param_groups for p in g["params"]} == router
    assert not router & {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    lrs = []
    for _ in range(4):
        lrs.append((run.optimizer.param_groups[0]["lr"], run.router_optimizer.param_groups[0]["lr"]))
        run.scheduler.step()
        run.router_scheduler.step()
    # step: x0.1 from 75% of the epochs (epoch 3 of 4); cosine for the backbone
    assert [r for _, r in lrs] == pytest.approx([0.03, 0.03, 0.03, 0.003])
    assert [b for b, _ in lrs] == pytest.approx([0.1, 0.1 * 0.5 * (1 + 2 ** -0.5), 0.05, 0.1 * 0.5 * (1 - 2 ** -0.5)])


# ------------------------------------------------------------------------------------------------ two processes

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vgg(seed=0):
    torch.manual_seed(seeded(seed))  # VGG-16 without BatchNorm: per-shard batch statistics play no part
    return models.build_model("vgg16_ori", num_classes=10, ratio=0.0625)


# The dense training step, PGD-AT with eps 0 (the attack leaves the images as they are): first unclipped (a
# wrongly scaled average cannot hide behind the clip), then clipped below the gradient's norm (the clip must
# see the averaged gradient, not each rank's own).
CFGS = (steps.StepConfig(at="pgd", eps=0.0, step_size=0.0, num_steps=1, grad_clip=0.0),
        steps.StepConfig(at="pgd", eps=0.0, step_size=0.0, num_steps=1, grad_clip=0.05))


def _two_steps(model, x, y, grad_sync=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for cfg in CFGS:
        steps.joint_step(model, x, y, cfg, StepContext(opt, grad_sync=grad_sync))


def _worker(rank, port, x, y, out, save_dir):
    torch.set_num_threads(1)  # a spawned process: tests/conftest.py does not run here
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    env = DistEnv(rank, 2)
    try:
        model = _vgg()
        shard = slice(rank * len(x) // 2, (rank + 1) * len(x) // 2)
        _two_steps(model, x[shard], y[shard], grad_sync=lambda p: average_gradients(p, env))
        sync_bn = "no error"
        try:
            run_state.build_run(parse_args(DENSE + ["--sync-bn", "--save-dir", save_dir], script="train_ori"), "train_ori",
                        torch.device("cpu"), env)
        except UsageError as e:
            sync_bn = str(e)
        torch.save({"state_dict": model.state_dict(), "sync_bn": sync_bn}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(seeded(3))
    x, y = torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    mp.spawn(_worker, args=(_free_port(), x, y, str(tmp / "out"), str(tmp / "runs")), nprocs=2, join=True)
    return x, y, [torch.load(f"{tmp / 'out'}.{r}", weights_only=True) for r in range(2)], tmp


@pytest.mark.slow
def test_two_processes_on_b_images_update_as_one_process_on_2b(two_processes):
    x, y, results, _ = two_processes
    model = _vgg()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _two_steps(model, x, y)
    one = model.state_dict()
    for r in results:
        for k, v in r["state_dict"].items():
            assert torch.allclose(v, one[k], rtol=1e-5, atol=1e-6), k
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # a real update, not two unchanged models


@pytest.mark.slow
def test_sync_bn_on_cpu_processes_is_a_usage_error(two_processes):
    """torch's SyncBatchNorm does not run on CPU: say so before anything is written, not at the first batch."""
    _, _, results, tmp = two_processes
    for r in results:
        assert r["sync_bn"] == "--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU)"
    assert not (tmp / "runs").exists()
