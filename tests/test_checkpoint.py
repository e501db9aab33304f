"""Checkpoints: atomic saves, weights_only loads with one-line errors, state-dict extraction, strict loading,
and RNG states that survive a save/load round trip."""
import argparse
import os
import pathlib
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

import models
from utils import checkpoint as ck
from utils.checkpoint import (args_to_dict, capture_rng_state, check_recorded, extract_state_dict, load_checkpoint,
                              load_model_weights, restore_rng_state, save_checkpoint)
from utils.errors import UsageError
from conftest import seeded


class Foreign:
    """A custom class: unpickling it needs arbitrary code, so weights_only must refuse it."""


class TinyNet(nn.Module):
    def __init__(self, width=4, n_expert=None):
        super().__init__()
        self.spec = models.ModelSpec("tiny_moe" if n_expert else "tiny_ori", n_expert=n_expert)
        self.conv = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 2)


def files_in(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir())


# ------------------------------------------------------------------------------------------------ save

def test_save_then_load_round_trip(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pth.tar"  # missing folders are created
    state = {"epoch": 3, "arch": "resnet18_cifar_ori", "state_dict": TinyNet().state_dict(), "best_acc": 51.5}
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["best_acc"] == 51.5
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state["state_dict"].items())
    assert files_in(path.parent) == ["checkpoint.pth.tar"]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_during_save_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "checkpoint.pth.tar"
    save_checkpoint({"epoch": 1, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_save(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        f.truncate(f.tell() // 2)  # part of the new file is on disk when the crash comes
        raise exc

    monkeypatch.setattr(torch, "save", half_save)
    expected = UsageError if isinstance(exc, RuntimeError) else type(exc)  # a failed write: one line naming the file
    with pytest.raises(expected):
        save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert files_in(tmp_path) == ["checkpoint.pth.tar"]


def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    save_checkpoint({"epoch": 1}, tmp_path / "c.pth.tar")
    assert events[:2] == ["fsync", "replace"]  # file data first, then the rename (then the folder)
    assert load_checkpoint(tmp_path / "c.pth.tar") == {"epoch": 1}


def test_saved_file_has_the_usual_permissions_not_the_temp_file_0600(tmp_path):
    mask = os.umask(0o022)
    try:
        save_checkpoint({"epoch": 1}, tmp_path / "c.pth.tar")
    finally:
        os.umask(mask)
    assert (tmp_path / "c.pth.tar").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------------ load errors

def _truncated(path):
    torch.save({"state_dict": TinyNet().state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "garbage text": lambda p: p.write_text("this is not a checkpoint\n" * 20),
    "random bytes": lambda p: p.write_bytes(np.random.default_rng(seeded(0)).bytes(4096)),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": _truncated,
    "plain pickle": lambda p: p.write_bytes(pickle.dumps({"a": 1})),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_corrupt_files_are_usage_errors_naming_the_path(tmp_path, kind):
    path = tmp_path / "bad.pth.tar"
    BAD_FILES[kind](path)
    with pytest.raises(UsageError, match="corrupt") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_foreign_objects_are_refused_and_named(tmp_path):
    path = tmp_path / "foreign.pth.tar"
    torch.save({"state_dict": TinyNet().state_dict(), "extra": Foreign()}, path)
    with pytest.raises(UsageError, match="arbitrary code") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "Foreign" in str(e.value)
    torch.save(argparse.Namespace(lr=0.1), path)  # the classic: args saved as a Namespace
    with pytest.raises(UsageError, match="Namespace"):
        load_checkpoint(path)


def test_missing_directory_and_non_dict_files(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pth.tar")
    with pytest.raises(UsageError, match="directory"):
        load_checkpoint(tmp_path)
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(UsageError, match="list, not a checkpoint dict"):
        load_checkpoint(tmp_path / "list.pth")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "c.pth.tar"
    save_checkpoint({"epoch": 1}, path)
    path.chmod(0)
    with pytest.raises(UsageError, match="not readable"):
        load_checkpoint(path)


def test_reference_style_numpy_values_load(tmp_path):
    """A best_acc computed with numpy is plain data, not a reason to refuse a checkpoint."""
    path = tmp_path / "ref.pth.tar"
    torch.save({"epoch": 5, "best_acc": np.float64(47.5), "sa_record": np.float32(80.0), "arr": np.arange(3)}, path)
    if not hasattr(torch.serialization, "add_safe_globals"):  # torch < 2.4 cannot allow them: say so, plainly
        with pytest.raises(UsageError, match=r"holds numpy values .* needs torch 2\.4 or newer"):
            load_checkpoint(path)
        return
    ckpt = load_checkpoint(path)
    assert float(ckpt["best_acc"]) == 47.5 and float(ckpt["sa_record"]) == 80.0 and list(ckpt["arr"]) == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ state dicts

def test_extract_state_dict_accepts_every_layout_and_strips_wrappers():
    sd = TinyNet().state_dict()
    wrapped = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    wrapped2 = {f"_orig_mod.module.{k}": v for k, v in sd.items()}
    for ckpt in (sd, {"state_dict": sd, "arch": "x", "epoch": 1}, {"state_dict": wrapped}, wrapped2,
                 {"model": {f"module.{k}": v for k, v in sd.items()}}):
        out = extract_state_dict(ckpt)
        assert list(out) == list(sd) and all(out[k] is sd[k] for k in sd)


@pytest.mark.parametrize("ckpt", [{"epoch": 1, "arch": "a"}, {"state_dict": {"w": 1.0}}, {}, {"state_dict": {}}])
def test_extract_state_dict_without_weights_is_a_usage_error(ckpt):
    with pytest.raises(UsageError, match="state_dict"):
        extract_state_dict(ckpt, "c.pth")


def test_load_model_weights_strictly_and_exactly():
    src, dst = TinyNet(), TinyNet()
    ckpt = {"arch": "tiny_ori", "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    load_model_weights(dst, ckpt, arch="tiny_ori", ratio=1.0, source="c.pth")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_load_model_weights_explains_mismatches():
    model = TinyNet(width=4, n_expert=2)
    sd = TinyNet(width=8).state_dict()
    with pytest.raises(UsageError, match="c.pth was trained for resnet18_cifar_moe; --arch says vgg16_bn_moe"):
        load_model_weights(model, {"arch": "resnet18_cifar_moe", "state_dict": sd}, arch="vgg16_bn_moe",
                           source="c.pth")
    with pytest.raises(UsageError, match=r"shapes differ for conv.weight: checkpoint \(8, 3, 3, 3\) vs model "
                                         r"\(4, 3, 3, 3\): wrong --ratio or --n-expert\?"):
        load_model_weights(model, {"state_dict": sd}, source="c.pth")
    with pytest.raises(UsageError, match="--ratio 0.5; --ratio says 0.25"):
        load_model_weights(model, {"ratio": 0.5, "state_dict": sd}, ratio=0.25)
    with pytest.raises(UsageError, match="--n-expert 4; --n-expert says 2"):
        load_model_weights(model, {"n_expert": 4, "state_dict": sd})
    with pytest.raises(UsageError, match="^checkpoint c.pth was trained with --no-normalize; this run asks for "
                                         "--normalize$"):
        check_recorded({"normalize": False}, {"normalize": True}, "c.pth")
    partial = {k: v for k, v in TinyNet(width=4).state_dict().items() if not k.startswith("fc.")}
    with pytest.raises(UsageError, match="2 missing, e.g. fc.bias, fc.weight"):
        load_model_weights(model, {"state_dict": partial})
    extra = {**TinyNet(width=4).state_dict(), "router.fc.weight": torch.zeros(2, 2)}
    with pytest.raises(UsageError, match="1 unexpected, e.g. router.fc.weight"):
        load_model_weights(model, {"state_dict": extra})


def test_load_model_weights_on_registry_models():
    two = models.build_model("resnet18_cifar_moe", num_classes=10, ratio=0.125, n_expert=2)
    three = models.build_model("resnet18_cifar_moe", num_classes=10, ratio=0.125, n_expert=3)
    dense = models.build_model("resnet18_cifar_ori", num_classes=10, ratio=0.125)
    ref_style = {"arch": "resnet18_cifar_moe", "epoch": 1, "state_dict": two.state_dict()}  # records no n_expert
    with pytest.raises(UsageError, match="wrong --ratio or --n-expert"):
        load_model_weights(three, ref_style, arch="resnet18_cifar_moe")
    with pytest.raises(UsageError, match="missing|unexpected"):
        load_model_weights(dense, {"state_dict": two.state_dict()})
    load_model_weights(models.build_model("resnet18_cifar_moe", num_classes=10, ratio=0.125, n_expert=2),
                       ref_style, arch="resnet18_cifar_moe")


# ------------------------------------------------------------------------------------------------ args and RNG

def test_args_and_rng_state_are_weights_only_loadable(tmp_path):
    args = argparse.Namespace(arch="a", lr=0.1, n_expert=None, attacks=("apgd-ce",), out=pathlib.Path("/x/y"),
                              amp=True, epochs=3)
    plain = args_to_dict(args)
    assert plain == {"amp": True, "arch": "a", "attacks": ["apgd-ce"], "epochs": 3, "lr": 0.1, "n_expert": None,
                     "out": "/x/y"}
    path = tmp_path / "c.pth.tar"
    save_checkpoint({"args": plain, "rng": capture_rng_state()}, path)
    loaded = torch.load(path, weights_only=True)  # plain torch, no allow-list
    assert loaded["args"] == plain


def _draws():
    return (torch.rand(3).tolist(), torch.randint(0, 10**6, (2,)).tolist(), np.random.rand(3).tolist(),
            np.random.randn(2).tolist(), random.random(), random.gauss(0, 1))


def test_rng_state_round_trips_through_save_and_load(tmp_path):
    torch.manual_seed(seeded(7))
    np.random.seed(seeded(7))
    random.seed(seeded(7))
    np.random.randn(1)  # leave a cached gaussian in numpy's state, and one in Python's
    random.gauss(0, 1)
    path = tmp_path / "c.pth.tar"
    save_checkpoint({"rng": capture_rng_state()}, path)
    expected = _draws()
    torch.manual_seed(seeded(99))
    np.random.seed(seeded(99))
    random.seed(seeded(99))
    assert _draws() != expected  # the test can tell the states apart
    restore_rng_state(load_checkpoint(path)["rng"])
    assert _draws() == expected


def test_capture_does_not_initialise_cuda():
    state = capture_rng_state()
    assert ("cuda" in state) == (torch.cuda.is_available() and torch.cuda.is_initialized())
    assert set(state) >= {"torch", "numpy", "python"}


def test_module_keeps_no_import_time_tensors():
    assert not any(torch.is_tensor(v) for v in vars(ck).values())
