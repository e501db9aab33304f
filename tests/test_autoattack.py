"""auto_attack_eval.py: the official AutoAttack on dense and MoE checkpoints, resumable, warnings surfaced.

Tiny ResNet-18s (ratio 1/16) trained for a few steps on Digits, `--version custom` with cheap AutoAttack
settings on 8-16 test images, so the file runs in seconds on two CPU cores.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import models
from utils import autoattack_eval as aa
from utils.data import build_datasets
from utils.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import auto_attack_eval  # noqa: E402  (the entry script: its parser is the one users get)

RATIO = 0.0625
# AutoAttack's own settings for the cheap runs (the authors' README customises attacks the same way).
CHEAP = {"apgd": {"n_restarts": 1, "n_iter": 10}, "apgd_targeted": {"n_iter": 10, "n_target_classes": 2}}


def parse(*argv):
    return auto_attack_eval.get_autoattack_parser().parse_args([str(a) for a in argv])


def evaluate(ckpt, out, *extra, attack_params=CHEAP):
    args = parse("--source-net", ckpt, "--out", out, "--dataset", "Digits", "--data-dir", "unused",
                 "--device", "cpu", "--num-workers", 0, *extra)
    return aa.evaluate_checkpoint(args, attack_params=attack_params, progress=False)


def digits_test():
    _, test_ds = build_datasets("Digits", "unused")
    return test_ds.images, test_ds.labels


def train_tiny(arch, steps, n_expert=None, seed=0):
    """A ResNet-18 at ratio 1/16 trained with plain cross-entropy for a few SGD steps on Digits."""
    torch.manual_seed(seed)
    train_ds, _ = build_datasets("Digits", "unused")
    model = models.build_model(arch, num_classes=10, ratio=RATIO, n_expert=n_expert)
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
            "sa_record": 0.0, "optimizer": opt.state_dict(), "ratio": RATIO, "n_expert": n_expert,
            "num_classes": 10, "dataset": "Digits", "normalize": False,
            "routing": "global" if n_expert else None, "args": {}}


def reference(model, opt, arch):
    """A checkpoint in the reference's layout: no ratio, experts, dataset; MoE adds `router`."""
    ckpt = {"epoch": 1, "arch": arch, "state_dict": model.state_dict(), "best_acc": 0.0, "sa_record": 0.0,
            "optimizer": opt.state_dict()}
    if models.is_moe(arch):
        ckpt["router"] = model.router.state_dict()
        ckpt["router_optimizer"] = opt.state_dict()
    return ckpt


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    """One thread: these models are too small to gain from more, and the machine is shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def classify_first_point(model):
    """Raise the classifier's bias for the first test point's label until its logit leads by 1: the model then
    classifies that point correctly, so its clean accuracy on the first test points is above 0 whatever the training
    steps produced (12 steps left the MoE at 2 to 4 of 16 points here, close enough to none). Only that bias moves."""
    x, y = digits_test()
    with torch.no_grad():
        logits = model(x[:1])[0]
        model.linear.bias[y[0]] += logits.max() - logits[y[0]] + 1.0
        assert model(x[:1]).argmax(1).item() == y[0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    dense, dense_opt = train_tiny("resnet18_cifar_ori", steps=40)
    moe, moe_opt = train_tiny("resnet18_cifar_moe", steps=12, n_expert=2)
    classify_first_point(moe)
    paths = {}
    for name, ckpt in [("dense", ours(dense, dense_opt, "resnet18_cifar_ori")),
                       ("dense_ref", reference(dense, dense_opt, "resnet18_cifar_ori")),
                       ("moe", ours(moe, moe_opt, "resnet18_cifar_moe", n_expert=2)),
                       ("moe_ref", reference(moe, moe_opt, "resnet18_cifar_moe"))]:
        paths[name] = str(folder / f"{name}.pth.tar")
        torch.save(ckpt, paths[name])
    return paths


def pgd_accuracy(model, x, y, eps, steps=10):
    """% of points that survive L-inf PGD (random start, step eps/4), a baseline AutoAttack must match. As in
    AutoAttack's count, a point survives only if it is also classified correctly clean (so never above clean)."""
    torch.manual_seed(0)
    delta = (torch.rand_like(x) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        grad, = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + eps / 4 * grad.sign()).clamp(-eps, eps)
    with torch.no_grad():
        survived = (model((x + delta).clamp(0, 1)).argmax(1) == y) & (model(x).argmax(1) == y)
    return 100.0 * survived.float().mean().item()


# ------------------------------------------------------------------------------------------------------------

def test_autoattack_below_pgd_below_clean(ckpts, tmp_path):
    n, eps = 16, 4 / 255
    report = evaluate(ckpts["dense"], tmp_path / "aa.json", "--n-ex", n, "--epsilon", 4, "--version", "custom",
                      "--attacks", "apgd-ce", "apgd-t",
                      attack_params={"apgd": {"n_restarts": 1}, "apgd_targeted": {"n_iter": 20, "n_target_classes": 3}})
    spec = aa.resolve_spec(torch.load(ckpts["dense"], weights_only=True), "dense")
    model = aa.build_from_checkpoint(torch.load(ckpts["dense"], weights_only=True), "dense", spec, "cpu")
    x, y = digits_test()
    x, y = x[:n], y[:n]
    with torch.no_grad():
        clean = 100.0 * (model(x).argmax(1) == y).float().mean().item()
    pgd = pgd_accuracy(model, x, y, eps)
    assert report["clean_accuracy"] == pytest.approx(clean)
    assert report["robust_accuracy"] <= pgd <= clean
    assert 0 < clean and report["robust_accuracy"] < clean  # the attack did something on a non-trivial model
    after = report["robust_accuracy_after"]
    assert list(after) == ["apgd-ce", "apgd-t"]
    assert clean >= after["apgd-ce"] >= after["apgd-t"] == report["robust_accuracy"]
    on_disk = json.loads((tmp_path / "aa.json").read_text())
    for key in ("clean_accuracy", "robust_accuracy", "robust_accuracy_after", "n_ex", "eps", "norm", "version",
                "seconds", "checkpoint", "package", "warnings", "device", "attacks"):
        assert key in on_disk, key
    assert on_disk["n_ex"] == n and on_disk["eps"] == pytest.approx(eps) and on_disk["norm"] == "Linf"
    assert on_disk["package"]["name"] in ("pyautoattack", "autoattack")
    assert on_disk["robust_accuracy"] == report["robust_accuracy"]


def test_flags_are_the_librarys_own():
    """The recorded final flags equal what the returned labels imply, and the per-attack flags only drop."""
    lib = aa.load_library()
    model, _ = train_tiny("resnet18_cifar_ori", steps=10, seed=1)
    aa.prepare_model(model)
    x, y = digits_test()
    settings = aa.AttackSettings(lib, eps=8 / 255, version="custom", attacks=("apgd-ce", "apgd-t"), batch_size=5,
                                 attack_params=CHEAP)
    res = aa.attack_chunk(model, x[:12], y[:12], settings, seed=3)
    assert res.attacks == ["apgd-ce", "apgd-t"]
    assert torch.equal(res.robust, res.after["apgd-t"])
    assert not (res.after["apgd-ce"] & ~res.clean).any()  # only clean-correct points can stay robust
    assert not (res.robust & ~res.after["apgd-ce"]).any()
    with torch.no_grad():
        assert torch.equal(res.clean, model(x[:12]).argmax(1) == y[:12])


class _Killed(Exception):
    pass


def test_killed_and_resumed_equals_uninterrupted(ckpts, tmp_path, monkeypatch):
    argv = ("--n-ex", 12, "--chunk-size", 4, "--epsilon", 4, "--version", "custom", "--attacks", "apgd-ce")
    whole = evaluate(ckpts["dense"], tmp_path / "whole.json", *argv)

    def kill_after_chunk_1(index, record):
        if index == 1:
            raise _Killed

    monkeypatch.setattr(aa, "on_chunk_done", kill_after_chunk_1)
    with pytest.raises(_Killed):
        evaluate(ckpts["dense"], tmp_path / "resumed.json", *argv)
    assert not (tmp_path / "resumed.json").exists()
    monkeypatch.setattr(aa, "on_chunk_done", lambda index, record: None)
    attacked = []
    real = aa.attack_chunk
    monkeypatch.setattr(aa, "attack_chunk", lambda *a, **k: attacked.append(k["seed"]) or real(*a, **k))
    resumed = evaluate(ckpts["dense"], tmp_path / "resumed.json", *argv)
    assert attacked == [1234 + 2]  # only the last chunk was left, with its own seed
    assert resumed["resumed_chunks"] == 2 and resumed["n_chunks"] == 3
    for key in ("clean_accuracy", "robust_accuracy", "robust_accuracy_after", "n_ex", "warnings"):
        assert resumed[key] == whole[key], key
    for c in range(3):
        a = json.load(open(aa.chunk_path(whole["chunks_dir"], c)))
        b = json.load(open(aa.chunk_path(resumed["chunks_dir"], c)))
        assert (a["clean"], a["robust"], a["after"]) == (b["clean"], b["robust"], b["after"])


def test_other_settings_get_their_own_chunks(ckpts, tmp_path):
    argv = ("--n-ex", 8, "--chunk-size", 4, "--version", "custom", "--attacks", "apgd-ce")
    first = evaluate(ckpts["dense"], tmp_path / "aa.json", *argv, "--epsilon", 1)
    second = evaluate(ckpts["dense"], tmp_path / "aa.json", *argv, "--epsilon", 4)
    assert first["chunks_dir"] != second["chunks_dir"] and second["resumed_chunks"] == 0
    again = evaluate(ckpts["dense"], tmp_path / "aa.json", *argv, "--epsilon", 1)
    assert again["resumed_chunks"] == 2 and again["robust_accuracy"] == first["robust_accuracy"]


@pytest.mark.parametrize("name,flags", [
    ("moe", []),                                                   # everything from the checkpoint
    ("moe_ref", ["--arch", "resnet18_cifar_moe", "--ratio", RATIO, "--n-expert", 2]),
    ("dense_ref", ["--ratio", RATIO]),                             # the reference could not load dense ones
])
def test_moe_and_reference_checkpoints(ckpts, tmp_path, name, flags):
    report = evaluate(ckpts[name], tmp_path / "aa.json", *flags, "--n-ex", 16, "--epsilon", 8,
                      "--version", "custom", "--attacks", "apgd-ce", "apgd-t")
    ckpt = torch.load(ckpts[name], weights_only=True)
    spec = aa.resolve_spec(ckpt, name, **({"ratio": RATIO, "n_expert": 2 if "moe" in name else None,
                                          "dataset": "Digits"} if "ref" in name else {}))
    model = aa.build_from_checkpoint(ckpt, name, spec, "cpu")
    x, y = digits_test()
    with torch.no_grad():
        clean = 100.0 * (model(x[:16]).argmax(1) == y[:16]).float().mean().item()
    assert report["n_expert"] == (2 if "moe" in name else None)
    assert report["clean_accuracy"] == pytest.approx(clean) and clean > 0
    assert report["robust_accuracy"] <= report["robust_accuracy_after"]["apgd-ce"] <= clean


def moderate_router_logits(model, x):
    """Set the 2-expert router's output layer so that on `x` the logits are (g/2, -g/2), the gap g centred with
    standard deviation 1: the routing is then neither saturated nor tied and both experts are chosen, whatever the
    few training steps of the fixture produced (on one machine they left logits of +-12, a gate gradient of 1e-10
    and a red test). Only the gap between the two rows of the layer is kept, so no common part remains."""
    fc = model.router.fc
    with torch.no_grad():
        raw = model.route(x) - fc.bias  # (B, 2): W f, the part the weight makes
        scale = 1.0 / (raw[:, 0] - raw[:, 1]).std()
        half = scale * (fc.weight[0] - fc.weight[1]) / 2
        fc.weight.copy_(torch.stack([half, -half]))
        shift = scale * (raw[:, 0] - raw[:, 1]).mean() / 2
        fc.bias.copy_(torch.stack([-shift, shift]))
        logits = model.route(x)
    gap = logits[:, 0] - logits[:, 1]
    assert torch.allclose(logits[:, 0], -logits[:, 1], atol=1e-6)
    assert abs(gap.mean()) < 1e-5 and gap.std() == pytest.approx(1.0, rel=1e-3)
    # B points of mean 0 and standard deviation 1 lie within (B - 1) / sqrt(B) of 0: |logit| <= 0.75 for B = 4
    assert logits.abs().max() <= (len(x) - 1) / len(x) ** 0.5 / 2 + 1e-5 and (gap > 0).any() and (gap < 0).any()


def test_moe_gradients_reach_the_input_through_the_routing(ckpts):
    """What AutoAttack differentiates: the MoE with its router inside, frozen weights, input gradient."""
    ckpt = torch.load(ckpts["moe"], weights_only=True)
    model = aa.build_from_checkpoint(ckpt, "moe", aa.resolve_spec(ckpt, "moe"), "cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = digits_test()[0][:4].clone().requires_grad_(True)
    moderate_router_logits(model, x.detach())
    grad, = torch.autograd.grad(model(x).logsumexp(1).sum(), x)
    assert grad.abs().sum() > 0
    assert torch.equal(model(x), model(x))  # deterministic
    # The same function with the routing fixed at the clean choice has another input gradient: the difference is
    # what reaches the input through the router (the straight-through gate).
    with torch.no_grad():
        clean_expert = model.route(x).argmax(1)
    fixed = model(x, expert=clean_expert)
    assert torch.allclose(fixed, model(x), atol=1e-6)
    grad_fixed, = torch.autograd.grad(fixed.logsumexp(1).sum(), x)
    assert grad_fixed.abs().sum() > 0
    assert (grad - grad_fixed).abs().max() > 1e-3 * grad.abs().max()


def test_warnings_reach_the_json(ckpts, tmp_path):
    """A constant-logit model (zeroed classifier): AutoAttack's zero-gradient warning ends up in the JSON."""
    ckpt = torch.load(ckpts["dense"], weights_only=True)
    x, y = digits_test()
    ckpt["state_dict"]["linear.weight"].zero_()
    ckpt["state_dict"]["linear.bias"].zero_()
    ckpt["state_dict"]["linear.bias"][int(y[0])] = 1.0  # at least one point is classified correctly
    path = tmp_path / "constant.pth.tar"
    torch.save(ckpt, path)
    report = evaluate(path, tmp_path / "aa.json", "--n-ex", 8, "--version", "custom", "--attacks", "apgd-t")
    on_disk = json.loads((tmp_path / "aa.json").read_text())
    assert any("zero gradient" in w for w in on_disk["warnings"]), on_disk["warnings"]
    assert report["robust_accuracy"] == report["clean_accuracy"] > 0  # nothing to follow: nothing flips


class _Noisy(torch.nn.Module):
    def __init__(self, softmax=False):
        super().__init__()
        self.linear, self.softmax = torch.nn.Linear(3 * 32 * 32, 10), softmax

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        return logits.softmax(1) if self.softmax else logits + torch.randn_like(logits)


@pytest.mark.parametrize("softmax,expected", [(False, "randomized defense"), (True, "probability distribution")])
def test_library_checks_are_captured(softmax, expected):
    x, y = digits_test()
    settings = aa.AttackSettings(aa.load_library(), eps=1 / 255, version="custom", attacks=("apgd-ce",), batch_size=4,
                                 attack_params=CHEAP)
    res = aa.attack_chunk(aa.prepare_model(_Noisy(softmax)), x[:4], y[:4], settings, seed=0)
    assert any(expected in w for w in res.warnings), res.warnings


def test_resolve_spec_defaults_and_contradictions():
    ours_ckpt = {"arch": "resnet18_cifar_moe", "ratio": 0.5, "n_expert": 2, "dataset": "Digits", "normalize": True,
                 "routing": "global", "num_classes": 10}
    spec = aa.resolve_spec(ours_ckpt, "c")
    assert (spec.arch, spec.ratio, spec.n_expert, spec.normalize, spec.dataset) == \
        ("resnet18_cifar_moe", 0.5, 2, True, "Digits")
    assert aa.resolve_spec(ours_ckpt, "c", ratio=0.5, n_expert=2, normalize=True) == spec
    for bad in ({"arch": "vgg16_bn_moe"}, {"ratio": 0.25}, {"n_expert": 3}, {"normalize": False},
                {"dataset": "CIFAR100"}):
        with pytest.raises(UsageError):
            aa.resolve_spec(ours_ckpt, "c", **bad)
    ref = {"arch": "resnet18_cifar_moe", "epoch": 3}
    with pytest.raises(UsageError, match="--ratio"):
        aa.resolve_spec(ref, "c")
    with pytest.raises(UsageError, match="--n-expert"):
        aa.resolve_spec(ref, "c", ratio=0.5)
    spec = aa.resolve_spec(ref, "c", ratio=0.5, n_expert=4)
    assert (spec.n_expert, spec.dataset, spec.normalize, spec.routing) == (4, "CIFAR10", False, "global")
    with pytest.raises(UsageError, match="dense"):
        aa.resolve_spec({"arch": "resnet18_cifar_ori"}, "c", ratio=0.5, n_expert=2)


def test_chunks_cover_every_point_once_and_split_across_ranks():
    ranges = aa.chunk_ranges(10, 4)
    assert ranges == [(0, 4), (4, 8), (8, 10)]
    mine = [aa.chunks_for_rank(len(ranges), r, 2) for r in range(2)]
    assert sorted(mine[0] + mine[1]) == [0, 1, 2] and not set(mine[0]) & set(mine[1])


@pytest.mark.parametrize("argv", [
    ["--n-ex", 100000],
    ["--ratio", 0.125],
    ["--version", "standard", "--attacks", "apgd-ce"],
    ["--version", "custom"],
    ["--version", "custom", "--attacks", "pgd"],
])
def test_bad_flags_are_usage_errors_before_anything_is_written(ckpts, tmp_path, argv):
    with pytest.raises(UsageError):
        evaluate(ckpts["dense"], tmp_path / "aa.json", *argv)
    assert not list(tmp_path.iterdir())


def test_bad_input_exits_2_with_one_line(ckpts, tmp_path):
    """Bad path, wrong arch, mismatched --n-expert (recorded, and only detectable when loading): exit 2."""
    cases = [  # (flags, what the message must name)
        (["--source-net", tmp_path / "missing.pth.tar"], "no such file"),
        (["--source-net", ckpts["dense"], "--arch", "vgg16_bn_ori"], "--arch"),
        (["--source-net", ckpts["moe"], "--n-expert", 3], "--n-expert"),
        (["--source-net", ckpts["moe_ref"], "--ratio", RATIO, "--n-expert", 3], "--n-expert"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for i, (argv, named) in enumerate(cases):
        out = tmp_path / f"out{i}.json"
        cmd = [sys.executable, os.path.join(ROOT, "auto_attack_eval.py"), *map(str, argv), "--out", str(out),
               "--dataset", "Digits", "--device", "cpu", "--data-dir", "unused"]
        procs.append((argv, named, out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                         text=True, env=env, cwd=ROOT)))
    for argv, named, out, proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (argv, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (argv, stderr)
        assert not out.exists() and not os.path.exists(f"{out}.chunks"), argv
