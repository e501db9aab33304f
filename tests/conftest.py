"""Test-session setup and the helpers that several test files share (no test file imports another).

Threads: every test computes on one thread by default, in this process (the session fixture `test_threads`) and
in the processes it starts (OMP_NUM_THREADS, set here before torch is imported, is inherited). The models are tiny,
and two pytest-xdist workers with two OpenMP threads each on a 2-core machine spin against each other: an
in-process test that takes 2 s alone took 122 s that way. ADVMOE_TEST_THREADS=N (default 1) runs the session on N
threads instead: sh/check_portable.sh runs the training and attack tests on 1 and 2, since another thread count
sums in another order (another rounding) as another machine would. A process started with `multiprocessing` spawn
does not run this file: its target sets its own thread count.

Seeds: every random choice of the tests goes through `seeded(n)`, moved by ADVMOE_TEST_SEED (default 0); a test
must pass under any offset (sh/check_portable.sh runs three, .ci/run two).
"""
import contextlib
import os
import subprocess
import sys
import time

THREADS = int(os.environ.get("ADVMOE_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One seed offset for every random choice in the tests (sh/check_portable.sh runs the suite under several): a test
# that holds only for one seed asserts what one machine's rounding happened to produce.
SEED_OFFSET = int(os.environ.get("ADVMOE_TEST_SEED", "0"))


def seeded(seed):
    """`seed` moved by the session's offset (ADVMOE_TEST_SEED, default 0)."""
    return seed + SEED_OFFSET


def pytest_configure(config):
    """Hypothesis draws its examples from the seed offset too (unless --hypothesis-seed names one)."""
    try:
        from hypothesis import core
    except ImportError:
        return
    if config.getoption("hypothesis_seed", None) is None:
        core.global_force_seed = SEED_OFFSET


@pytest.fixture(scope="session", autouse=True)
def test_threads():
    """THREADS intra-op threads for the whole session (the one place tests set threads; default 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ entry scripts

# The runs' --seed is the default (1234) moved by the offset.
SEED = ["--seed", str(seeded(1234))]
TINY = ["--dataset", "Digits", "--ratio", "0.125", "--batch-size", "32", "--test-batch-size", "64",
        "--num-workers", "0", "--max-test-batches", "1", "--num-steps-test", "2", "--no-progress",
        "--num-steps", "1", "--device", "cpu"] + SEED
DENSE = ["--arch", "resnet18_cifar_ori"] + TINY
MOE = ["--arch", "resnet18_cifar_moe", "--n-expert", "2"] + TINY


def run_script(script, argv, **kw):
    """`python script argv` from the repository root; the CompletedProcess with its text output."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                          cwd=ROOT, **kw)


def run_dir(save_dir):
    """The one run folder (holding a metrics.jsonl) under `save_dir`."""
    found = [os.path.join(d, s) for d, subs, _ in os.walk(save_dir) for s in subs
             if os.path.exists(os.path.join(d, s, "metrics.jsonl"))]
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------------------------------------------------------ checkpoints

TINY_RATIO = 0.0625


def train_tiny(arch, steps, n_expert=None, seed=0):
    """A ResNet-18 at ratio 1/16 trained with plain cross-entropy for a few SGD steps on Digits (the weights and
    batches drawn from `seeded(seed)`)."""
    import models
    from utils.data import build_datasets
    torch.manual_seed(seeded(seed))
    train_ds, _ = build_datasets("Digits", "unused")
    model = models.build_model(arch, num_classes=10, ratio=TINY_RATIO, n_expert=n_expert)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, len(train_ds), (48,))
        loss = F.cross_entropy(model(train_ds.images[idx]), train_ds.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Re-estimate BatchNorm statistics as plain averages: after so few steps the running averages still
    # remember the initial weights and the eval-mode model would be far worse than the trained one.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for start in range(0, 512, 128):
            model(train_ds.images[start:start + 128])
    for bn in bns:
        bn.momentum = 0.1
    return model.eval(), opt


def ours(model, opt, arch, n_expert=None):
    """A checkpoint in this tool's layout (records how to rebuild the model)."""
    return {"format": "advmoe-tool/1", "epoch": 1, "arch": arch, "state_dict": model.state_dict(), "best_acc": 0.0,
            "sa_record": 0.0, "optimizer": opt.state_dict(), "ratio": TINY_RATIO, "n_expert": n_expert,
            "num_classes": 10, "dataset": "Digits", "normalize": False,
            "routing": "global" if n_expert else None, "args": {}}


# ------------------------------------------------------------------------------------------------------------
# Entry scripts run in this process (tests/test_hostile_inputs.py, test_one_writer.py, test_study.py)
# ------------------------------------------------------------------------------------------------------------

FLAGS = ["--arch", "resnet18_cifar_ori", "--dataset", "Digits", "--ratio", "0.125", "--batch-size", "32",
         "--test-batch-size", "32", "--num-workers", "0", "--max-batches", "1", "--max-test-batches", "1",
         "--num-steps", "1", "--num-steps-test", "1", "--no-progress", "--device", "cpu"] + SEED
TWO_EPOCHS = FLAGS + ["--epochs", "2"]


def cli(main, argv, capsys):
    """(exit code, stderr) of an entry script's `main` run as `python script.py argv` would run it."""
    capsys.readouterr()
    try:
        from utils.cli import run_main
        run_main(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(code, err, *named):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[:2000]
    assert len(lines[0]) <= 1100, f"{len(lines[0])} characters"
    for word in named:
        assert word in lines[0], lines[0]


def snapshot(root):
    """Every folder and every file's bytes under `root`: equal snapshots mean nothing was written."""
    out = {}
    for d, subs, files in os.walk(root):
        for s in subs:
            out[os.path.relpath(os.path.join(d, s), root) + "/"] = None
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


def started_until(argv, ready, **popen):
    """Popen `argv` in the repository and wait (30 s at most) until the file `ready` exists: the process has reached
    the point where the test interrupts it."""
    p = subprocess.Popen(argv, cwd=ROOT, **popen)
    t0 = time.time()
    while not os.path.exists(ready) and time.time() - t0 < 30:
        time.sleep(0.05)
    return p


@contextlib.contextmanager
def no_signal_handlers():
    """Runs in this process must not leave their SIGTERM/SIGUSR1 handlers in the test process."""
    with pytest.MonkeyPatch.context() as mp:
        from utils.train import StopFlag
        mp.setattr(StopFlag, "install", lambda self: self)
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run: (save dir, run folder, its checkpoint.pth.tar)."""
    save = tmp_path_factory.mktemp("finished")
    import train_ori
    with no_signal_handlers():
        train_ori.main(TWO_EPOCHS + ["--save-dir", str(save)])
    folder = os.path.join(save, "training", "train_ori", os.listdir(save / "training" / "train_ori")[0])
    return save, folder, os.path.join(folder, "checkpoint", "checkpoint.pth.tar")


def moe_convs(model):
    """The model's MoE conv layers, in module order."""
    from models.layers import MoEConv2d
    return [m for m in model.modules() if isinstance(m, MoEConv2d)]


def forward_backward(model, x, expert, out_weight):
    """Output, input gradient, parameter gradients and routing of one forward/backward of `out * out_weight`."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out, info = model(x, expert=expert, return_routing=True)
    (out * out_weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, info


def spread_router(model, x):
    """Make the router (layer routing: the first MoE layer's) send image e of batch `x` to expert e for e < N:
    its last layer becomes a nearest-prototype classifier over the features it reads, the first N images the
    prototypes. A batch the router really splits among all experts (a fresh router sends all to one)."""
    fc = model.router.fc if model.routing_mode == "global" else moe_convs(model)[0].router.fc
    seen = []
    handle = fc.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    feats = seen[0]  # (B, C): the features fc reads, the same in the next pass (only fc changes)
    mean = feats.mean(0)
    proto = feats[:fc.out_features] - mean
    proto = 10 * proto / proto.norm(dim=1, keepdim=True)
    with torch.no_grad():
        fc.weight.copy_(proto)
        fc.bias.copy_(-proto @ mean)
