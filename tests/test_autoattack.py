"""auto_attack_eval.py: the official AutoAttack on dense and MoE checkpoints, resumable, warnings surfaced,
damaged or edited chunks refused, stop signals answered with one line.

Tiny ResNet-18s (ratio 1/16) trained for a few steps on Digits, `--version custom` with cheap AutoAttack
settings on 8-16 test images, so the file runs in seconds on two CPU cores.
"""
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import models
from utils import autoattack_eval as aa
from utils.data import build_datasets
from utils.cli import run_main
from utils.errors import UsageError
from utils.lock import hold

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import auto_attack_eval  # noqa: E402  (the entry script)
from args import parse_autoattack_args  # noqa: E402  (its parser and checks are the ones users get)
from conftest import TINY_RATIO as RATIO, ours, seeded, train_tiny  # noqa: E402

# AutoAttack's own settings for the cheap runs (the authors' README customises attacks the same way).
CHEAP = {"apgd": {"n_restarts": 1, "n_iter": 10}, "apgd_targeted": {"n_iter": 10, "n_target_classes": 2}}


def parse(*argv):
    return parse_autoattack_args([str(a) for a in argv])


def evaluate(ckpt, out, *extra, attack_params=CHEAP):
    args = parse("--source-net", ckpt, "--out", out, "--dataset", "Digits", "--data-dir", "unused",
                 "--device", "cpu", "--num-workers", 0, *extra)
    return aa.evaluate_checkpoint(args, attack_params=attack_params, progress=False)


def rebuild(path, *flags):
    """The model `auto_attack_eval.py --source-net path flags` attacks, and its spec."""
    args = parse("--source-net", path, *flags)
    return aa.model_from_checkpoint(torch.load(path, weights_only=True), str(path), args, "cpu")


def cli(argv, capsys, monkeypatch):
    """(exit code, stderr) of `python auto_attack_eval.py argv`, run in this process with cheap attack settings."""
    monkeypatch.setattr(auto_attack_eval, "evaluate_checkpoint",
                        functools.partial(aa.evaluate_checkpoint, attack_params=CHEAP, progress=False))
    capsys.readouterr()
    try:
        run_main(auto_attack_eval.main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def before_chunk(monkeypatch, n, action):
    """Run `action()` just before the `n`-th chunk attacked (0-based) is attacked: the ones before it are on disk."""
    real, calls = aa.attack_chunk, []

    def attack(*a, **k):
        calls.append(1)
        if len(calls) == n + 1:
            action()
        return real(*a, **k)
    monkeypatch.setattr(aa, "attack_chunk", attack)
    return real


def digits_test():
    _, test_ds = build_datasets("Digits", "unused")
    return test_ds.images, test_ds.labels


def reference(model, opt, arch):
    """A checkpoint in the reference's layout: no ratio, experts, dataset; MoE adds `router`."""
    ckpt = {"epoch": 1, "arch": arch, "state_dict": model.state_dict(), "best_acc": 0.0, "sa_record": 0.0,
            "optimizer": opt.state_dict()}
    if models.is_moe(arch):
        ckpt["router"] = model.router.state_dict()
        ckpt["router_optimizer"] = opt.state_dict()
    return ckpt


def classify_first_point(model):
    """Raise the classifier's bias for the first test point's label until its logit leads by 1: the model then
    classifies that point correctly, so its clean accuracy on the first test points is above 0 whatever the training
    steps produced (12 steps left the MoE at 2 to 4 of 16 points here, close enough to none; a clean accuracy of 0
    would make every robust count 0 and the tests below vacuous). Only that bias moves."""
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
    classify_first_point(dense)
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
    torch.manual_seed(seeded(0))
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

@pytest.mark.slow
def test_autoattack_counts_fall_and_the_report_is_written(ckpts, tmp_path):
    """Clean accuracy is the model's own; robust <= after APGD-CE <= clean and a PGD baseline <= clean (what holds
    whatever the fixture's training produced: not `robust <= PGD` nor `robust < clean`, which are what one machine's
    attack happened to give)."""
    n, eps = 16, 4 / 255
    report = evaluate(ckpts["dense"], tmp_path / "aa.json", "--n-ex", n, "--epsilon", 4, "--version", "custom",
                      "--attacks", "apgd-ce", "apgd-t",
                      attack_params={"apgd": {"n_restarts": 1}, "apgd_targeted": {"n_iter": 20, "n_target_classes": 3}})
    model, _ = rebuild(ckpts["dense"])
    x, y = digits_test()
    x, y = x[:n], y[:n]
    with torch.no_grad():
        clean = 100.0 * (model(x).argmax(1) == y).float().mean().item()
    pgd = pgd_accuracy(model, x, y, eps)
    assert report["clean_accuracy"] == pytest.approx(clean)
    assert 0 < clean  # the first point is classified correctly (classify_first_point)
    assert report["robust_accuracy"] <= clean and pgd <= clean
    after = report["robust_accuracy_after"]
    assert list(after) == ["apgd-ce", "apgd-t"]
    assert clean >= after["apgd-ce"] >= after["apgd-t"] == report["robust_accuracy"]
    on_disk = json.loads((tmp_path / "aa.json").read_text())
    for key in ("clean_accuracy", "robust_accuracy", "robust_accuracy_after", "n_ex", "eps", "norm", "version",
                "seconds", "checkpoint", "package", "warnings", "device", "attacks"):
        assert key in on_disk, key
    assert on_disk["n_ex"] == n and on_disk["eps"] == pytest.approx(eps) and on_disk["norm"] == "Linf"
    assert on_disk["package"]["name"] == "pyautoattack"
    assert on_disk["robust_accuracy"] == report["robust_accuracy"]


def test_flags_are_the_librarys_own():
    """Robust flags are the library's returned labels; the count after the first attack is what that attack
    alone leaves (same seed, same batches); clean flags are the model's predictions. The counts only fall, image by
    image (not `clean > after APGD-CE > after APGD-T`: on one machine APGD-T flipped none of what APGD-CE left)."""
    model, _ = train_tiny("resnet18_cifar_ori", steps=10, seed=1)
    aa.prepare_model(model)
    x, y = digits_test()
    x, y = x[:12], y[:12]
    both = aa.AttackSettings(eps=2 / 255, version="custom", attacks=("apgd-ce", "apgd-t"), batch_size=5,
                             attack_params=CHEAP)
    res = aa.attack_chunk(model, x, y, both, seed=3)
    assert res["attacks"] == ["apgd-ce", "apgd-t"]
    _, y_adv = aa.make_adversary(model, both, 3).run_standard_evaluation(x, y, batch_size=5)
    assert res["robust"] == "".join("1" if r else "0" for r in (y_adv == y).tolist())
    with torch.no_grad():
        assert res["clean"] == "".join("1" if c else "0" for c in (model(x).argmax(1) == y).tolist())
    first = aa.attack_chunk(model, x, y, aa.AttackSettings(eps=2 / 255, version="custom", attacks=("apgd-ce",),
                                                           batch_size=5, attack_params=CHEAP), seed=3)
    assert res["after"] == {"apgd-ce": first["robust"].count("1"), "apgd-t": res["robust"].count("1")}
    assert res["clean"].count("1") >= res["after"]["apgd-ce"] >= res["after"]["apgd-t"]
    # image by image: robust after both => robust after APGD-CE alone => classified correctly
    for clean, ce, both_ in zip(res["clean"], first["robust"], res["robust"]):
        assert clean >= ce >= both_


class _Linear(torch.nn.Module):
    """Logits of a linear model whose class 0 leads class 1 by `margin(x) = s * sum(v * (x - 0.5))` (v: +-1 per
    pixel, s * 3 * 32 * 32 = 127.5), classes 2-9 far below. An L-inf perturbation of size eps lowers the margin by at
    most eps * s * 3072 = 127.5 eps, and APGD's sign steps of size 2 eps reach that worst case at once (the sign of
    the gradient of either loss is -v everywhere): whether a point is flipped is known."""

    def __init__(self, v):
        super().__init__()
        self.v, self.s = v.flatten(), 127.5 / v.numel()

    def forward(self, x):
        margin = self.s * ((x.flatten(1) - 0.5) * self.v).sum(1)
        dead = torch.full((len(x), 8), -100.0)
        return torch.cat([margin[:, None] / 2, -margin[:, None] / 2, dead], 1)


def test_per_attack_counts_on_a_linear_model_with_known_margins():
    """At eps 2/255 the worst case lowers the margin by 1.0: margin -1 is clean-wrong, 0.3 is flipped by APGD-CE
    (its first step), 3 is robust to any perturbation. So the flags and counts are known exactly."""
    eps = 2 / 255
    v = torch.randint(0, 2, (3, 32, 32), generator=torch.Generator().manual_seed(seeded(7))).float() * 2 - 1
    model = _Linear(v)
    margins = [-1.0, 0.3, 3.0, 0.3, 3.0, -1.0, 0.3, 3.0]
    x = torch.stack([0.5 + m / 127.5 * v for m in margins])
    y = torch.zeros(len(x), dtype=torch.long)
    settings = aa.AttackSettings(eps=eps, version="custom", attacks=("apgd-ce", "apgd-t"), batch_size=3,
                                 attack_params=CHEAP)
    res = aa.attack_chunk(aa.prepare_model(model), x, y, settings, seed=seeded(3))
    assert res["clean"] == "".join("0" if m < 0 else "1" for m in margins)
    assert res["robust"] == "".join("1" if m > 1.0 else "0" for m in margins)
    assert res["after"] == {"apgd-ce": 3, "apgd-t": 3}


class _Margins(torch.nn.Module):
    """Class 0 against class 1 on the sum of 16 pixels (classes 2-9 never win): logit_1 - logit_0 = sum(x) - 8. An
    L-inf perturbation of eps moves the sum by 16 eps at most, so a point of label 0 and margin m = 8 - sum(x) > 0
    is flipped exactly when m < 16 eps: which points any attack flips is known."""

    def forward(self, x):
        s = x.flatten(1).sum(1)  # (B,)
        return torch.stack([torch.zeros_like(s), s - 8, *[torch.full_like(s, -1e3)] * 8], dim=1)  # (B, 10)


def test_per_attack_counts_do_not_depend_on_the_librarys_log_wording(monkeypatch):
    """The library's log reworded (every message reversed): the counts after each attack are still the known
    ones. Pixels 0.49 (margin 0.16 < 16 eps = 0.8): flipped by the first attack; 0.3 (margin 3.2): robust to any;
    0.55: wrong already."""
    values = [0.49, 0.3, 0.49, 0.55, 0.3, 0.3]
    x = torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    y = torch.zeros(len(values), dtype=torch.long)
    logger = logging.getLogger("auto-attack")
    for level in ("debug", "info", "warning"):
        monkeypatch.setattr(logger, level, functools.partial(
            lambda real, msg, *a, **k: real(str(msg)[::-1], *a, **k), getattr(logger, level)))
    settings = aa.AttackSettings(eps=0.05, version="custom", attacks=("apgd-ce", "apgd-t"), batch_size=4,
                                 attack_params=CHEAP)
    res = aa.attack_chunk(aa.prepare_model(_Margins()), x, y, settings, seed=0)
    assert (res["clean"], res["robust"]) == ("111011", "010011")
    assert res["after"] == {"apgd-ce": 3, "apgd-t": 3}


class _Killed(Exception):
    pass


def test_killed_and_resumed_equals_uninterrupted(ckpts, tmp_path, monkeypatch):
    argv = ("--n-ex", 12, "--chunk-size", 4, "--epsilon", 4, "--version", "custom", "--attacks", "apgd-ce")
    whole = evaluate(ckpts["dense"], tmp_path / "whole.json", *argv)

    def kill():
        raise _Killed

    real = before_chunk(monkeypatch, 2, kill)  # chunks 0 and 1 done
    with pytest.raises(_Killed):
        evaluate(ckpts["dense"], tmp_path / "resumed.json", *argv)
    assert not (tmp_path / "resumed.json").exists()
    attacked = []
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


def test_chunks_of_the_retired_format_1_are_refused(tmp_path):
    """Chunks of format 1 (per-point flags after each attack) are no longer read: named, to be attacked again."""
    rec = {"format": "advmoe-autoattack-chunk/1", "fingerprint": "k", "index": 0, "start": 0, "stop": 4, "seed": 1,
           "attacks": ["apgd-ce", "apgd-t"], "clean": "1101", "robust": "0100",
           "after": {"apgd-ce": "1100", "apgd-t": "0100"}, "warnings": [], "seconds": 1.0}
    (tmp_path / "chunk_00000.json").write_text(json.dumps(rec))
    with pytest.raises(UsageError, match="is not an AutoAttack chunk of this tool: delete it"):
        aa.load_chunk(tmp_path, 0, 0, 4, "k")


def _edit(rec):
    rec["robust"] = "1" * len(rec["robust"])  # issue 19's hand edit: every image robust, whatever its clean flag


def _move(rec):
    """One robust flag moved to a clean-wrong image: every count stays the same."""
    robust = list(rec["robust"])
    robust[robust.index("1")], robust[rec["clean"].index("0")] = "0", "1"
    rec["robust"] = "".join(robust)


@pytest.mark.parametrize("damage,named", [
    (_edit, "robust that is not clean-correct"),
    (_move, "robust that is not clean-correct"),
    (lambda rec: rec["after"].update({"apgd-ce": rec["after"]["apgd-ce"] + 1}), "do not fall"),
    (lambda rec: rec.update(clean=rec["clean"][:-1]), "flags"),
    (lambda rec: rec.update(fingerprint="0" * 16), "settings"),
    ("truncated", "damaged"),
])
def test_damaged_or_edited_chunks_are_refused(ckpts, tmp_path, capsys, monkeypatch, damage, named):
    """A chunk that contradicts itself or the run is never summed (robust > clean was reported): exit 2 naming
    the file, nothing attacked or written."""
    argv = ["--source-net", ckpts["dense"], "--out", tmp_path / "aa.json", "--dataset", "Digits", "--data-dir", "x",
            "--device", "cpu", "--num-workers", 0, "--n-ex", 12, "--chunk-size", 4, "--epsilon", 1,
            "--version", "custom", "--attacks", "apgd-ce"]
    code, err = cli(argv, capsys, monkeypatch)
    assert code == 0, err
    report = json.loads((tmp_path / "aa.json").read_text())
    # Chunk 0 rewritten with flags of our own, consistent (so accepted as they are) and holding what the damages
    # need whatever the attack produced: a clean-wrong image and a robust one.
    path = aa.chunk_path(report["chunks_dir"], 0)
    rec = json.loads(open(path).read())
    rec.update(clean="1101", robust="0100", after={"apgd-ce": 1})
    with open(path, "w") as f:
        f.write(json.dumps(rec))
    monkeypatch.setattr(aa, "attack_chunk", lambda *a, **k: pytest.fail("a chunk was attacked"))
    code, err = cli(argv, capsys, monkeypatch)
    assert code == 0, err
    text = open(path).read()
    if damage == "truncated":
        text = text[:len(text) // 2]
    else:
        rec = json.loads(text)
        damage(rec)
        text = json.dumps(rec)
    with open(path, "w") as f:
        f.write(text)
    files = {p: open(p, "rb").read() for p in (path, tmp_path / "aa.json")}
    code, err = cli(argv, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert path in lines[0] and named in lines[0], lines[0]
    assert {p: open(p, "rb").read() for p in files} == files


def _signal(signum):
    def send():
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler runs before this ends
    return send


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_says_where_and_the_same_command_resumes(ckpts, tmp_path, capsys, monkeypatch, signum):
    argv = ["--source-net", ckpts["dense"], "--out", tmp_path / "aa.json", "--dataset", "Digits", "--data-dir", "x",
            "--device", "cpu", "--num-workers", 0, "--n-ex", 12, "--chunk-size", 4, "--epsilon", 4,
            "--version", "custom", "--attacks", "apgd-ce"]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    real = before_chunk(monkeypatch, 1, _signal(signum))  # chunk 0 done
    code, err = cli(argv, capsys, monkeypatch)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back
    lines = err.strip().splitlines()
    assert code == 128 + signum and len(lines) == 1, (code, err)
    name = signal.Signals(signum).name
    assert f"stopped by {name} with 1 of 3 chunks finished in {tmp_path}" in lines[0], lines[0]
    assert "rerunning the same command resumes" in lines[0], lines[0]
    assert not (tmp_path / "aa.json").exists()
    monkeypatch.setattr(aa, "attack_chunk", real)
    code, err = cli(argv, capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((tmp_path / "aa.json").read_text())["resumed_chunks"] == 1


@pytest.mark.slow
def test_sigterm_while_attacking(ckpts, tmp_path):
    """A real SIGTERM from outside, in the middle of a chunk, to the process and its data-loading worker (as
    SLURM's scancel signals every process of a job): one line, exit 143, no half-written chunk."""
    out = tmp_path / "aa.json"
    cmd = [sys.executable, os.path.join(ROOT, "auto_attack_eval.py"), "--source-net", ckpts["dense"], "--out", out,
           "--dataset", "Digits", "--data-dir", "x", "--device", "cpu", "--num-workers", "1", "--n-ex", "8",
           "--chunk-size", "1", "--epsilon", "4", "--version", "custom", "--attacks", "apgd-ce", "--no-progress"]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("aa.json.chunks/*/chunk_00000.json")) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 143 and len(lines) == 1, (proc.returncode, stderr)
    assert lines[0].startswith("stopped by SIGTERM with ") and "rerunning the same command resumes" in lines[0]
    assert not out.exists() and not list(tmp_path.glob("aa.json.chunks/*/.tmp-*"))
    for path in tmp_path.glob("aa.json.chunks/*/chunk_*.json"):
        assert json.loads(path.read_text())["stop"] - json.loads(path.read_text())["start"] == 1


def test_other_settings_get_their_own_chunks(ckpts, tmp_path):
    argv = ("--n-ex", 8, "--chunk-size", 4, "--version", "custom", "--attacks", "apgd-ce")
    first = evaluate(ckpts["dense"], tmp_path / "aa.json", *argv, "--epsilon", 1)
    second = evaluate(ckpts["dense"], tmp_path / "aa.json", *argv, "--epsilon", 4)
    assert first["chunks_dir"] != second["chunks_dir"] and second["resumed_chunks"] == 0
    again = evaluate(ckpts["dense"], tmp_path / "aa.json", *argv, "--epsilon", 1)
    assert again["resumed_chunks"] == 2 and again["robust_accuracy"] == first["robust_accuracy"]


def test_a_second_writer_of_the_same_chunks_is_refused(ckpts, tmp_path):
    """One writer per chunks folder: while another process holds it, the same evaluation is refused with the
    holder named and its chunks untouched; once released, the same command resumes them."""
    argv = ("--n-ex", 4, "--chunk-size", 4, "--version", "custom", "--attacks", "apgd-ce", "--epsilon", 1)
    first = evaluate(ckpts["dense"], tmp_path / "aa.json", *argv)
    before = sorted(os.listdir(first["chunks_dir"]))
    with hold(first["chunks_dir"]):
        with pytest.raises(UsageError, match="in use by pid"):
            evaluate(ckpts["dense"], tmp_path / "aa.json", *argv)
    assert sorted(os.listdir(first["chunks_dir"])) == before
    assert evaluate(ckpts["dense"], tmp_path / "aa.json", *argv)["resumed_chunks"] == 1


@pytest.mark.parametrize("name,flags", [
    ("moe", []),                                                   # everything from the checkpoint
    ("moe_ref", ["--arch", "resnet18_cifar_moe", "--ratio", RATIO, "--n-expert", 2]),
    ("dense_ref", ["--ratio", RATIO]),                             # the reference could not load dense ones
])
def test_moe_and_reference_checkpoints(ckpts, tmp_path, name, flags):
    report = evaluate(ckpts[name], tmp_path / "aa.json", *flags, "--n-ex", 16, "--epsilon", 8,
                      "--version", "custom", "--attacks", "apgd-ce", "apgd-t")
    model, _ = rebuild(ckpts[name], *flags, "--dataset", "Digits")
    x, y = digits_test()
    with torch.no_grad():
        clean = 100.0 * (model(x[:16]).argmax(1) == y[:16]).float().mean().item()
    assert report["n_expert"] == (2 if "moe" in name else None)
    assert report["clean_accuracy"] == pytest.approx(clean) and clean > 0  # classify_first_point
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
    model, _ = rebuild(ckpts["moe"])
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
        # Noise enough for the library's randomised-defence check, too little to change a prediction (the
        # robust flags are checked against a second clean pass, which a truly random model would fail).
        return logits.softmax(1) if self.softmax else logits + 1e-3 * torch.randn_like(logits)


@pytest.mark.parametrize("softmax,expected", [(False, "randomized defense"), (True, "probability distribution")])
def test_library_checks_are_captured(softmax, expected):
    x, y = digits_test()
    settings = aa.AttackSettings(eps=1 / 255, version="custom", attacks=("apgd-ce",), batch_size=4, attack_params=CHEAP)
    res = aa.attack_chunk(aa.prepare_model(_Noisy(softmax)), x[:4], y[:4], settings, seed=0)
    assert any(expected in w for w in res["warnings"]), res["warnings"]


def test_model_spec_defaults_and_contradictions(ckpts):
    _, spec = rebuild(ckpts["moe"])
    assert (spec["arch"], spec["ratio"], spec["n_expert"], spec["normalize"], spec["dataset"]) == \
        ("resnet18_cifar_moe", RATIO, 2, False, "Digits")
    assert rebuild(ckpts["moe"], "--ratio", RATIO, "--n-expert", 2, "--no-normalize")[1] == spec

    def build(ckpt, *flags):
        return aa.model_from_checkpoint(ckpt, "c", parse("--source-net", "c", *flags), "cpu")
    ours_ckpt = {"arch": "resnet18_cifar_moe", "ratio": 0.5, "n_expert": 2, "dataset": "Digits", "normalize": True,
                 "routing": "global", "num_classes": 10}
    for bad, refusal in (  # the wording of every tool (utils.checkpoint.check_recorded)
            (["--arch", "vgg16_bn_moe"], "trained for resnet18_cifar_moe; --arch says vgg16_bn_moe"),
            (["--ratio", 0.25], "trained with --ratio 0.5; --ratio says 0.25"),
            (["--n-expert", 3], "trained with --n-expert 2; --n-expert says 3"),
            (["--no-normalize"], "trained with --normalize; this run asks for --no-normalize"),
            (["--dataset", "CIFAR100"], "trained with --dataset Digits; --dataset says CIFAR100"),
            (["--routing", "layer"], "trained with --routing global; --routing says layer")):
        with pytest.raises(UsageError, match=f"^checkpoint c was {re.escape(refusal)}$"):
            build(ours_ckpt, *bad)
    ref = {"arch": "resnet18_cifar_moe", "epoch": 3}
    with pytest.raises(UsageError, match="--ratio"):
        build(ref)
    with pytest.raises(UsageError, match="--n-expert"):
        build(ref, "--ratio", 0.5)
    _, spec = rebuild(ckpts["moe_ref"], "--ratio", RATIO, "--n-expert", 2)
    assert (spec["n_expert"], spec["dataset"], spec["normalize"], spec["routing"]) == (2, "CIFAR10", False, "global")
    with pytest.raises(UsageError, match="dense"):
        build({"arch": "resnet18_cifar_ori"}, "--ratio", 0.5, "--n-expert", 2)


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
    ["--chunk-size", 0],
    ["--epsilon", 300],
])
def test_bad_flags_are_usage_errors_before_anything_is_written(ckpts, tmp_path, argv):
    with pytest.raises(UsageError):
        evaluate(ckpts["dense"], tmp_path / "aa.json", *argv)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
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


def test_square_check_on_the_whole_evaluation():
    """Square beating the white-box attacks over all chunks is flagged, by the library's own check."""
    def chunk(index, after):
        return {"index": index, "attacks": ["apgd-ce", "square"], "clean": "1111110000", "robust": "1110000000",
                "after": after, "warnings": [], "seconds": 1.0}
    summary = aa.summarize([chunk(0, {"apgd-ce": 5, "square": 3}), chunk(1, {"apgd-ce": 5, "square": 3})])
    assert summary["robust_accuracy_after"] == {"apgd-ce": 50.0, "square": 30.0}
    assert summary["clean_accuracy"] == 60.0 and summary["robust_accuracy"] == 30.0
    assert [w for w in summary["warnings"] if "Square Attack" in w and w.endswith("(whole evaluation)")], summary
    quiet = aa.summarize([chunk(0, {"apgd-ce": 3, "square": 3})])
    assert not quiet["warnings"]
