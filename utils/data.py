"""Datasets, samplers and loaders for CIFAR10, CIFAR100, TinyImageNet, ImageNet, Digits and FashionMNIST (and
their 16x16 versions Digits16 and FashionMNIST16).

Every sample is `(image, label)`: a float tensor (C, H, W) in [0, 1] pixel units and an int class index.
There is no normalisation here on purpose: attacks work in [0, 1] pixel space and the per-channel
mean/std (`DatasetInfo.mean`, `.std`) is applied by the model itself (`--normalize`).

Order and resumption: the training order of an epoch depends only on (seed, epoch) through `EpochSampler`.
Callers must call `train_loader.sampler.set_epoch(epoch)` at the start of every epoch (and may then call
`set_start(batch, batch_size)` to resume mid-epoch); otherwise every epoch repeats epoch 0's order.

Nothing is loaded or computed at import time; the user's data folders are read in place and never modified.
"""
import copy
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .errors import UsageError
from .runtime import loader_seed, order_seed

DATASETS = ("CIFAR10", "CIFAR100", "TinyImageNet", "ImageNet", "Digits", "Digits16", "FashionMNIST",
            "FashionMNIST16")

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset; image_size in pixels, mean/std per RGB channel in [0, 1] units."""
    name: str
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple


_INFO = {
    "CIFAR10": DatasetInfo("CIFAR10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "CIFAR100": DatasetInfo("CIFAR100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "TinyImageNet": DatasetInfo("TinyImageNet", 200, 64, _IMAGENET_MEAN, _IMAGENET_STD),
    "ImageNet": DatasetInfo("ImageNet", 1000, 224, _IMAGENET_MEAN, _IMAGENET_STD),
    # Measured once offline on the Digits training split below (after the 8x8 -> 32x32 bilinear upsampling);
    # the three channels are copies of one grey channel, hence equal statistics.
    "Digits": DatasetInfo("Digits", 10, 32, (0.3054, 0.3054, 0.3054), (0.3237, 0.3237, 0.3237)),
    # The same digits upsampled to 16x16 only: a 4x cheaper setting for CPU studies (README: Routing study).
    "Digits16": DatasetInfo("Digits16", 10, 16, (0.3054, 0.3054, 0.3054), (0.319, 0.319, 0.319)),
    # Fashion-MNIST at its own 28x28, grey copied to three channels; measured once on the 60,000 training images
    # (the published 0.2860 / 0.3530).
    "FashionMNIST": DatasetInfo("FashionMNIST", 10, 28, (0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)),
    # All of Fashion-MNIST downsampled to 16x16 (antialiased): about a third of the cost of every row of a study
    # (issue 27), as Digits16 is to Digits; measured once on the 60,000 downsampled training images.
    "FashionMNIST16": DatasetInfo("FashionMNIST16", 10, 16, (0.2868, 0.2868, 0.2868),
                                    (0.3217, 0.3217, 0.3217)),
}


def dataset_info(name: str) -> DatasetInfo:
    """Static facts about dataset `name` (one of DATASETS); UsageError for an unknown name."""
    try:
        return _INFO[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}") from None


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------

def build_datasets(name: str, data_dir: str, download: bool = True):
    """(train_ds, test_ds) for dataset `name`; samples are ((C, H, W) float in [0, 1], int label).

    data_dir: the `--data-dir` folder. CIFAR and FashionMNIST are looked for under it first and only
    downloaded into it when missing and `download` is true. Training augmentation (random crop, and a
    horizontal flip except for Digits) is applied to the training set only. Raises UsageError when the data
    cannot be found.
    """
    info = dataset_info(name)
    if name in ("Digits", "Digits16"):
        return _digits_datasets(info.image_size)
    data_dir = os.path.expanduser(str(data_dir))
    if name in ("CIFAR10", "CIFAR100"):
        return _cifar_datasets(name, data_dir, download)
    if name in ("FashionMNIST", "FashionMNIST16"):
        return _fashion_mnist_datasets(data_dir, download, info.image_size)
    if name == "TinyImageNet":
        return _tiny_imagenet_datasets(data_dir, info.num_classes)
    return _imagenet_datasets(data_dir, info.num_classes)


def _flip_crop_transforms(crop):
    """Train transform: `crop`, random horizontal flip, to [0, 1] tensor."""
    from torchvision import transforms as T
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor()])


def _cifar_datasets(name, data_dir, download):
    from torchvision import datasets, transforms as T
    cls = datasets.CIFAR10 if name == "CIFAR10" else datasets.CIFAR100
    folder = os.path.join(data_dir, cls.base_folder)
    train_tf = _flip_crop_transforms(T.RandomCrop(32, padding=4))
    test_tf = T.ToTensor()

    def load():
        return cls(data_dir, train=True, transform=train_tf), cls(data_dir, train=False, transform=test_tf)

    try:  # the user's files first, never the network when they are there
        return load()
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        pass
    if os.path.exists(folder):
        # Present but failing torchvision's md5 check: downloading would overwrite the user's files.
        raise UsageError(f"{name} files in {folder} are incomplete or corrupted (torchvision's md5 check failed); "
                         f"replace that folder with the original {cls.filename} contents, or point --data-dir "
                         f"at another folder")
    hint = (f"{name} not found: expected the folder {folder}; pass --data-dir DIR where DIR contains "
            f"{cls.base_folder} (the extracted {cls.filename})")
    if not download:
        raise UsageError(hint)
    created = _first_missing_ancestor(data_dir)
    try:
        cls(data_dir, train=True, download=True)
        return load()
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; offline lands here
        if created is not None:
            _remove_empty_dirs(created)
        raise UsageError(f"{hint}; downloading it failed ({type(e).__name__}: {e})") from None


def _first_missing_ancestor(path):
    """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
    path = os.path.abspath(path)
    missing = None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_empty_dirs(top):
    """Remove `top` if it holds nothing but empty folders (ones a failed download created)."""
    if not os.path.isdir(top):
        return
    for root, dirs, files in os.walk(top, topdown=False):
        if files or any(os.path.exists(os.path.join(root, d)) for d in dirs):
            return
        os.rmdir(root)


def _fashion_mnist_datasets(data_dir, download, size=28):
    """The four IDX files from the first of `fashion_mnist.candidate_folders(data_dir)` holding them all (unpacked
    or .gz), else downloaded by torchvision into data_dir/FashionMNIST/raw when `download` is true.

    28x28 grey images, copied to three channels so that the RGB models apply unchanged (as Digits).
    Training: shifts of up to 2 pixels (the share of the image of Digits' 2 at 32x32) and horizontal flips.
    `size` < 28 (FashionMNIST16): the same files, every image downsampled once (`fashion_mnist_tensors`) and held
    in memory; training shifts of up to 1 pixel at 16x16 (the nearest whole share of 2 at 28) and flips.
    """
    from torchvision import transforms as T
    from . import fashion_mnist as fm
    folder = next((f for f in fm.candidate_folders(data_dir) if not fm.missing_files(f)), None)
    if folder is None:
        folder = _fetch_fashion_mnist(data_dir, download)
    if size != fm.IMAGE_SIDE:
        x_train, y_train, x_test, y_test = fashion_mnist_tensors(folder, size)
        return (TensorImageDataset(x_train, y_train, padding=round(2 * size / fm.IMAGE_SIDE), flip=True),
                TensorImageDataset(x_test, y_test))
    train_tf = T.Compose([T.RandomCrop(28, padding=2), T.RandomHorizontalFlip(), T.Grayscale(3), T.ToTensor()])
    test_tf = T.Compose([T.Grayscale(3), T.ToTensor()])
    return fm.LocalFashionMNIST(folder, train=True, transform=train_tf), \
        fm.LocalFashionMNIST(folder, train=False, transform=test_tf)


def fashion_mnist_tensors(folder, size):
    """(x_train, y_train, x_test, y_test) of the Fashion-MNIST files in `folder`, every image downsampled from 28x28
    to `size` x `size` (bilinear with antialiasing: each output pixel averages the input pixels it covers): images
    (N, 3, size, size) float32 in [0, 1], the grey channel copied to three (an expanded view: one copy in memory),
    labels (N,) long."""
    from . import fashion_mnist as fm
    out = []
    for train in (True, False):
        images, labels = fm.read_split(folder, train)
        x = images[:, None].float().div_(255)  # (N, 1, 28, 28)
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
        out += [x.expand(-1, 3, -1, -1), labels]  # (N, 3, size, size)
    return tuple(out)


def _fetch_fashion_mnist(data_dir, download):
    """Download Fashion-MNIST into data_dir/FashionMNIST/raw and return that folder; UsageError when it is not
    there and cannot be downloaded, or when a folder holds only some of the files (never completed over them)."""
    from torchvision import datasets
    from . import fashion_mnist as fm
    torchvision_folder, flat = fm.candidate_folders(data_dir)
    begun = [f for f in (torchvision_folder, flat) if len(fm.missing_files(f)) < len(fm.NAMES)]
    if os.path.isdir(os.path.dirname(torchvision_folder)) and torchvision_folder not in begun:
        begun.insert(0, torchvision_folder)  # the user's FashionMNIST folder: no download writes into it
    if begun:
        raise UsageError(f"FashionMNIST files in {begun[0]} are incomplete: {', '.join(fm.missing_files(begun[0]))} "
                         f"missing (unpacked or .gz); add them, or pass --data-dir DIR where DIR or "
                         f"DIR/FashionMNIST/raw holds all four")
    hint = (f"FashionMNIST not found: expected its four IDX files ({', '.join(fm.NAMES)}; each may be .gz) in "
            f"{torchvision_folder} or in {flat}; pass --data-dir DIR where DIR or DIR/FashionMNIST/raw holds them "
            f"(Debian's package dataset-fashion-mnist installs them in {fm.DEBIAN_FOLDER})")
    if not download:
        raise UsageError(hint)
    created = _first_missing_ancestor(os.path.dirname(torchvision_folder))  # not None: checked above
    try:
        datasets.FashionMNIST(data_dir, train=True, download=True)  # fetches and unpacks all four files
    except (OSError, RuntimeError, ValueError) as e:  # torchvision turns URLError (offline) into RuntimeError
        shutil.rmtree(created, ignore_errors=True)  # everything in it is this download's
        raise UsageError(f"{hint}; downloading it failed ({type(e).__name__}: {' '.join(str(e).split())})") from None
    return torchvision_folder


class ImageListDataset(Dataset):
    """Images read from a list of (path, label); files are only opened for reading."""

    def __init__(self, samples, transform):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from PIL import Image
        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert("RGB")  # some Tiny-ImageNet JPEGs are greyscale
        return self.transform(img), label


def _image_files(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXTENSIONS))


def _find_tiny_imagenet(data_dir):
    nested = os.path.join(data_dir, "tiny-imagenet-200")
    for root in (nested, data_dir):
        if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
            return root
    raise UsageError(f"TinyImageNet not found: expected the folder {nested} (with train/ and val/ inside); "
                     f"pass --data-dir DIR where DIR contains tiny-imagenet-200 (or is that folder)")


def _tiny_imagenet_datasets(data_dir, max_classes):
    from torchvision import transforms as T
    root = _find_tiny_imagenet(data_dir)
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    wnids_file = os.path.join(root, "wnids.txt")
    if os.path.isfile(wnids_file):
        with open(wnids_file) as f:
            wnids = sorted({line.strip() for line in f if line.strip()})
    else:
        wnids = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not wnids:
        raise UsageError(f"TinyImageNet: no classes found in {train_dir}; check --data-dir")
    if len(wnids) > max_classes:
        raise UsageError(f"TinyImageNet: {len(wnids)} classes found in {root}, at most {max_classes} expected")
    class_index = {wnid: i for i, wnid in enumerate(wnids)}

    train = []
    for wnid in wnids:
        images = os.path.join(train_dir, wnid, "images")
        if not os.path.isdir(images):
            raise UsageError(f"TinyImageNet: missing folder {images} (class {wnid}); check --data-dir")
        train += [(os.path.join(images, f), class_index[wnid]) for f in _image_files(images)]

    annotations, images = os.path.join(val_dir, "val_annotations.txt"), os.path.join(val_dir, "images")
    if not (os.path.isfile(annotations) and os.path.isdir(images)):
        raise UsageError(f"TinyImageNet: expected {annotations} and {images}; check --data-dir")
    present = set(os.listdir(images))
    test = []
    with open(annotations) as f:
        for n, line in enumerate(f, 1):
            fields = line.strip().split("\t")
            if fields == [""]:
                continue
            if len(fields) < 2 or fields[1] not in class_index or fields[0] not in present:
                raise UsageError(f"TinyImageNet: {annotations} line {n} names an unknown class or a missing "
                                 f"image: {line.strip()!r}")
            test.append((os.path.join(images, fields[0]), class_index[fields[1]]))
    if not train or not test:
        raise UsageError(f"TinyImageNet: no images found under {root}; check --data-dir")
    train_tf = _flip_crop_transforms(T.RandomCrop(64, padding=4))
    return ImageListDataset(train, train_tf), ImageListDataset(test, T.ToTensor())


def _imagenet_datasets(data_dir, max_classes):
    from torchvision import datasets, transforms as T
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise UsageError(f"ImageNet not found: expected the folder {d} (one sub-folder per class); "
                             f"pass --data-dir DIR where DIR contains train/ and val/")
    train_tf = _flip_crop_transforms(T.RandomResizedCrop(224))
    test_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    try:
        train, test = datasets.ImageFolder(train_dir, train_tf), datasets.ImageFolder(val_dir, test_tf)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise UsageError(f"ImageNet: {e}; train/ and val/ under --data-dir must both hold one folder "
                         f"per class") from None
    if train.class_to_idx != test.class_to_idx:
        raise UsageError(f"ImageNet: the class folders of {train_dir} and {val_dir} differ; labels would not match")
    if len(train.classes) > max_classes:
        raise UsageError(f"ImageNet: {len(train.classes)} classes in {train_dir}, at most {max_classes} expected")
    return train, test


class TensorImageDataset(Dataset):
    """In-memory images (N, C, H, W) in [0, 1] with labels; optional random-shift and flip augmentation.

    padding: pixels of zero padding for a random crop back to (H, W), i.e. a random shift of at most
    `padding` pixels in each direction. flip: then a random horizontal flip (FashionMNIST16; never for Digits: it
    would turn some digits into other symbols). Crop offsets and flips come from torch's global RNG (seeded per
    DataLoader worker by the loader's generator); without `flip` no flip is drawn.
    """

    def __init__(self, images, labels, padding=0, flip=False):
        self.images, self.labels, self.padding, self.flip = images, labels, padding, flip
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        img = self.images[index]  # (C, H, W)
        if self.padding:
            p = self.padding
            h, w = img.shape[-2:]
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            img = F.pad(img, (p, p, p, p))[:, top:top + h, left:left + w]  # (C, H, W)
        if self.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, int(self.labels[index])


@lru_cache(maxsize=2)
def _digits_tensors(size=32):
    """scikit-learn's 1797 8x8 digits as (N, 3, size, size) in [0, 1], split 80/20 stratified with seed 0.

    The split is fixed (independent of --seed) so that every run is evaluated on the same 360 images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # pixel values are 0..16
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)  # (N, 1, size, size)
    x = x.expand(-1, 3, -1, -1).contiguous()  # (N, 3, size, size), grey -> RGB so RGB models apply unchanged
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=0,
                                           stratify=digits.target)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _digits_datasets(size=32):
    """Training shifts of up to 2 pixels at 32x32 (1 at 16x16): the same share of the image."""
    x_train, y_train, x_test, y_test = _digits_tensors(size)
    return TensorImageDataset(x_train, y_train, padding=size // 16), TensorImageDataset(x_test, y_test)


# --------------------------------------------------------------------------------------------------------------
# Sampler and loaders
# --------------------------------------------------------------------------------------------------------------

class EpochSampler(Sampler):
    """Deterministic, resumable, distributed-aware order over `n` indices.

    The epoch's global order is `torch.randperm(n)` from a generator seeded with
    `runtime.order_seed(seed, epoch)` (or `range(n)` without shuffle). With `world_size > 1` rank r takes
    `order[r::world_size]`; with `pad` the order is first extended by repeating its head (like
    DistributedSampler) so every rank gets the same count, with `drop_last` its tail is cut instead, and with
    neither (`pad=False`, for evaluation) the counts sum exactly to n. With `block` > 1 (evaluation only: needs
    `pad=False`) rank r takes whole blocks of `block` consecutive indices of the order, blocks r,
    r + world_size, ...: with `block` equal to the loader's batch size every batch holds the same images as the single-process batch of the same number.
    `set_start` skips the first indices of this rank's order to resume mid-epoch; `len()` is the number of
    indices still to come.
    """

    def __init__(self, n, *, shuffle, seed, rank=0, world_size=1, drop_last=False, pad=True, block=1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range for world_size {world_size}")
        if block < 1 or (block > 1 and (pad or drop_last)):
            raise ValueError(f"block={block}: must be >= 1, and only blocks of 1 can be padded or dropped")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.pad = rank, world_size, drop_last, pad
        self.block = block
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch):
        """Select epoch `epoch`'s order and restart from its first index."""
        self.epoch, self.start = epoch, 0

    def set_start(self, batch_index, batch_size):
        """Skip the first `batch_index * batch_size` indices of this rank's order (until the next set_epoch)."""
        if batch_index < 0 or batch_size < 1:
            raise ValueError(f"bad resume point: batch {batch_index} of size {batch_size}")
        self.start = batch_index * batch_size

    def _rank_indices(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(order_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        ws = self.world_size
        if ws > 1 and self.drop_last:
            order = order[:self.n // ws * ws]
        elif ws > 1 and self.pad and self.n % ws:
            missing = ws - self.n % ws
            order += (order * (missing // max(self.n, 1) + 1))[:missing]  # repeat the head, cycling if n < ws
        b = self.block
        return [i for start in range(self.rank * b, len(order), ws * b) for i in order[start:start + b]]

    def _rank_count(self):
        ws, n, b = self.world_size, self.n, self.block
        if self.drop_last:
            return n // ws
        if self.pad:
            return -(-n // ws)
        blocks = -(-n // b)
        mine = range(self.rank, blocks, ws)
        short = blocks * b - n if mine and mine[-1] == blocks - 1 else 0  # this rank holds the last, short block
        return len(mine) * b - short

    def __iter__(self):
        return iter(self._rank_indices()[self.start:])

    def __len__(self):
        return max(0, self._rank_count() - self.start)


def _is_cuda(device):
    return torch.device(device).type == "cuda"


def without_augmentation(train_ds, test_ds):
    """The training images with the test-time transform (for a validation split held out of them)."""
    view = copy.copy(train_ds)
    if isinstance(view, TensorImageDataset):
        view.padding, view.flip = 0, False
    else:
        view.transform = test_ds.transform
    return view


class TrainingProbe:
    """A fixed sample of training images, to see the router as evaluation sees them (`plain`, without
    augmentation) and as training sees them (`augmented()`, a fresh training-transform draw of the same images).

    Used by load balancing (`utils.balance.RouterUpkeep`) and the per-epoch routing report. The sample is the
    first `n` images of a permutation seeded with `seed`; images are (n, C, H, W) in [0, 1] on the CPU.
    """

    def __init__(self, train_ds, test_ds, n=256, seed=0):
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed))
        self.indices = order[:n].tolist()
        self.train_ds = train_ds
        plain = without_augmentation(train_ds.dataset, test_ds) if isinstance(train_ds, Subset) else \
            without_augmentation(train_ds, test_ds)
        if isinstance(train_ds, Subset):
            plain = Subset(plain, train_ds.indices)
        self.plain = torch.stack([plain[i][0] for i in self.indices])  # (n, C, H, W)
        self._plain_train = plain

    def class_means(self, num_classes, batch_size=256):
        """Every class's mean training image without augmentation, over the whole training split: (K, C*H*W)
        (`--router-targets partition`); a class without images gets zeros."""
        sums, counts = None, torch.zeros(num_classes, dtype=torch.float64)
        for images, labels in DataLoader(self._plain_train, batch_size=batch_size):
            flat = images.flatten(1).double()
            sums = torch.zeros(num_classes, flat.shape[1], dtype=torch.float64) if sums is None else sums
            sums.index_add_(0, labels, flat)
            counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        return sums / counts.clamp(min=1)[:, None]

    def augmented(self):
        """The same images through the training transform (torch's RNG forked: training's draws are unchanged)."""
        with torch.random.fork_rng(devices=[]):
            return torch.stack([self.train_ds[i][0] for i in self.indices])  # (n, C, H, W)


def split_indices(n, data_fraction, seed=0):
    """(train, val) index lists: a fixed random `data_fraction` of range(n) for training, the rest held out.

    The split uses its own seed (not --seed), so runs with different seeds select models on the same images.
    """
    if not 0 < data_fraction <= 1:
        raise UsageError(f"--data-fraction must be in (0, 1], got {data_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = n if data_fraction >= 1 else max(1, min(n - 1, int(round(data_fraction * n))))
    return sorted(order[:n_train]), sorted(order[n_train:])


@dataclass(frozen=True)
class LoaderConfig:
    """Which data a run loads, and how (the data flags of a run)."""
    dataset: str
    data_dir: str
    batch_size: int
    test_batch_size: int
    num_workers: int
    seed: int
    data_fraction: float = 1.0  # < 1: the rest of the training set is the validation split
    download: bool = True

    @classmethod
    def from_args(cls, args, data_fraction=None):
        """From the parsed flags; `data_fraction` replaces `--data-fraction` (evaluation: 1, no split)."""
        return cls(args.dataset, args.data_dir, args.batch_size, args.test_batch_size, args.num_workers, args.seed,
                   args.data_fraction if data_fraction is None else data_fraction)


def build_loaders(cfg: LoaderConfig, device, rank=0, world_size=1):
    """(train_loader, val_loader, test_loader, info) for `cfg.dataset`, for process `rank` of `world_size`.

    The train loader shuffles with `EpochSampler(seed=seed)`, padded so every rank sees the same number of
    batches; the last batch may be smaller. Callers must call `train_loader.sampler.set_epoch(epoch)` every
    epoch (then optionally `set_start(batch, batch_size)` to resume). With `data_fraction` < 1 the rest of
    the training set, without augmentation, is the validation loader used for model selection (else None).
    Validation and test sets are split across ranks by whole batches without padding: rank r gets batches
    r, r + world_size, ... of the single-process loader, image for image, and the counts sum exactly to
    the set's size. `device` only decides pin_memory. Worker seeds come from a generator seeded with `seed`, so
    augmentation is reproducible for a given (seed, num_workers).
    """
    info = dataset_info(cfg.dataset)
    train_ds, test_ds = build_datasets(cfg.dataset, cfg.data_dir, download=cfg.download)
    train_idx, val_idx = split_indices(len(train_ds), cfg.data_fraction)
    seed, test_batch_size = cfg.seed, cfg.test_batch_size
    val_ds = Subset(without_augmentation(train_ds, test_ds), val_idx) if val_idx else None
    if val_idx:
        train_ds = Subset(train_ds, train_idx)
    common = dict(num_workers=cfg.num_workers, pin_memory=_is_cuda(device), persistent_workers=cfg.num_workers > 0)

    def eval_loader(ds, split):
        sampler = EpochSampler(len(ds), shuffle=False, seed=seed, rank=rank, world_size=world_size, pad=False,
                               block=test_batch_size)
        return DataLoader(ds, batch_size=test_batch_size, sampler=sampler, drop_last=False,
                          generator=torch.Generator().manual_seed(loader_seed(seed, split)), **common)

    train_sampler = EpochSampler(len(train_ds), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=train_sampler, drop_last=False,
                              generator=torch.Generator().manual_seed(loader_seed(seed, "train")), **common)
    val_loader = eval_loader(val_ds, "val") if val_ds is not None else None
    test_loader = eval_loader(test_ds, "test")
    for loader, split in ((train_loader, "training"), (test_loader, "test")):
        check_has_batches(loader, f"{cfg.dataset} {split} split in {cfg.data_dir}")
    return train_loader, val_loader, test_loader, info


def check_has_batches(loader, what):
    """UsageError when `loader` gives no batch at all: a dataset of 0 images, or one smaller than a batch with
    `drop_last` (an epoch would do nothing and report a loss of 0). `what` names the data in the message."""
    n = len(loader.dataset)
    if n == 0:
        raise UsageError(f"{what}: it holds 0 images")
    if loader.drop_last and n < loader.batch_size:
        raise UsageError(f"{what}: {n} images, fewer than one batch of {loader.batch_size}, and the last short "
                         f"batch is dropped (drop_last): no batch at all")
