"""--dataset FashionMNIST: a tiny sample written in the real IDX format (gzipped and not, in torchvision's layout
and in a flat folder like Debian's), read offline; bad or missing files; a couple of training batches on it.

The files are generated here: no test needs the Debian package or the network.
"""
import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from args import parse_args
from conftest import seeded
from utils import data, fashion_mnist as fm
from utils.data import LoaderConfig, build_datasets, build_loaders, dataset_info
from utils.errors import UsageError
from conftest import seeded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_TEST = 40, 12


def write_idx(path, array):
    """`array` (uint8) as an IDX file: 0, 0, type 0x08 (unsigned byte), ndim, big-endian uint32 sizes, the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.tobytes())


def sample(n, offset):
    """n distinct 28x28 images using the whole 0..255 range, and labels cycling through the 10 classes."""
    labels = (np.arange(n) + offset) % 10
    ramp = np.arange(28 * 28).reshape(28, 28)
    images = np.stack([(ramp * (i % 7 + 1) + 3 * i + offset) % 256 for i in range(n)])
    images[:, 0, 0], images[:, 0, 1] = 0, 255
    return images.astype(np.uint8), labels.astype(np.uint8)


SPLITS = {True: sample(N_TRAIN, 0), False: sample(N_TEST, 5)}


def write_fashion_mnist(folder, gz=True, skip=()):
    """The four files of the sample in `folder` (created), gzipped like the originals unless `gz` is false."""
    os.makedirs(folder, exist_ok=True)
    for train, (images, labels) in SPLITS.items():
        for name, array in zip(fm.FILES[train], (images, labels)):
            if name not in skip:
                write_idx(os.path.join(folder, name + (".gz" if gz else "")), array)
    return folder


def tree(root):
    """Every path under root with its size and mtime: equal before and after means nothing was touched."""
    return {os.path.relpath(os.path.join(d, n), root): (os.stat(os.path.join(d, n)).st_size,
                                                        os.stat(os.path.join(d, n)).st_mtime_ns)
            for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.fixture
def no_network(monkeypatch):
    """Any download (torchvision's or a bare urllib call) fails the test, even if the code under test catches the
    error it raises: attempts are recorded and checked at teardown."""
    import torchvision.datasets.mnist as mnist
    import torchvision.datasets.utils as tv_utils
    attempts = []

    def refuse(*a, **k):
        attempts.append(a)
        raise urllib.error.URLError("the test is offline")
    for module, name in ((mnist, "download_and_extract_archive"), (tv_utils, "download_url"),
                         (tv_utils, "download_and_extract_archive"), (urllib.request, "urlopen")):
        monkeypatch.setattr(module, name, refuse)
    yield
    assert attempts == [], "a download was attempted"


LAYOUTS = {  # name -> (folder the files go in, relative to --data-dir; gzipped?)
    "torchvision-raw-gz": (os.path.join("FashionMNIST", "raw"), True),  # Debian's files copied into torchvision's layout
    "torchvision-raw-unpacked": (os.path.join("FashionMNIST", "raw"), False),  # what torchvision's download leaves
    "flat-gz": ("", True),  # --data-dir /usr/share/datasets/fashion-mnist (Debian's folder)
}


# ------------------------------------------------------------------------------------------------ reading

@pytest.mark.parametrize("layout", LAYOUTS)
def test_reads_the_sample_offline_in_place(tmp_path, no_network, layout):
    sub, gz = LAYOUTS[layout]
    write_fashion_mnist(os.path.join(tmp_path, sub), gz=gz)
    before = tree(tmp_path)
    train, test = build_datasets("FashionMNIST", str(tmp_path), download=True)
    import torchvision
    assert isinstance(train, torchvision.datasets.FashionMNIST) and train.classes[9] == "Ankle boot"
    assert (len(train), len(test)) == (N_TRAIN, N_TEST)
    for ds, (images, labels) in ((train, SPLITS[True]), (test, SPLITS[False])):
        assert torch.equal(ds.data, torch.from_numpy(images)) and ds.targets.tolist() == labels.tolist()
    for i in range(N_TEST):
        x, y = test[i]
        assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
        assert y == int(SPLITS[False][1][i])
        expected = torch.from_numpy(SPLITS[False][0][i]).float().div(255).expand(3, 28, 28)
        assert torch.equal(x, expected)  # [0, 1], grey copied to 3 channels, no normalisation, no augmentation
    assert (test[0][0].min(), test[0][0].max()) == (0, 1)
    torch.manual_seed(seeded(0))
    draws = [train[3][0] for _ in range(30)]
    assert all(x.shape == (3, 28, 28) and 0 <= x.min() and x.max() <= 1 for x in draws)
    assert any(not torch.equal(x, draws[0]) for x in draws)  # shifts and flips on the training split
    assert tree(tmp_path) == before


def test_our_reader_and_torchvisions_agree_on_unpacked_files(tmp_path, no_network):
    """torchvision's own FashionMNIST reads the same unpacked sample (its md5 check needs no md5 for them)."""
    import torchvision
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    ours, _ = build_datasets("FashionMNIST", str(tmp_path), download=False)
    theirs = torchvision.datasets.FashionMNIST(str(tmp_path), train=True, download=False)
    assert torch.equal(ours.data, theirs.data) and torch.equal(ours.targets, theirs.targets)


def test_loaders_split_and_batches(tmp_path, no_network):
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    cfg = LoaderConfig("FashionMNIST", str(tmp_path), batch_size=8, test_batch_size=5, num_workers=0, seed=1,
                       data_fraction=0.75)
    train_loader, val_loader, test_loader, info = build_loaders(cfg, "cpu")
    assert (info.num_classes, info.image_size) == (10, 28)
    assert (len(train_loader.dataset), len(val_loader.dataset), len(test_loader.dataset)) == (30, 10, N_TEST)
    train_loader.sampler.set_epoch(0)
    x, y = next(iter(train_loader))
    assert x.shape == (8, 3, 28, 28) and y.dtype == torch.long
    assert [len(b[1]) for b in test_loader] == [5, 5, 2]


def test_device_resident_loaders_hold_the_cpu_loaders_images(tmp_path, no_network):
    """The CUDA fast path (run here on CPU): the whole split as (N, 3, 28, 28) uint8, the same unaugmented batches
    as the DataLoaders, and training images that are 2-pixel shifts of their source, flipped or not."""
    import torch.nn.functional as F
    from utils.gpu import Augmentation, _raw_tensors, resident_loaders
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    cfg = LoaderConfig("FashionMNIST", str(tmp_path), batch_size=8, test_batch_size=5, num_workers=0, seed=1,
                       data_fraction=0.75)
    loaders = build_loaders(cfg, "cpu")[:3]
    train, val, test = resident_loaders("FashionMNIST", loaders, "cpu", seed=0)
    assert train.augmentation == Augmentation(2, True) and train.images.dtype == torch.uint8
    for cpu, res in ((loaders[1], val), (loaders[2], test)):  # unaugmented: identical batches
        batches = list(zip(cpu, res))
        assert len(batches) == len(cpu) == len(res)
        for (x0, y0), (x1, y1) in batches:
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    sources, _ = _raw_tensors(loaders[0].dataset)
    train.sampler.set_epoch(0)
    order = list(train.sampler)
    xs = torch.cat([x for x, _ in train])
    assert xs.shape == (30, 3, 28, 28) and xs.min() >= 0 and xs.max() <= 1
    moved = 0
    for x, i in zip(xs, order):
        padded = F.pad(sources[i].float() / 255, (2, 2, 2, 2))
        crops = {(t, l, f): padded[:, t:t + 28, l:l + 28].flip(-1) if f else padded[:, t:t + 28, l:l + 28]
                 for t in range(5) for l in range(5) for f in (False, True)}
        matches = [k for k, c in crops.items() if torch.equal(x, c)]
        assert matches, "a training image is not a shifted (and maybe flipped) copy of its source"
        moved += (2, 2, False) not in matches
    assert moved > 0


def test_dataset_facts():
    info = dataset_info("FashionMNIST")
    assert (info.num_classes, info.image_size) == (10, 28)
    assert info.mean == (0.2860,) * 3 and info.std == (0.3530,) * 3  # measured on the 60,000 training images


# ------------------------------------------------------------------------------------------------ FashionMNIST16

def pil_downsampled(image, size=16):
    """A 28x28 uint8 image downsampled by PIL's bilinear resize (antialiased: its filter widens with the scale),
    as float in [0, 1]: an oracle independent of torch's interpolation."""
    grey = Image.fromarray(image.astype(np.float32) / 255, mode="F").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(grey, dtype=np.float32).copy())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fashion_mnist16_is_every_image_downsampled_antialiased(tmp_path, no_network, layout):
    sub, gz = LAYOUTS[layout]
    write_fashion_mnist(os.path.join(tmp_path, sub), gz=gz)
    train, test = build_datasets("FashionMNIST16", str(tmp_path), download=True)
    assert (len(train), len(test)) == (N_TRAIN, N_TEST)
    assert train.targets == SPLITS[True][1].tolist() and test.targets == SPLITS[False][1].tolist()
    assert (train.padding, train.flip) == (1, True) and (test.padding, test.flip) == (0, False)
    for i in range(N_TEST):
        x, y = test[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == int(SPLITS[False][1][i])
        expected = pil_downsampled(SPLITS[False][0][i])
        assert torch.allclose(x, expected.expand(3, 16, 16), atol=2e-5)  # grey copied to 3 channels, no augmentation
    flat = np.full((N_TEST, 28, 28), 200, dtype=np.uint8)  # a constant image stays that constant
    write_idx(os.path.join(tmp_path, sub, "t10k-images-idx3-ubyte" + (".gz" if gz else "")), flat)
    _, constant = build_datasets("FashionMNIST16", str(tmp_path), download=False)
    assert torch.allclose(constant[0][0], torch.full((3, 16, 16), 200 / 255))


def test_fashion_mnist16_training_images_are_shifted_flipped_copies_and_validation_is_not(tmp_path, no_network):
    """Training (CPU DataLoader and the device-resident loader, run here on CPU): each image is its source shifted by
    at most 1 pixel and maybe flipped; the validation split and the test set are the plain images, the same batches
    from both loaders."""
    import torch.nn.functional as F
    from utils.gpu import Augmentation, _raw_tensors, resident_loaders
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    cfg = LoaderConfig("FashionMNIST16", str(tmp_path), batch_size=8, test_batch_size=5, num_workers=0, seed=1,
                       data_fraction=0.75)
    loaders = build_loaders(cfg, "cpu")[:3]
    assert loaders[0].dataset.dataset.flip and not loaders[1].dataset.dataset.flip
    resident = resident_loaders("FashionMNIST16", loaders, "cpu", seed=0)
    assert resident[0].augmentation == Augmentation(1, True)
    for cpu, res in ((loaders[1], resident[1]), (loaders[2], resident[2])):  # unaugmented: identical batches
        batches = list(zip(cpu, res))
        assert len(batches) == len(cpu) == len(res)
        for (x0, y0), (x1, y1) in batches:
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    sources, _ = _raw_tensors(loaders[0].dataset)
    torch.manual_seed(seeded(3))
    for loader in (loaders[0], resident[0]):
        loader.sampler.set_epoch(0)
        order = list(loader.sampler)
        xs = torch.cat([x for x, _ in loader])
        assert xs.shape == (30, 3, 16, 16)
        kinds = set()
        for x, i in zip(xs, order):
            padded = F.pad(sources[i], (1, 1, 1, 1))
            crops = {(t, l, f): padded[:, t:t + 16, l:l + 16].flip(-1) if f else padded[:, t:t + 16, l:l + 16]
                     for t in range(3) for l in range(3) for f in (False, True)}
            matches = [k for k, c in crops.items() if torch.equal(x, c)]
            assert matches, "a training image is not a shifted (and maybe flipped) copy of its source"
            kinds.update(k[2] for k in matches)
        assert kinds == {False, True}  # 30 images: some flipped, some not (the chance of not seeing both: 2**-29)


@pytest.mark.skipif(fm.missing_files(fm.DEBIAN_FOLDER) != [], reason="needs the package dataset-fashion-mnist")
def test_fashion_mnist16_statistics_are_those_of_the_real_training_images():
    x, _, x_test, _ = data.fashion_mnist_tensors(fm.DEBIAN_FOLDER, 16)
    assert x.shape == (60000, 3, 16, 16) and x_test.shape == (10000, 3, 16, 16)
    info = dataset_info("FashionMNIST16")
    assert (info.num_classes, info.image_size) == (10, 16)
    assert abs(x.mean().item() - info.mean[0]) < 1e-3 and abs(x.std().item() - info.std[0]) < 1e-3


# ------------------------------------------------------------------------------------------------ bad input

def test_missing_without_download_names_the_places_and_writes_nothing(tmp_path, no_network):
    with pytest.raises(UsageError) as e:
        build_datasets("FashionMNIST", str(tmp_path), download=False)
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "FashionMNIST", "raw") in msg and "--data-dir" in msg
    assert fm.DEBIAN_FOLDER in msg and "\n" not in msg
    assert os.listdir(tmp_path) == []


def test_failed_download_is_a_usage_error_and_leaves_nothing(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as mnist

    def offline(url, download_root, **k):
        os.makedirs(download_root, exist_ok=True)  # torchvision creates raw/ before trying the network
        open(os.path.join(download_root, "partial.gz"), "wb").close()
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(mnist, "download_and_extract_archive", offline)
    target = tmp_path / "new" / "data"
    with pytest.raises(UsageError) as e:
        build_datasets("FashionMNIST", str(target), download=True)
    assert "downloading it failed" in str(e.value) and "--data-dir" in str(e.value)
    assert os.listdir(tmp_path) == []  # everything the failed download created is gone
    (tmp_path / "existing").mkdir()
    with pytest.raises(UsageError):
        build_datasets("FashionMNIST", str(tmp_path / "existing"), download=True)
    assert os.listdir(tmp_path / "existing") == []  # the user's folder stays, empty as it was


@pytest.mark.parametrize("sub", [os.path.join("FashionMNIST", "raw"), ""])
def test_an_incomplete_copy_is_reported_not_completed(tmp_path, monkeypatch, sub):
    import torchvision.datasets.mnist as mnist
    called = []
    monkeypatch.setattr(mnist, "download_and_extract_archive", lambda *a, **k: called.append(1))
    write_fashion_mnist(os.path.join(tmp_path, sub), skip=("t10k-labels-idx1-ubyte",))
    before = tree(tmp_path)
    with pytest.raises(UsageError, match="incomplete: t10k-labels-idx1-ubyte missing"):
        build_datasets("FashionMNIST", str(tmp_path), download=True)
    assert not called and tree(tmp_path) == before


def _damage(folder, how):
    path = os.path.join(folder, "train-images-idx3-ubyte.gz")
    blob = gzip.decompress(open(path, "rb").read())
    if how == "truncated":
        blob = blob[:-100]
    elif how == "not idx":
        blob = b"\x89PNG" + blob[4:]
    elif how == "not gzip":
        open(path, "wb").write(blob)
        return path
    elif how == "labels out of range":
        path = os.path.join(folder, "t10k-labels-idx1-ubyte.gz")
        write_idx(path, np.full(N_TEST, 10))
        return path
    with gzip.open(path, "wb") as f:
        f.write(blob)
    return path


@pytest.mark.parametrize("how", ["truncated", "not idx", "not gzip", "labels out of range"])
def test_damaged_files_are_one_clear_usage_error(tmp_path, no_network, how):
    folder = write_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    path = _damage(folder, how)
    before = tree(tmp_path)
    with pytest.raises(UsageError) as e:
        build_datasets("FashionMNIST", str(tmp_path), download=True)
    assert path in str(e.value) and "\n" not in str(e.value)
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------ flags

def test_eps_defaults_to_0_1_on_fashion_mnist_only():
    base = ["--arch", "resnet18_cifar_ori"]
    args = parse_args(base + ["--dataset", "FashionMNIST"], script="train_ori")
    assert (args.epsilon, args.step_size, args.epsilon_test, args.step_size_test) == (0.1, 0.0625, 0.1, 0.025)
    assert (args.batch_size, args.num_workers) == (128, 6)
    args = parse_args(base + ["--dataset", "FashionMNIST", "--epsilon", "0.2", "--step-size-test", "0.05"],
                      script="train_ori")
    assert (args.epsilon, args.step_size, args.epsilon_test, args.step_size_test) == (0.2, 0.0625, 0.1, 0.05)
    for dataset in ("CIFAR10", "Digits"):
        args = parse_args(base + ["--dataset", dataset], script="train_ori")
        assert (args.epsilon, args.step_size, args.epsilon_test, args.step_size_test) == \
            (8 / 255, 5 / 255, 8 / 255, 2 / 255)
    args = parse_args(base + ["--dataset", "FashionMNIST16"], script="train_ori")
    assert (args.epsilon, args.step_size, args.epsilon_test, args.step_size_test) == (0.1, 0.0625, 0.1, 0.025)
    assert (args.batch_size, args.num_workers) == (128, 0)  # in memory: no loader processes


# ------------------------------------------------------------------------------------------------ entry scripts

@pytest.fixture
def offline_env():
    """Environment for a subprocess whose HTTP(S) goes through a proxy that refuses connections: a download
    attempt fails at once and reaches nothing (the port is bound here, never listened on)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    proxy = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, http_proxy=proxy, https_proxy=proxy, HTTP_PROXY=proxy,
               HTTPS_PROXY=proxy)
    yield env
    sock.close()


def _run(script, argv, env, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_missing_files_offline_exit_2_one_line_nothing_written(tmp_path, offline_env):
    data = tmp_path / "data"
    data.mkdir()
    out = _run("train_ori.py", ["--arch", "resnet18_cifar_ori", "--dataset", "FashionMNIST", "--data-dir",
                                str(data), "--save-dir", str(tmp_path / "runs"), "--device", "cpu"],
               offline_env, tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: FashionMNIST not found"), out.stderr
    assert "downloading it failed" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["data"] and os.listdir(data) == []


TINY = ["--dataset", "FashionMNIST", "--ratio", "0.125", "--epochs", "1", "--max-batches", "2", "--batch-size",
        "8", "--test-batch-size", "12", "--num-workers", "0", "--num-steps", "1", "--num-steps-test", "2",
        "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("script,arch,dataset", [
    ("train_ori.py", ["--arch", "resnet18_cifar_ori"], "FashionMNIST"),
    ("train_moe.py", ["--arch", "resnet18_cifar_moe", "--n-expert", "2"], "FashionMNIST"),
    ("train_moe.py", ["--arch", "resnet18_cifar_moe", "--n-expert", "2", "--channels-last"], "FashionMNIST16")])
@pytest.mark.slow
def test_a_couple_of_training_batches_on_the_sample(tmp_path, offline_env, script, arch, dataset):
    data = write_fashion_mnist(tmp_path / "data", gz=True)  # the flat, gzipped folder, as Debian ships it
    before = tree(data)
    out = _run(script, arch + TINY + ["--dataset", dataset, "--data-dir", str(data),
                                      "--save-dir", str(tmp_path / "runs")], offline_env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    found = [d for d, _, files in os.walk(tmp_path / "runs") if "metrics.jsonl" in files]
    assert len(found) == 1
    rows = [json.loads(line) for line in open(os.path.join(found[0], "metrics.jsonl"))]
    # (not ra <= sa: RA counts the adversarial points classified correctly, clean-correct or not)
    assert rows and 0 <= rows[-1]["ra"] <= 100 and 0 <= rows[-1]["sa"] <= 100
    saved = open(os.path.join(found[0], "args.yaml")).read()
    assert f"dataset: {dataset}\n" in saved and "epsilon: 0.1" in saved
    assert ("channels_last: true" in saved) == ("--channels-last" in arch)  # recorded with the run
    assert tree(data) == before
