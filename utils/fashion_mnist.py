"""Fashion-MNIST read offline from the four original IDX files, unpacked or gzipped, through torchvision's class.

torchvision's `datasets.FashionMNIST(root)` reads `root/FashionMNIST/raw/` with the files unpacked, and with
`download=True` fetches them there. A local copy often comes gzipped instead: Debian's package
`dataset-fashion-mnist` installs the four `*-ubyte.gz` files in /usr/share/datasets/fashion-mnist (and their
gzip headers differ from the downloaded ones, so torchvision's md5 check would reject them and go to the
network). `LocalFashionMNIST` is torchvision's class reading one folder that holds the files either way:
items (PIL 'L' images through the transform), `classes`, `data` and `targets` are torchvision's own.

Imported lazily by utils/data.py (it imports torchvision); the class lives at module level so that
DataLoader workers started with `spawn` can unpickle the dataset.
"""
import gzip
import os

import numpy as np
import torch
from torchvision import datasets

from .errors import UsageError

# Split (train: True) -> (images file, labels file), as the dataset's authors, torchvision and Debian name them.
FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
NAMES = FILES[True] + FILES[False]
IMAGE_SIDE = 28
NUM_CLASSES = 10
DEBIAN_FOLDER = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts them


def idx_path(folder, name):
    """Path of IDX file `name` in `folder`, unpacked or gzipped (`name.gz`, the unpacked one first); None if neither."""
    for path in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
        if os.path.isfile(path):
            return path
    return None


def missing_files(folder):
    """The names of the four files that `folder` holds neither unpacked nor gzipped."""
    return [name for name in NAMES if idx_path(folder, name) is None]


def candidate_folders(data_dir):
    """Where the files are looked for, in order: torchvision's layout (what its download writes), then `data_dir`
    itself (a flat folder such as Debian's)."""
    return [os.path.join(data_dir, "FashionMNIST", "raw"), data_dir]


def read_idx(path):
    """An IDX file of unsigned bytes (gzipped when the name ends in .gz) as a uint8 tensor of the header's shape.

    Raises UsageError naming the file when it cannot be read, is not IDX unsigned-byte data, or is truncated.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; EOFError: a cut gzip stream
        raise UsageError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    ndim = data[3] if len(data) >= 4 else 0
    # Header: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions, then each
    # dimension as a big-endian uint32.
    if data[:3] != b"\0\0\x08" or not 1 <= ndim <= 3 or len(data) < 4 + 4 * ndim:
        raise UsageError(f"{path}: not an IDX file of unsigned bytes (bad header)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UsageError(f"{path}: {body.size} bytes of pixels or labels where its header announces the shape "
                         f"{shape} (truncated or damaged)")
    return torch.from_numpy(body.reshape(shape).copy())


def read_split(folder, train):
    """(images (N, 28, 28) uint8, labels (N,) long) of one split from `folder`; UsageError if they do not fit."""
    image_name, label_name = FILES[train]
    image_path, label_path = idx_path(folder, image_name), idx_path(folder, label_name)
    if image_path is None or label_path is None:
        raise UsageError(f"Fashion-MNIST: {image_name} or {label_name} (unpacked or .gz) is missing in {folder}")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dim() >= 1 and len(images) == 0:
        raise UsageError(f"{image_path}: its header announces 0 images (an empty split can neither train nor test)")
    if images.dim() != 3 or tuple(images.shape[1:]) != (IMAGE_SIDE, IMAGE_SIDE):
        raise UsageError(f"{image_path}: images of shape {tuple(images.shape)}, expected (N, 28, 28)")
    if labels.dim() != 1 or len(labels) != len(images):
        raise UsageError(f"{label_path}: {tuple(labels.shape)} labels for the {len(images)} images of {image_path}")
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise UsageError(f"{label_path}: label {int(labels.max())} is not one of the 10 classes 0-9")
    return images, labels.long()


class LocalFashionMNIST(datasets.FashionMNIST):
    """torchvision's FashionMNIST over the IDX files in `folder`, unpacked or gzipped; it reads, never downloads.

    Only where the files are read from and how is changed; `folder` must hold the split's two files.
    """

    def __init__(self, folder, train=True, transform=None):
        self.folder = folder
        super().__init__(folder, train=train, transform=transform, download=False)

    @property
    def raw_folder(self):
        return self.folder

    def _check_legacy_exist(self):
        return False  # torchvision's old `processed/*.pt` cache: not ours to read

    def _check_exists(self):
        return all(idx_path(self.folder, name) for name in FILES[self.train])

    def _load_data(self):
        return read_split(self.folder, self.train)
