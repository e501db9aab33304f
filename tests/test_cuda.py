"""The CUDA paths, each checked small and exactly (sh/gpu_check.sh runs this file on a GPU).

Every test that needs CUDA is skipped without it, so CI on CPU stays as it is. Where the same check means
something on CPU, the test is parametrized over the device and its CPU twin runs everywhere: that proves the
test body itself works before a GPU is ever lent.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import models
from utils import advmoe, balance, steps
from utils.attack import ce_loss_fn, pgd_attack
from utils.losses import robust_loss
from utils.update import StepContext
from utils.gpu import Precision
from conftest import seeded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
# (device, AMP dtype): CPU runs in float32; on CUDA bf16 and fp16 (forced with a pre-Ampere capability) + scaler.
PRECISIONS = [("cpu", None), pytest.param("cuda", "bf16", marks=needs_cuda),
              pytest.param("cuda", "fp16", marks=needs_cuda)]
EPS, STEP = 8 / 255, 2 / 255


def precision_for(device, amp):
    """Precision of the run: off on CPU, bf16 on CUDA, or fp16 + GradScaler (a compute capability 7.0 GPU)."""
    if amp is None:
        return Precision(torch.device(device), None)
    return Precision(torch.device(device), True, capability=(8, 0) if amp == "bf16" else (7, 0))


def batch(device, n=16, seed=0):
    g = torch.Generator().manual_seed(seeded(seed))
    return torch.rand(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def snapshot(params):
    return [p.detach().clone() for p in params]


def moved(before, params):
    return any(not torch.equal(b, p) for b, p in zip(before, params))


def unchanged(before, params):
    return all(torch.equal(b, p) for b, p in zip(before, params))


# ------------------------------------------------------------------------------------------------ training steps

STEP_CFG = steps.StepConfig(num_steps=2, eps=EPS, step_size=STEP, grad_clip=1.0, router_grad_clip=1.0,
                             balance="median")


@pytest.mark.parametrize("device, amp", PRECISIONS)
def test_dense_training_step(device, amp):
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_ori", ratio=0.25).to(device).train()
    precision = precision_for(device, amp)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = batch(device)
    before = snapshot(model.parameters())
    for _ in range(3):  # fp16's scaler may skip the first steps (inf gradients at its initial scale)
        with precision.autocast():
            out = steps.joint_step(model, x, y, STEP_CFG, StepContext(opt, scaler=precision.scaler))
        assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
        if moved(before, model.parameters()):
            break
    assert moved(before, model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["global", "layer"])
@pytest.mark.parametrize("device, amp", PRECISIONS)
def test_moe_router_and_experts_each_move_only_in_their_own_step(device, amp, routing):
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_moe", ratio=0.25, n_expert=2, routing=routing).to(device).train()
    precision = precision_for(device, amp)
    router, backbone = model.router_parameters(), model.backbone_parameters()
    opt = torch.optim.SGD(backbone, lr=0.05, momentum=0.9)
    router_opt = torch.optim.SGD(router, lr=0.05, momentum=0.9)
    x, y = batch(device)
    balance.init_router(model, x)
    router_moved = experts_moved = False
    for _ in range(3):
        r0, b0 = snapshot(router), snapshot(backbone)
        with precision.autocast():
            out = advmoe.router_step(model, x, y, STEP_CFG, StepContext(router_optimizer=router_opt, scaler=precision.scaler))
        assert torch.isfinite(out["loss"])
        assert unchanged(b0, backbone)
        router_moved |= moved(r0, router)
        r1 = snapshot(router)
        with precision.autocast():
            out = advmoe.expert_step(model, x, y, STEP_CFG, StepContext(opt, scaler=precision.scaler))
        assert torch.isfinite(out["loss"])
        assert unchanged(r1, router)
        experts_moved |= moved(b0, backbone)
    assert router_moved and experts_moved


# ---------------------------------------------------------------------------------------- attacks under autocast

@pytest.mark.slow
@pytest.mark.parametrize("device, amp", PRECISIONS)
def test_attacks_under_autocast_stay_in_the_eps_ball_and_in_range(device, amp):
    torch.manual_seed(seeded(0))
    precision = precision_for(device, amp)
    x, y = batch(device)
    for model in (models.build_model("resnet18_cifar_ori", ratio=0.25),
                  models.build_model("resnet18_cifar_moe", ratio=0.25, n_expert=2)):
        model = model.to(device).train()
        with precision.autocast():
            advs = [pgd_attack(model, x, ce_loss_fn(y), eps=EPS, step_size=STEP, num_steps=3)]
            for at in ("trades", "pgd"):
                cfg = steps.StepConfig(at=at, eps=EPS, step_size=STEP, num_steps=3, beta=6.0)
                advs.append(robust_loss(model, x, y, cfg)["x_adv"])
        for x_adv in advs:
            assert x_adv.dtype == torch.float32
            assert (x_adv - x).abs().max() <= EPS + 1e-6
            assert x_adv.min() >= 0 and x_adv.max() <= 1


def _digits_tensors(device):
    pytest.importorskip("sklearn")
    from utils.data import LoaderConfig, build_loaders
    train, _, test, _ = build_loaders(LoaderConfig("Digits", "unused", batch_size=128, test_batch_size=360,
                                                   num_workers=0, seed=0, data_fraction=1.0), "cpu")
    return train, next(iter(test))


@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_pgd_robust_accuracy_under_amp_is_within_two_points_of_float32(amp):
    """A dense model PGD-trained for 3 epochs on Digits; PGD-10 RA on the 360 test images with the attack run
    under autocast vs in float32 (what training and evaluation do), predictions in float32 both times."""
    torch.manual_seed(seeded(0))
    device = "cuda"
    train, (xt, yt) = _digits_tensors(device)
    model = models.build_model("resnet18_cifar_ori", ratio=0.25).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = steps.StepConfig(at="pgd", num_steps=2, eps=EPS, step_size=5 / 255, grad_clip=1.0)
    for epoch in range(3):
        train.sampler.set_epoch(epoch)
        for x, y in train:
            model.train()
            steps.joint_step(model, x.to(device), y.to(device), cfg, StepContext(opt))
    model.eval()
    xt, yt = xt.to(device), yt.to(device)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16

    def amp_ce(m, x_adv):  # the attack's forward under autocast (pgd_attack itself switches it off)
        with torch.autocast("cuda", dtype=dtype):
            return F.cross_entropy(m(x_adv).float(), yt, reduction="sum")

    ras = []
    for loss in (ce_loss_fn(yt), amp_ce):
        x_adv = pgd_attack(model, xt, loss, eps=EPS, step_size=STEP, num_steps=10,
                           generator=torch.Generator(device=device).manual_seed(seeded(1)))
        with torch.no_grad():
            ras.append(100 * (model(x_adv).argmax(1) == yt).float().mean().item())
    print(f"PGD-10 RA float32 {ras[0]:.2f}% vs attack under {amp} {ras[1]:.2f}%")
    assert abs(ras[0] - ras[1]) <= 2.0, ras


# ------------------------------------------------------------------------------------------------ sparse experts

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", ["global", "layer"])
def test_sparse_equals_dense_masked_with_an_empty_expert(device, routing):
    """Outputs, input gradients and parameter gradients, float32 (TF32 off), N=4 with experts 1 and 3 unused."""
    allow = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(seeded(0))
        model = models.build_model("resnet18_cifar_moe", ratio=0.25, n_expert=4, routing=routing).to(device).eval()
        x, y = batch(device, n=6)
        n_layers = sum(isinstance(m, models.layers.MoEConv2d) for m in model.modules())
        fixed = torch.tensor([0, 2, 2, 0, 2, 0], device=device)
        expert = fixed if routing == "global" else [fixed] * n_layers
        results = []
        for sparse in (True, False):
            model.sparse = sparse
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            out = model(xi, expert=expert)
            F.cross_entropy(out, y).backward()
            grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
            results.append((out.detach(), xi.grad, grads))
        (o1, g1, p1), (o2, g2, p2) = results
        torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
        for a, b in zip(p1, p2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        # and through the router (global: straight-through gate; layer: every layer's own router)
        model.sparse = True
        want = model(x, return_routing=True)[1]
        model.sparse = False
        got = model(x, return_routing=True)[1]
        for a, b in zip(*(e if isinstance(e, list) else [e] for e in (want.expert, got.expert))):
            assert torch.equal(a, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow


@needs_cuda
@pytest.mark.parametrize("routing", ["global", "layer"])
def test_a_sparse_forward_synchronises_once_per_routing_decision(routing):
    """CUDA's sync debug mode flags every synchronising call: one per forward (global routing), one per MoE layer
    (per-layer routing), from the expert counts; `bincount` added its own before."""
    import warnings
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_moe", ratio=0.25, n_expert=2, routing=routing).cuda().eval()
    x, _ = batch("cuda", n=8)
    n_layers = sum(isinstance(m, models.layers.MoEConv2d) for m in model.modules())
    with torch.no_grad():
        model(x)  # warm-up: lazy initialisation may synchronise
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == (1 if routing == "global" else n_layers), [str(w.message) for w in syncs]


# ------------------------------------------------------------------------------------------------ data on the device

@pytest.mark.parametrize("device", DEVICES)
def test_resident_loader_gives_the_cpu_loaders_batches_on_the_device(device):
    pytest.importorskip("sklearn")
    from utils.data import LoaderConfig, build_loaders
    from utils.gpu import resident_loaders
    loaders = build_loaders(LoaderConfig("Digits", "unused", batch_size=64, test_batch_size=100,
                                         num_workers=0, seed=3, data_fraction=0.9), "cpu")[:3]
    on_device = resident_loaders("Digits", loaders, device, seed=3)
    on_cpu = resident_loaders("Digits", loaders, "cpu", seed=3)
    for cpu, res in ((loaders[1], on_device[1]), (loaders[2], on_device[2])):  # unaugmented: the DataLoader's
        for (x0, y0), (x1, y1) in zip(cpu, res):
            assert x1.device.type == device and torch.equal(x0, x1.cpu()) and torch.equal(y0, y1.cpu())
    for epoch in (0, 1):  # augmented: the same order and augmentation stream as on the CPU
        on_device[0].sampler.set_epoch(epoch)
        a = [(x.cpu(), y.cpu()) for x, y in on_device[0]]
        on_cpu[0].sampler.set_epoch(epoch)
        b = list(on_cpu[0])
        assert len(a) == len(b) == len(loaders[0])
        for (x0, y0), (x1, y1) in zip(a, b):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


# ------------------------------------------------------------------------------------------------ torch.compile

@needs_cuda
def test_compile_keeps_checkpoint_keys_and_the_eager_logits():
    from utils.gpu import maybe_compile
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_ori", ratio=0.25).cuda().eval()
    x, _ = batch("cuda", n=8)
    keys = list(model.state_dict())
    with torch.no_grad():
        want = model(x)
    torch._dynamo.reset()
    try:
        maybe_compile(model, True)
        with torch.no_grad():
            got = model(x)
            got_small = model(x[:5])  # another batch size: the dynamic graph, no recompile needed
    finally:
        torch._dynamo.reset()
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_small, want[:5], rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------ end to end

TINY_CUDA = ["--dataset", "Digits", "--ratio", "0.25", "--batch-size", "64", "--num-workers", "0",
             "--data-fraction", "1.0", "--max-test-batches", "1", "--num-steps-test", "2", "--no-progress",
             "--device", "cuda"]
MOE = ["--arch", "resnet18_cifar_moe", "--n-expert", "2"] + TINY_CUDA


def _env():
    return dict(os.environ)


def _checkpoints(save):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(save) for f in fs if f == "checkpoint.pth.tar")


@needs_cuda
def test_torchrun_one_process_trains_a_digits_epoch_and_writes_one_checkpoint(tmp_path):
    pytest.importorskip("sklearn")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(ROOT, "train_moe.py"), *MOE, "--epochs", "1", "--save-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_checkpoints(tmp_path)) == 1


@needs_cuda
def test_nccl_collectives_of_the_training_loop_on_one_gpu(tmp_path):
    """NCCL itself: a 1-rank group runs the gradient bucket all-reduce and the finiteness agreement."""
    script = (
        "import torch, torch.distributed as dist\n"
        "from utils.distributed import DistEnv, _reduce_bucket\n"
        "from utils.update import NonFiniteError, check_finite\n"
        "dist.init_process_group('nccl', init_method='file://" + str(tmp_path / "store") + "', rank=0, world_size=1)\n"
        "p = torch.nn.Parameter(torch.ones(5, device='cuda')); p.grad = torch.full((5,), 3.0, device='cuda')\n"
        "_reduce_bucket([p], DistEnv(0, 1, 0))\n"
        "assert torch.equal(p.grad, torch.full((5,), 3.0, device='cuda'))\n"
        "def average(t):\n"
        "    t = t.clone(); dist.all_reduce(t); return t\n"
        "check_finite(p.grad, 'ok', average)\n"
        "try:\n"
        "    check_finite(torch.tensor(float('nan'), device='cuda'), 'loss', average); raise SystemExit(3)\n"
        "except NonFiniteError:\n"
        "    pass\n"
        "dist.destroy_process_group()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


def _final_state(save):
    (path,) = _checkpoints(save)
    return torch.load(path, weights_only=True)["state_dict"]


@needs_cuda
def test_resume_after_a_kill_on_cuda_with_deterministic_equals_the_uninterrupted_run(tmp_path):
    pytest.importorskip("sklearn")
    argv = MOE + ["--epochs", "3", "--max-batches", "4", "--deterministic"]
    script = os.path.join(ROOT, "train_moe.py")
    ref = subprocess.run([sys.executable, script, *argv, "--save-dir", str(tmp_path / "ref")], capture_output=True,
                         text=True, env=_env(), cwd=ROOT, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    save = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, script, *argv, "--save-dir", str(save)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    t0 = time.time()
    while not _checkpoints(save) and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([sys.executable, script, *argv, "--save-dir", str(save), "--resume", "auto"],
                             capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _final_state(tmp_path / "ref"), _final_state(save)
    distance = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    print(f"largest weight difference resumed vs uninterrupted: {distance:.3g}")
    assert distance == 0.0
