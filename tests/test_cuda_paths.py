"""Fixes of the CUDA path that CPU can check: precision choice, float32 routing and attacks under autocast (CPU
autocast runs bf16 too), host syncs counted as host reads, one all-reduce for the router statistics, agreement on
a non-finite loss across processes, --deterministic, and what --compile accepts and traces."""
import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import models
from args import parse_args
from utils import balance, steps, update
from utils.attack import ce_loss_fn, pgd_attack
from utils.errors import UsageError
from utils.update import StepContext
from utils.evaluate import EvalConfig, evaluate
from utils.gpu import (COMPILE_RECOMPILE_LIMIT, BackendConfig, backend_flags, deterministic_backends,
                       maybe_compile)
from utils.losses import robust_loss
from utils.gpu import Precision, native_bf16
from conftest import seeded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")


def _moe(routing="global", seed=0):
    torch.manual_seed(seeded(seed))
    return models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=2, routing=routing).eval()


def _images(n=6, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seeded(seed)))


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------ precision

@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_precision_picks_bf16_only_where_the_gpu_computes_it_natively(capability, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler("cuda") without CUDA warns and disables itself
        p = Precision(CUDA, None, capability=capability)
    assert p.enabled and p.dtype == dtype
    assert (p.scaler is not None) == (dtype == torch.float16)
    assert native_bf16(CUDA, capability) == (dtype == torch.bfloat16)


def test_precision_is_off_on_cpu_and_amp_there_is_a_usage_error():
    assert not Precision(torch.device("cpu"), None).enabled
    with pytest.raises(UsageError):
        Precision(torch.device("cpu"), True)


# ---------------------------------------------------------------------------------------- float32 under autocast

def test_global_router_decides_in_float32_under_bf16_autocast():
    model, x = _moe(), _images()
    with torch.no_grad():
        want = model.route(x)
        _, want_info = model(x, return_routing=True)
        with bf16_autocast():
            got = model.route(x)
            out, info = model(x, return_routing=True)
    assert out.dtype == torch.bfloat16  # the backbone does run under autocast
    assert got.dtype == info.logits.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(info.logits, want_info.logits)
    assert torch.equal(info.expert, want_info.expert)


def test_layer_routers_decide_in_float32_under_bf16_autocast():
    model, x = _moe("layer"), _images()
    with torch.no_grad(), bf16_autocast():
        _, info = model(x, return_routing=True)
    assert len(info.logits) > 1 and all(lg.dtype == torch.float32 for lg in info.logits)


def test_gate_keeps_moe_layers_in_autocast_dtype_and_gradients_reach_the_router():
    model, x = _moe(), _images()
    model.train()
    moe_conv = next(m for m in model.modules() if isinstance(m, models.layers.MoEConv2d))
    dtypes = []
    moe_conv.register_forward_hook(lambda m, inputs, out: dtypes.append(out.dtype))
    with bf16_autocast():
        out = model(x)
    assert dtypes == [torch.bfloat16]  # a float32 gate would have promoted the layer's output
    out.float().sum().backward()
    assert model.router.fc.weight.grad is not None and torch.isfinite(model.router.fc.weight.grad).all()


def test_attack_runs_in_float32_under_autocast():
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_ori", ratio=0.125).eval()
    x, y = _images(4), torch.tensor([0, 1, 2, 3])
    seen = []

    def loss(m, x_adv):
        logits = m(x_adv)
        seen.append(logits.dtype)
        return ce_loss_fn(y)(m, x_adv)

    kw = dict(eps=8 / 255, step_size=2 / 255, num_steps=2)
    want = pgd_attack(model, x, loss, generator=torch.Generator().manual_seed(seeded(3)), **kw)
    with bf16_autocast():
        got = pgd_attack(model, x, loss, generator=torch.Generator().manual_seed(seeded(3)), **kw)
    assert set(seen) == {torch.float32}
    assert torch.equal(got, want)


def test_trades_attack_target_is_float32_under_autocast():
    """TRADES' attack (target included) gives the float32 adversarial examples inside a bf16 training step."""
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_ori", ratio=0.125).train()
    twin = copy.deepcopy(model)  # the training passes move BatchNorm statistics: each call gets a fresh model
    x, y = _images(4), torch.tensor([0, 1, 2, 3])
    cfg = steps.StepConfig(at="trades", eps=8 / 255, step_size=2 / 255, num_steps=2, beta=6.0)
    want = robust_loss(model, x, y, cfg, generator=torch.Generator().manual_seed(seeded(5)))["x_adv"]
    with bf16_autocast():
        got = robust_loss(twin, x, y, cfg, generator=torch.Generator().manual_seed(seeded(5)))["x_adv"]
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------ host syncs

class HostReads:
    """Counts reads of tensor values by the host (`item`, `tolist`, `bool`, `int`, `float`): each is a
    host-device sync on CUDA."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **kw):
                self.count += 1
                return _original(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, counted)


def test_finiteness_of_all_router_parameters_is_one_host_read(monkeypatch):
    model = _moe()
    params = model.router_parameters()
    assert len(params) > 50
    reads = HostReads(monkeypatch)
    update.check_finite(params, "a router parameter")
    assert reads.count == 1
    with torch.no_grad():
        params[-1][0] = float("nan")
    with pytest.raises(update.NonFiniteError, match="router parameter"):
        update.check_finite(params, "a router parameter")


@pytest.mark.parametrize("routing", ["global", "layer"])
def test_sparse_forward_reads_the_host_once_per_routing_decision(monkeypatch, routing):
    model, x = _moe(routing), _images(8)
    n_layers = sum(isinstance(m, models.layers.MoEConv2d) for m in model.modules())
    reads = HostReads(monkeypatch)
    with torch.no_grad():
        model(x)
    assert reads.count == (1 if routing == "global" else n_layers)


def test_router_statistics_are_averaged_in_one_call():
    model, x = _moe(), _images(8)
    twin = _moe()
    calls = []

    def average(t):  # doubles, so that the test sees every buffer come back to its own place
        calls.append(t.shape)
        return 2 * t

    balance.track_router_statistics(model, x, average)
    balance.track_router_statistics(twin, x)
    assert len(calls) == 1
    bns = [m for m in model.router.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    twin_bns = [m for m in twin.router.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn, t in zip(bns, twin_bns):
        assert torch.allclose(bn.running_mean, 2 * t.running_mean) and torch.allclose(bn.running_var, 2 * t.running_var)


AGREE_SCRIPT = textwrap.dedent("""
    import sys, datetime
    import torch, torch.distributed as dist
    from utils.update import NonFiniteError, check_finite
    from utils.distributed import DistEnv, all_reduce_sum
    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    env = DistEnv(rank, 2, 0)
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    try:
        check_finite(loss, "training loss", lambda t: all_reduce_sum(t, env) / 2)
        result = "ok"
    except NonFiniteError:
        result = "raised"
    open(out, "w").write(result)
    dist.barrier()  # both ranks leave together: gloo could hang in destroy_process_group when one left first
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", AGREE_SCRIPT, str(rank), str(store), str(tmp_path / f"r{rank}")],
                              cwd=ROOT, env=env) for rank in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert [(tmp_path / f"r{rank}").read_text() for rank in range(2)] == ["raised", "raised"]


# ------------------------------------------------------------------------------------------------ backends

def test_deterministic_backends_sets_every_flag(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cudnn.benchmark = True
        deterministic_backends()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


@pytest.mark.parametrize("flag", [True, False])
def test_backend_flags_sets_the_models_own_cudnn_flag_and_restores_it(flag):
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not flag
    try:
        with backend_flags(BackendConfig(cudnn_benchmark=flag)):
            assert torch.backends.cudnn.benchmark == flag
        assert torch.backends.cudnn.benchmark == (not flag)
    finally:
        torch.backends.cudnn.benchmark = saved


def test_benchmark_times_each_model_under_its_own_cudnn_flag():
    from utils.tools import benchmark
    seen = {}
    fns = {flag: benchmark.with_own_flags(BackendConfig(cudnn_benchmark=flag),
                                          lambda flag=flag: seen.setdefault(flag, []).append(
                                              torch.backends.cudnn.benchmark))
           for flag in (True, False)}
    benchmark.interleaved_times(fns, torch.device("cpu"), warmup=1, repeats=2)
    assert seen == {True: [True] * 3, False: [False] * 3}


# ------------------------------------------------------------------------------------------------ --compile

def test_compile_is_refused_for_moe_models():
    with pytest.raises(UsageError, match="dense models only"):
        parse_args(["--arch", "resnet18_cifar_moe", "--n-expert", "2", "--compile"], script="train_moe")
    with pytest.raises(ValueError):
        maybe_compile(_moe(), True, backend="eager")
    assert parse_args(["--arch", "resnet18_cifar_ori", "--compile"], script="train_ori").compile


@pytest.mark.slow
def test_compiled_dense_training_and_evaluation_stay_within_the_recompile_limit():
    """A TRADES step, a smaller last batch and an evaluation trace few graphs, and a second round none."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_ori", ratio=0.125)
    maybe_compile(model, True, backend=counting_backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = steps.StepConfig(num_steps=1, grad_clip=1.0)
    g = torch.Generator().manual_seed(seeded(0))
    batches = [(torch.rand(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)) for b in (8, 5)]
    try:
        counts = []
        for _ in range(2):
            for x, y in batches:
                model.train()
                steps.joint_step(model, x, y, cfg, StepContext(opt))
            evaluate(model, batches, EvalConfig(eps=0.03, step_size=0.01, num_steps=1, progress=False), "cpu")
            counts.append(len(graphs))
        assert counts[0] == counts[1] <= 8 < COMPILE_RECOMPILE_LIMIT
        assert torch._dynamo.config.recompile_limit >= COMPILE_RECOMPILE_LIMIT
    finally:
        torch._dynamo.reset()
