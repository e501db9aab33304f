"""The device-resident loader (run on CPU tensors), its on-device augmentation, and the backend helpers."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import models
from conftest import seeded
from utils.data import EpochSampler, LoaderConfig, TensorImageDataset, build_loaders
from utils.gpu import (CPU_CHANNELS_LAST_BELOW, Augmentation, BackendConfig, ResidentLoader, configure_backends,
                       crop_flip, fits_on_device, maybe_compile, resident_loader, resident_loaders)
from conftest import seeded


def _crop_flip_by_hand(img, top, left, flip, p):
    h, w = img.shape[-2:]
    out = F.pad(img, (p, p, p, p))[:, top:top + h, left:left + w]
    return out.flip(-1) if flip else out


def test_crop_flip_matches_pad_slice_flip():
    g = torch.Generator().manual_seed(seeded(0))
    x = torch.rand(6, 3, 7, 5, generator=g)
    p = 2
    top = torch.tensor([0, 4, 2, 1, 3, 4])
    left = torch.tensor([4, 0, 2, 3, 1, 0])
    flip = torch.tensor([False, True, False, True, True, False])
    out = crop_flip(x, top, left, flip, p)
    for i in range(6):
        assert torch.equal(out[i], _crop_flip_by_hand(x[i], top[i].item(), left[i].item(), flip[i].item(), p))


def test_crop_flip_uint8():
    x = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    out = crop_flip(x, torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]), torch.tensor([True, False, True]), 1)
    assert out.dtype == torch.uint8
    for i, (t, l, f) in enumerate([(0, 2, True), (1, 1, False), (2, 0, True)]):
        assert torch.equal(out[i], _crop_flip_by_hand(x[i], t, l, f, 1))


def _tiny(n=37, seed=0):
    g = torch.Generator().manual_seed(seeded(seed))
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _loader(padding=2, flip=True, n=37, batch_size=8, seed=3):
    images, labels = _tiny(n)
    sampler = EpochSampler(n, shuffle=True, seed=seed)
    return ResidentLoader(images, labels, sampler, batch_size, "cpu", augmentation=Augmentation(padding, flip),
                          seed=seed)


def _epoch(loader, epoch, start=None):
    loader.sampler.set_epoch(epoch)
    if start is not None:
        loader.sampler.set_start(start, loader.batch_size)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_resident_loader_deterministic_per_epoch():
    a, b = _loader(), _loader()
    e0, e0_again, e0_other = _epoch(a, 0), _epoch(a, 0), _epoch(b, 0)
    e1 = _epoch(a, 1)
    assert len(e0) == len(a) == 5  # ceil(37 / 8)
    assert [len(y) for _, y in e0] == [8, 8, 8, 8, 5]
    for (x0, y0), (x1, y1), (x2, y2) in zip(e0, e0_again, e0_other):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert not all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(e0, e1))


def test_resident_loader_order_is_the_samplers_and_resume_gives_the_same_batches():
    loader = _loader()
    images, labels = _tiny()
    full = _epoch(loader, 2)
    loader.sampler.set_epoch(2)
    order = list(loader.sampler)
    assert torch.equal(torch.cat([y for _, y in full]), labels[order])
    tail = _epoch(loader, 2, start=3)
    assert len(tail) == 2
    for (x0, y0), (x1, y1) in zip(full[3:], tail):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_resident_loader_images_are_shifted_copies_in_range():
    images, _ = _tiny()
    loader = _loader(padding=2, flip=False)
    loader.sampler.set_epoch(0)
    order = list(loader.sampler)
    xs = torch.cat([x for x, _ in loader])
    assert xs.dtype == torch.float32 and xs.shape == (37, 3, 8, 8)
    assert xs.min() >= 0 and xs.max() <= 1
    shifted = 0
    for x, i in zip(xs, order):
        matches = [(t, l) for t, l in itertools.product(range(5), range(5))
                   if torch.equal(x, _crop_flip_by_hand(images[i], t, l, False, 2))]
        assert matches, "every image must be a zero-padded crop of its source"
        shifted += (2, 2) not in matches
    assert shifted > 0  # augmentation happened


def test_no_augmentation_equals_the_dataloader():
    images, labels = _tiny()
    ds = TensorImageDataset(images, labels)
    sampler = EpochSampler(len(ds), shuffle=True, seed=5)
    cpu = DataLoader(ds, batch_size=8, sampler=sampler)
    res = resident_loader(cpu, "cpu")
    assert res.sampler is sampler and len(res) == len(cpu)
    sampler.set_epoch(4)
    for (x0, y0), (x1, y1) in zip(cpu, res):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


class _FakeCifar(torch.utils.data.Dataset):
    """torchvision's CIFAR layout: .data (N, H, W, 3) uint8 numpy, .targets list."""

    def __init__(self, n=10):
        g = torch.Generator().manual_seed(seeded(1))
        self.data = torch.randint(0, 256, (n, 6, 6, 3), dtype=torch.uint8, generator=g).numpy()
        self.targets = list(range(n))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.from_numpy(self.data[i]).permute(2, 0, 1).float() / 255, self.targets[i]


def test_uint8_cifar_layout_and_subset():
    ds = Subset(_FakeCifar(), [7, 2, 5, 0])
    cpu = DataLoader(ds, batch_size=3, sampler=EpochSampler(4, shuffle=False, seed=0))
    res = resident_loader(cpu, "cpu")
    assert res.images.dtype == torch.uint8  # kept compact on the device, scaled per batch
    for (x0, y0), (x1, y1) in zip(cpu, res):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_resident_loaders_for_digits():
    assert fits_on_device("CIFAR10") and fits_on_device("Digits") and not fits_on_device("ImageNet")
    loaders = build_loaders(LoaderConfig("Digits", "unused", batch_size=64, test_batch_size=100,
                                         num_workers=0, seed=0, data_fraction=0.9), "cpu")[:3]
    train, val, test = resident_loaders("Digits", loaders, "cpu", seed=0)
    assert train.augmentation == Augmentation(2, False) and val.augmentation == test.augmentation == Augmentation()
    assert len(train) == len(loaders[0]) and len(test) == len(loaders[2])
    for cpu, res in ((loaders[1], val), (loaders[2], test)):  # unaugmented: identical batches
        for (x0, y0), (x1, y1) in zip(cpu, res):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    train.sampler.set_epoch(0)
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,)
    with pytest.raises(ValueError):
        resident_loaders("ImageNet", loaders, "cpu", seed=0)


def test_backends_untouched_on_cpu():
    model = models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=2)
    before = torch.backends.cudnn.benchmark
    cfg = configure_backends(torch.device("cpu"), model)
    assert cfg == BackendConfig() and torch.backends.cudnn.benchmark == before
    assert model.conv1.weight.is_contiguous()
    assert maybe_compile(model, False) is model


def test_channels_last_on_cpu_only_when_asked():
    """--channels-last on CPU: the model's 4-D weights in channels-last, the same function (other rounding only);
    without it (None or False) the model stays as it was."""
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=2).eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    for flag in (None, False):
        assert configure_backends(torch.device("cpu"), model, channels_last=flag) == BackendConfig()
        assert model.conv1.weight.is_contiguous()
    cfg = configure_backends(torch.device("cpu"), model, channels_last=True)
    assert cfg == BackendConfig(channels_last=True)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_channels_last_on_cpu_keeps_wide_convs_in_the_default_layout():
    """Dense r = 0.5: layer4's 256-channel convs stay in the default layout (oneDNN is slower on them in
    channels-last), every narrower conv is channels-last; each conv sees its input in its own layout; the same
    function and input gradient as before."""
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_ori", ratio=0.5).eval()
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    before = model(x)
    (grad_before,) = torch.autograd.grad(before.sum(), x)
    configure_backends(torch.device("cpu"), model, channels_last=True)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    wide = {name for name, m in convs.items() if m.out_channels >= CPU_CHANNELS_LAST_BELOW}
    assert wide == {n for n in convs if n.startswith("layer4.")} and len(wide) == 5  # 4 3x3 convs, 1 shortcut
    for name, m in convs.items():
        k = m.weight.shape[-1]
        layout = torch.contiguous_format if name in wide else torch.channels_last
        assert k == 1 or m.weight.is_contiguous(memory_format=layout), name
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = args[0]
        return hook
    hooks = [m.register_forward_hook(record(name)) for name, m in convs.items()]
    after = model(x)
    for h in hooks:
        h.remove()
    for name, inp in seen.items():
        assert inp.is_contiguous(memory_format=torch.contiguous_format if name in wide else torch.channels_last), name
    (grad_after,) = torch.autograd.grad(after.sum(), x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_after, grad_before, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_maybe_compile_in_place_keeps_keys_and_outputs():
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_ori", ratio=0.125).eval()
    x = torch.rand(2, 3, 32, 32)
    keys, want = list(model.state_dict()), model(x)
    torch._dynamo.reset()
    out = maybe_compile(model, True, backend="eager")
    assert out is model and list(model.state_dict()) == keys
    assert torch.allclose(model(x), want, atol=1e-6)
    torch._dynamo.reset()
