"""utils/data.py: dataset facts, every dataset's layout on disk (tiny generated copies), the epoch sampler."""
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from utils import data
from utils.data import DATASETS, EpochSampler, LoaderConfig, build_datasets, build_loaders, dataset_info
from utils.errors import UsageError
from conftest import seeded

# Solid colours, one per class, far apart so that JPEG compression cannot blur one into another.
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]


def _colour_label(img):
    """Class whose colour is closest to the mean colour of a (3, H, W) image in [0, 1]."""
    mean = img.mean(dim=(1, 2)) * 255
    return int(torch.cdist(mean[None], torch.tensor(COLOURS, dtype=torch.float32))[0].argmin())


def _tree_state(root):
    """Every path under root with its size and mtime: equal before and after means nothing was touched."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st_ = os.stat(path)
            state[os.path.relpath(path, root)] = (st_.st_size, st_.st_mtime_ns)
    return state


# --------------------------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------------------------

def test_digits16_is_the_same_split_at_16x16_with_its_measured_statistics():
    from utils.data import _digits_tensors
    x16, y16, t16, ty16 = _digits_tensors(16)
    x32, y32, t32, ty32 = _digits_tensors(32)
    assert x16.shape[1:] == (3, 16, 16) and x32.shape[1:] == (3, 32, 32)
    assert torch.equal(y16, y32) and torch.equal(ty16, ty32) and len(t16) == 360
    for name, x in (("Digits16", x16), ("Digits", x32)):
        info = dataset_info(name)
        assert abs(x.mean().item() - info.mean[0]) < 1e-3 and abs(x.std().item() - info.std[0]) < 1e-3
    train, _ = build_datasets("Digits16", "unused")
    assert train.padding == 1 and build_datasets("Digits", "unused")[0].padding == 2  # shift: the same share


def test_dataset_info_table():
    expected = {"CIFAR10": (10, 32), "CIFAR100": (100, 32), "TinyImageNet": (200, 64), "ImageNet": (1000, 224),
                "Digits": (10, 32), "Digits16": (10, 16), "FashionMNIST": (10, 28), "FashionMNIST16": (10, 16)}
    assert set(DATASETS) == set(expected)
    for name, (classes, size) in expected.items():
        info = dataset_info(name)
        assert (info.name, info.num_classes, info.image_size) == (name, classes, size)
        assert len(info.mean) == len(info.std) == 3
        assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
    assert dataset_info("CIFAR10").mean == (0.4914, 0.4822, 0.4465)
    assert dataset_info("TinyImageNet").std == dataset_info("ImageNet").std == (0.229, 0.224, 0.225)


def test_unknown_dataset_is_a_usage_error():
    with pytest.raises(UsageError, match="CIFAR10"):
        dataset_info("cifar-10")
    with pytest.raises(UsageError):
        build_datasets("MNIST", "/nonexistent")


def test_digits_statistics_match_the_hard_coded_constants():
    train, _ = build_datasets("Digits", "unused")
    x = train.images
    info = dataset_info("Digits")
    assert x.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(info.std[0], abs=1e-3)


# --------------------------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------------------------

def test_digits_shapes_range_and_stratified_split():
    train, test = build_datasets("Digits", "unused")
    assert (len(train), len(test)) == (1437, 360)
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    for ds in (train, test):
        assert ds.images.min() >= 0 and ds.images.max() <= 1
        assert ds.images.max() > 0.9  # scaled from 0..16, not left in 0..16 nor squashed
        assert torch.equal(ds.images[:, 0], ds.images[:, 1]) and torch.equal(ds.images[:, 0], ds.images[:, 2])
    test_counts = torch.bincount(test.labels, minlength=10)
    all_counts = test_counts + torch.bincount(train.labels, minlength=10)
    assert all_counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn's digits
    assert ((test_counts - 0.2 * all_counts).abs() <= 1).all()  # stratified: 20% of every class
    # Train and test are disjoint images.
    train_rows = {tuple(r.tolist()) for r in train.images[:, 0, ::4, ::4].flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in test.images[:, 0, ::4, ::4].flatten(1)[:50])


def test_digits_split_ignores_the_global_seed():
    data._digits_tensors.cache_clear()
    torch.manual_seed(seeded(1))
    _, a = build_datasets("Digits", "unused")
    data._digits_tensors.cache_clear()
    torch.manual_seed(seeded(2))
    _, b = build_datasets("Digits", "unused")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_digits_test_set_is_not_augmented():
    _, test = build_datasets("Digits", "unused")
    for i in (0, 7, 359):
        assert torch.equal(test[i][0], test.images[i]) and torch.equal(test[i][0], test[i][0])


def _shift(img, dy, dx):
    """img moved down by dy and right by dx pixels, zeros coming in."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def test_digits_augmentation_only_shifts_by_at_most_two_pixels():
    train, _ = build_datasets("Digits", "unused")
    torch.manual_seed(seeded(0))
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    seen = set()
    for i in range(40):
        original = train.images[i]
        x, y = train[i]
        assert y == int(train.labels[i])
        matches = [s for s in shifts if torch.equal(x, _shift(original, *s))]
        assert matches, "augmented image is not a shift of the original (a flip or a rescale?)"
        seen.update(matches)
        assert not torch.equal(x, original.flip(-1)) or torch.equal(original, original.flip(-1))
    assert len(seen) > 5  # the augmentation does happen, with varied offsets


# --------------------------------------------------------------------------------------------------------------
# CIFAR from generated pickle batches in torchvision's format
# --------------------------------------------------------------------------------------------------------------

def _write_cifar(root, name, per_file=4):
    """A tiny CIFAR10/100 folder: each image is one solid colour COLOURS[label] (label < 4)."""
    rng = np.random.default_rng(seeded(0))

    def batch(n):
        labels = rng.integers(0, len(COLOURS), n).tolist()
        imgs = np.stack([np.broadcast_to(np.array(COLOURS[l], np.uint8)[:, None, None], (3, 32, 32))
                         for l in labels])
        return imgs.reshape(n, 3072), labels

    def dump(path, obj):
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    if name == "CIFAR10":
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder)
        for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            x, y = batch(per_file)
            dump(os.path.join(folder, fname), {"data": x, "labels": y, "batch_label": fname})
        dump(os.path.join(folder, "batches.meta"), {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder)
        for fname, n in (("train", 5 * per_file), ("test", per_file)):
            x, y = batch(n)
            dump(os.path.join(folder, fname), {"data": x, "fine_labels": y, "coarse_labels": [0] * n})
        dump(os.path.join(folder, "meta"), {"fine_label_names": [f"c{i}" for i in range(100)]})
    return folder


@pytest.fixture
def skip_md5(monkeypatch):
    """Let torchvision accept our generated files: its CIFAR classes compare each file's md5 with the real one."""
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("name", ["CIFAR10", "CIFAR100"])
def test_cifar_reads_the_users_files(tmp_path, skip_md5, name, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def no_network(*a, **k):
        raise AssertionError("must not download when the files are there")
    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    folder = _write_cifar(tmp_path, name)
    before = _tree_state(tmp_path)
    train, test = build_datasets(name, str(tmp_path), download=True)
    assert (len(train), len(test)) == (20, 4)
    for i in range(len(test)):
        x, y = test[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
        expected = torch.tensor(COLOURS[y], dtype=torch.float32)[:, None, None].expand(3, 32, 32) / 255
        assert torch.allclose(x, expected)  # no normalisation, no augmentation on the test set
    torch.manual_seed(seeded(0))
    xs = [train[0][0] for _ in range(20)]
    assert all(x.shape == (3, 32, 32) and x.min() >= 0 and x.max() <= 1 for x in xs)
    assert any((x == 0).all(dim=0).any() for x in xs)  # padding=4 crops bring in black borders
    assert _tree_state(tmp_path) == before
    assert os.listdir(tmp_path) == [os.path.basename(folder)]


@pytest.mark.parametrize("name,folder", [("CIFAR10", "cifar-10-batches-py"), ("CIFAR100", "cifar-100-python")])
def test_cifar_missing_without_download(tmp_path, name, folder):
    with pytest.raises(UsageError) as e:
        build_datasets(name, str(tmp_path), download=False)
    assert "--data-dir" in str(e.value) and os.path.join(str(tmp_path), folder) in str(e.value)
    assert os.listdir(tmp_path) == []


def test_cifar_offline_download_is_a_usage_error_and_leaves_no_folders(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*a, **k):
        os.makedirs(a[1], exist_ok=True)  # torchvision creates the root before trying the network
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    target = tmp_path / "new" / "data"
    with pytest.raises(UsageError) as e:
        build_datasets("CIFAR10", str(target), download=True)
    msg = str(e.value)
    assert "--data-dir" in msg and os.path.join(str(target), "cifar-10-batches-py") in msg and "download" in msg
    assert os.listdir(tmp_path) == []  # the folders the failed download created are gone


def test_cifar_corrupted_files_are_reported_not_overwritten(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    called = []
    monkeypatch.setattr(cifar, "download_and_extract_archive", lambda *a, **k: called.append(1))
    _write_cifar(tmp_path, "CIFAR10")  # real torchvision md5 check: our generated files fail it
    before = _tree_state(tmp_path)
    with pytest.raises(UsageError, match="corrupted"):
        build_datasets("CIFAR10", str(tmp_path), download=True)
    assert not called and _tree_state(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------
# TinyImageNet and ImageNet folder layouts
# --------------------------------------------------------------------------------------------------------------

def _jpeg(path, colour, size=(64, 64), mode="RGB"):
    img = Image.new("RGB", size, colour)
    (img.convert("L") if mode == "L" else img).save(path, "JPEG", quality=95)


def _write_tiny_imagenet(root, wnids=("n02", "n01", "n03"), per_class=2, with_wnids_file=True):
    """tiny-imagenet-200 layout; class i (in sorted wnid order) is drawn in COLOURS[i]."""
    base = os.path.join(root, "tiny-imagenet-200")
    for wnid in wnids:
        images = os.path.join(base, "train", wnid, "images")
        os.makedirs(images)
        with open(os.path.join(base, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            f.write("")
        for k in range(per_class):
            _jpeg(os.path.join(images, f"{wnid}_{k}.JPEG"), COLOURS[sorted(wnids).index(wnid)])
    os.makedirs(os.path.join(base, "val", "images"))
    lines = []
    for k, wnid in enumerate(list(wnids) * 2):
        fname = f"val_{k}.JPEG"
        _jpeg(os.path.join(base, "val", "images", fname), COLOURS[sorted(wnids).index(wnid)])
        lines.append(f"{fname}\t{wnid}\t0\t0\t63\t63\n")
    # One greyscale image: must still come out with 3 channels.
    _jpeg(os.path.join(base, "val", "images", "val_grey.JPEG"), (120, 120, 120), mode="L")
    lines.append(f"val_grey.JPEG\t{wnids[0]}\t0\t0\t63\t63\n")
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.writelines(lines)
    if with_wnids_file:
        with open(os.path.join(base, "wnids.txt"), "w") as f:
            f.write("\n".join(wnids) + "\n")
    return base


@pytest.mark.parametrize("with_wnids_file", [True, False])
@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_tiny_imagenet_layout_read_in_place(tmp_path, with_wnids_file, point_at):
    base = _write_tiny_imagenet(tmp_path, with_wnids_file=with_wnids_file)
    before = _tree_state(tmp_path)
    train, test = build_datasets("TinyImageNet", str(tmp_path) if point_at == "parent" else base)
    assert (len(train), len(test)) == (6, 7)
    for ds in (train, test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
            if ds.samples[i][0].endswith("val_grey.JPEG"):
                assert y == 1  # wnids[0] == "n02" is class 1 in sorted order
            elif ds is test:
                assert _colour_label(x) == y  # labels follow sorted wnids through val_annotations.txt
    # Training labels: exact on the un-augmented image (random crops may bring in black borders).
    assert [label for _, label in train.samples] == [0, 0, 1, 1, 2, 2]
    assert all(os.path.basename(p).startswith(["n01", "n02", "n03"][label]) for p, label in train.samples)
    assert _tree_state(tmp_path) == before


def test_tiny_imagenet_bad_annotations_and_missing_folder(tmp_path):
    with pytest.raises(UsageError) as e:
        build_datasets("TinyImageNet", str(tmp_path))
    assert "--data-dir" in str(e.value) and os.path.join(str(tmp_path), "tiny-imagenet-200") in str(e.value)
    base = _write_tiny_imagenet(tmp_path)
    with open(os.path.join(base, "val", "val_annotations.txt"), "a") as f:
        f.write("val_missing.JPEG\tn01\t0\t0\t63\t63\n")
    with pytest.raises(UsageError, match="val_missing"):
        build_datasets("TinyImageNet", str(tmp_path))


def _write_imagenet(root, classes=("b_cls", "a_cls"), per_class=2):
    for split in ("train", "val"):
        for cls in classes:
            folder = os.path.join(root, split, cls)
            os.makedirs(folder)
            for k in range(per_class):
                _jpeg(os.path.join(folder, f"{k}.JPEG"), COLOURS[sorted(classes).index(cls)], size=(48, 40))


def test_imagenet_image_folders(tmp_path):
    _write_imagenet(tmp_path)
    before = _tree_state(tmp_path)
    train, test = build_datasets("ImageNet", str(tmp_path))
    assert (len(train), len(test)) == (4, 4) and train.classes == ["a_cls", "b_cls"]
    for i in range(len(test)):
        x, y = test[i]
        assert x.shape == (3, 224, 224) and 0 <= x.min() and x.max() <= 1
        assert _colour_label(x) == y
    x, y = train[0]
    assert x.shape == (3, 224, 224) and y == 0
    assert _tree_state(tmp_path) == before


def test_imagenet_missing_or_mismatched(tmp_path):
    with pytest.raises(UsageError) as e:
        build_datasets("ImageNet", str(tmp_path))
    assert "--data-dir" in str(e.value) and os.path.join(str(tmp_path), "train") in str(e.value)
    _write_imagenet(tmp_path)
    os.makedirs(tmp_path / "val" / "c_cls")
    _jpeg(str(tmp_path / "val" / "c_cls" / "0.JPEG"), COLOURS[2])
    with pytest.raises(UsageError, match="differ"):
        build_datasets("ImageNet", str(tmp_path))


# --------------------------------------------------------------------------------------------------------------
# EpochSampler
# --------------------------------------------------------------------------------------------------------------

def test_sampler_is_a_function_of_seed_and_epoch():
    def order(seed, epoch):
        s = EpochSampler(50, shuffle=True, seed=seed)
        s.set_epoch(epoch)
        return list(s)
    assert order(3, 0) == order(3, 0) and sorted(order(3, 0)) == list(range(50))
    assert order(3, 1) != order(3, 0) and order(4, 0) != order(3, 0)
    assert order(3, 1) == order(4, 0)  # documented: the generator is seeded with seed + epoch
    torch.manual_seed(seeded(0))
    a = order(3, 2)
    torch.manual_seed(seeded(1))
    assert order(3, 2) == a  # the global RNG plays no part
    plain = EpochSampler(7, shuffle=False, seed=0)
    plain.set_epoch(5)
    assert list(plain) == list(range(7))


def test_set_start_resumes_exactly_the_tail_until_next_epoch():
    s = EpochSampler(23, shuffle=True, seed=1, rank=1, world_size=2)
    s.set_epoch(4)
    full = list(s)
    assert len(s) == len(full) == 12
    s.set_start(2, 5)
    assert list(s) == full[10:] and len(s) == 2
    s.set_start(3, 5)
    assert list(s) == [] and len(s) == 0
    s.set_epoch(4)
    assert list(s) == full


def test_two_ranks_partition_train_padded_and_test_exact():
    n, ws = 11, 2
    train = [EpochSampler(n, shuffle=True, seed=7, rank=r, world_size=ws) for r in range(ws)]
    for s in train:
        s.set_epoch(3)
    parts = [list(s) for s in train]
    assert [len(p) for p in parts] == [len(s) for s in train] == [6, 6]
    assert set(parts[0]) | set(parts[1]) == set(range(n))
    single = EpochSampler(n, shuffle=True, seed=7)
    single.set_epoch(3)
    order = list(single)
    assert parts[1][-1] == order[0]  # the one padding index repeats the head of the epoch's order
    test = [EpochSampler(n, shuffle=False, seed=7, rank=r, world_size=ws, pad=False) for r in range(ws)]
    tparts = [list(s) for s in test]
    assert [len(p) for p in tparts] == [len(s) for s in test] == [6, 5]
    assert sorted(tparts[0] + tparts[1]) == list(range(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), ws=st.integers(1, 5), seed=st.integers(0, 10), epoch=st.integers(0, 5),
       mode=st.sampled_from(["pad", "drop", "exact"]))
def test_sampler_partition_property(n, ws, seed, epoch, mode):
    samplers = [EpochSampler(n, shuffle=True, seed=seed, rank=r, world_size=ws, drop_last=mode == "drop",
                             pad=mode == "pad") for r in range(ws)]
    for s in samplers:
        s.set_epoch(epoch)
    parts = [list(s) for s in samplers]
    assert [len(p) for p in parts] == [len(s) for s in samplers]
    flat = [i for p in parts for i in p]
    assert all(0 <= i < n for i in flat)
    if mode == "exact":
        assert sorted(flat) == list(range(n))
    elif mode == "pad":
        assert len({len(p) for p in parts}) == 1 and set(flat) == set(range(n)) and len(flat) < n + ws
    else:
        assert len({len(p) for p in parts}) == 1 and len(set(flat)) == len(flat) == n // ws * ws


# --------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------

def test_build_loaders_digits_two_ranks():
    loaders = [build_loaders(LoaderConfig("Digits", "unused", batch_size=64, test_batch_size=100,
                                          num_workers=0, seed=5), "cpu", rank=r, world_size=2) for r in range(2)]
    train, val, test, info = loaders[0]
    assert val is None  # data_fraction defaults to 1.0 here: no held-out split
    assert info == dataset_info("Digits") and isinstance(train.sampler, EpochSampler)
    assert not train.pin_memory and train.batch_size == 64
    assert len(train) == len(loaders[1][0]) == -(-719 // 64)  # ceil(1437 / 2) = 719 per rank
    seen = []
    for _, _, t, _ in loaders:
        for x, y in t:
            assert x.shape[1:] == (3, 32, 32) and y.dtype == torch.long
            seen.append(len(y))
    assert sum(seen) == 360
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_build_loaders_reproducible_with_a_worker():
    def first_batch():
        train, _, _, _ = build_loaders(LoaderConfig("Digits", "unused", batch_size=16, test_batch_size=16,
                                                    num_workers=1, seed=11), "cpu")
        assert train.persistent_workers
        train.sampler.set_epoch(2)
        it = iter(train)
        batch = next(it)
        del it
        return batch
    torch.manual_seed(seeded(0))
    (xa, ya) = first_batch()
    torch.manual_seed(seeded(99))  # the main process's RNG must not matter
    (xb, yb) = first_batch()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    sampler = EpochSampler(1437, shuffle=True, seed=11)
    sampler.set_epoch(2)
    train_ds, _ = build_datasets("Digits", "unused")
    assert ya.tolist() == [int(train_ds.labels[i]) for i in list(sampler)[:16]]


def test_validation_split_is_held_out_unaugmented_and_fixed():
    train, val, test, _ = build_loaders(LoaderConfig("Digits", "unused", batch_size=64, test_batch_size=64,
                                                     num_workers=0, seed=3, data_fraction=0.9), "cpu")
    n_train, n_val = len(train.dataset), len(val.dataset)
    assert n_train + n_val == 1437 and n_val == 1437 - round(0.9 * 1437)
    assert not set(train.dataset.indices) & set(val.dataset.indices)
    x_train_all, _, _, _ = data._digits_tensors()
    xv, _ = next(iter(val))
    assert torch.equal(xv, x_train_all[val.dataset.indices[:len(xv)]])  # no augmentation on validation
    _, val_other_seed, _, _ = build_loaders(LoaderConfig("Digits", "unused", batch_size=64, test_batch_size=64,
                                                         num_workers=0, seed=4, data_fraction=0.9), "cpu")
    assert val_other_seed.dataset.indices == val.dataset.indices  # the split does not follow --seed
    with pytest.raises(UsageError):
        build_loaders(LoaderConfig("Digits", "unused", batch_size=8, test_batch_size=8,
                                   num_workers=0, seed=0, data_fraction=1.5), "cpu")
