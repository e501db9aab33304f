"""The fast path on CUDA: device-resident data with on-device augmentation, backend flags, torch.compile, mixed
precision (`Precision`).

Nothing here changes results on CPU unless asked for: `configure_backends` leaves every flag alone there (the
channels-last layout only with `--channels-last`), the resident loader works on any device (the tests run it on
CPU), and `maybe_compile` is off unless asked for.

Device-resident loading: CIFAR-10/100 (50,000 x 3 x 32 x 32 uint8 = 147 MiB), Fashion-MNIST (60,000 x 3 x 28 x 28
uint8 = 135 MiB) and Digits fit in GPU memory
many times over, so the whole split is copied to the device once and every batch is gathered there:
no worker processes, no host-to-device copy per batch. The order is the CPU loader's own `EpochSampler`
(same (seed, epoch) order, same `set_epoch`/`set_start` interface, same distributed split), and the
augmentation of the CPU path (zero padding + random crop, horizontal flip except for Digits) is done on
the device by one gather per batch. Its random numbers are drawn on the CPU from a generator seeded with
(seed, epoch), one crop offset and flip per image of the dataset, so an epoch's batches do not depend on
where it was resumed, nor on the device.
"""
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import Subset

from models.layers import MoEConv2d
from models.spec import is_moe
from .data import TensorImageDataset
from .errors import UsageError
from .runtime import augment_seed


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation of a resident loader: `padding` pixels of zero padding for the random crop (0: no
    crop) and a random horizontal flip (`flip`). The default is none."""
    padding: int = 0
    flip: bool = False


# Augmentation of each dataset's training split, as in utils/data.py.
RESIDENT_AUGMENTATION = {"CIFAR10": Augmentation(4, True), "CIFAR100": Augmentation(4, True),
                         "Digits": Augmentation(2, False), "Digits16": Augmentation(1, False),
                         "FashionMNIST": Augmentation(2, True), "FashionMNIST16": Augmentation(1, True)}


def fits_on_device(name: str) -> bool:
    """Whether dataset `name` has a device-resident loader (small enough for any GPU)."""
    return name in RESIDENT_AUGMENTATION


def _raw_tensors(dataset):
    """(images (N, C, H, W) uint8 or float in [0, 1], labels (N,) long) of a dataset, without transforms.

    Knows TensorImageDataset (Digits, FashionMNIST16), torchvision's CIFAR10/100 (`.data` (N, H, W, C) uint8,
    `.targets`), its FashionMNIST (`.data` (N, H, W) uint8 grey, copied to three channels as its transforms do)
    and Subsets of them.
    """
    if isinstance(dataset, Subset):
        images, labels = _raw_tensors(dataset.dataset)
        index = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return images[index], labels[index]
    if isinstance(dataset, TensorImageDataset):
        return dataset.images, torch.as_tensor(dataset.labels, dtype=torch.long)
    data = getattr(dataset, "data", None)
    if data is not None and hasattr(dataset, "targets") and getattr(data, "ndim", 0) == 4:
        images = torch.as_tensor(data)
        if images.shape[-1] in (1, 3):  # (N, H, W, C) as torchvision's CIFAR stores it
            images = images.permute(0, 3, 1, 2)
        return images.contiguous(), torch.as_tensor(list(dataset.targets), dtype=torch.long)
    if data is not None and hasattr(dataset, "targets") and getattr(data, "ndim", 0) == 3:  # (N, H, W) grey
        images = torch.as_tensor(data)[:, None].expand(-1, 3, -1, -1)  # (N, 3, H, W)
        return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long)
    raise TypeError(f"no device-resident form for {type(dataset).__name__}: needs in-memory images")


def crop_flip(images, top, left, flip, padding):
    """Random crop of zero-padded images and optional horizontal flip, as one gather.

    images (B, C, H, W); top, left (B,) offsets in [0, 2 * padding] into the padded image; flip (B,) bool.
    Same result as torchvision's RandomCrop(H, padding) at those offsets followed by a flip where `flip`.
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)  # (B, C, H+2p, W+2p)
    rows = top[:, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = torch.arange(w, device=images.device).expand(b, w)  # (B, W)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # (B, W), flipped where asked
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))  # (B, C, H, W+2p)
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


class ResidentLoader:
    """Batches (x, y) of an in-memory dataset held on `device`; a drop-in for utils.data's DataLoaders.

    Args:
        images: (N, C, H, W) uint8 (scaled by 1/255 per batch) or float in [0, 1].
        labels: (N,) class indices.
        sampler: an `EpochSampler` (or any sampler of indices into the N images); `loader.sampler` is it.
        batch_size: images per batch; the last batch may be smaller.
        augmentation: the training augmentation (`Augmentation`: crop padding, flip); default none.
        seed: seeds the augmentation stream with the sampler's epoch.
        memory_format: of the yielded images (torch.channels_last for channels-last models).
    Iterating yields x (B, C, H, W) float32 in [0, 1] and y (B,) long, both on `device`.
    """

    def __init__(self, images, labels, sampler, batch_size, device, *, augmentation=Augmentation(), seed=0,
                 memory_format=torch.contiguous_format):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.sampler, self.batch_size = sampler, batch_size
        self.augmentation, self.seed = augmentation, seed
        self.memory_format = memory_format

    def __len__(self):
        return -(-len(self.sampler) // self.batch_size)

    def _augmentation(self):
        """Per-image (top, left, flip) of this epoch, indexed by dataset index; None without augmentation."""
        padding, flip = self.augmentation.padding, self.augmentation.flip
        if not (padding or flip):
            return None
        n = len(self.labels)
        g = torch.Generator().manual_seed(augment_seed(self.seed, getattr(self.sampler, "epoch", 0)))
        shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
        return shifts[0].to(self.device), shifts[1].to(self.device), flips.to(self.device)

    def _batch(self, index, aug):
        x = self.images[index]  # (B, C, H, W)
        if aug is not None:
            top, left, flip = (a[index] for a in aug)
            x = crop_flip(x, top, left, flip, self.augmentation.padding)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return x.contiguous(memory_format=self.memory_format), self.labels[index]

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler), dtype=torch.long).to(self.device)
        aug = self._augmentation()
        for start in range(0, len(order), self.batch_size):
            yield self._batch(order[start:start + self.batch_size], aug)


def resident_loader(loader, device, *, augmentation=Augmentation(), seed=0, memory_format=torch.contiguous_format):
    """A `ResidentLoader` over the dataset of DataLoader `loader`, with its sampler and batch size."""
    images, labels = _raw_tensors(loader.dataset)
    return ResidentLoader(images, labels, loader.sampler, loader.batch_size, device, augmentation=augmentation,
                          seed=seed, memory_format=memory_format)


def resident_loaders(name, loaders, device, seed, memory_format=torch.contiguous_format):
    """(train, val, test) DataLoaders from `utils.data.build_loaders` -> device-resident loaders.

    The training loader gets dataset `name`'s augmentation (see RESIDENT_AUGMENTATION), the others none;
    None entries stay None. Build the CPU loaders with num_workers=0: their workers are never used.
    """
    if not fits_on_device(name):
        raise ValueError(f"{name} has no device-resident loader (only {', '.join(RESIDENT_AUGMENTATION)})")
    train, *rest = loaders
    out = [resident_loader(train, device, augmentation=RESIDENT_AUGMENTATION[name], seed=seed,
                           memory_format=memory_format)]
    out += [None if lo is None else resident_loader(lo, device, memory_format=memory_format) for lo in rest]
    return tuple(out)


@dataclass(frozen=True)
class BackendConfig:
    """What `configure_backends` switched on."""
    cudnn_benchmark: bool = False
    channels_last: bool = False
    tf32: bool = False
    deterministic: bool = False


def _has_sparse_moe(model) -> bool:
    return is_moe(model) and bool(getattr(model, "sparse", False))


def deterministic_backends():
    """Deterministic CUDA kernels (`--deterministic`): cuDNN's deterministic algorithms without autotuning,
    cuBLAS with a fixed workspace, `torch.use_deterministic_algorithms`. Ops without a deterministic CUDA kernel
    warn instead of failing (`warn_only`): in these models adaptive average pooling's backward and the router
    bias re-centring's median, which here add one value per element and pick a median value, so their results do
    not depend on the order of the atomics. Call before the first CUDA matmul (cuBLAS reads the variable once).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# On CPU, oneDNN's convolutions with this many output channels or more run slower in channels-last than in the
# default layout, by far on small images (measured on this project's Xeon, one thread, batch 128, 3x3 forward:
# 2x2 images 1.10x slower at 200 channels, 1.6x at 224, 2.1x at 256, 3.5x at 512; 4x4: 0.84x at 200, 1.08x at
# 224, 1.26x at 256); narrower ones run faster (16x16, 32 channels: 1.35x faster forward, 1.4x input and weight
# gradient).
CPU_CHANNELS_LAST_BELOW = 224


def _input_layout(memory_format):
    def hook(module, args):
        return (args[0].contiguous(memory_format=memory_format), *args[1:])
    return hook


def cpu_conv_layouts(model, below=CPU_CHANNELS_LAST_BELOW):
    """`--channels-last` on CPU, in place: every conv of `model` (MoE convs too) with fewer than `below` output
    channels (per expert) in channels-last, the wider ones in the default layout, each conv's input turned into
    its own layout first (a forward pre-hook; a no-op where the layouts already agree, a copy where they change:
    in ResNet-18 CIFAR at r = 0.5 once, before layer4). The same function, other rounding than the default layout."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, MoEConv2d)):
            layout = torch.channels_last if m.out_channels < below else torch.contiguous_format
            m.to(memory_format=layout)
            m.register_forward_pre_hook(_input_layout(layout))
    return model


def configure_backends(device, model, *, channels_last=None, tf32=True, deterministic=False) -> BackendConfig:
    """Set the CUDA backend flags for `model` and convert it (in place) to channels_last (`channels_last` None: on
    CUDA yes, on CPU no). On CPU only the layout can change (`--channels-last`, `cpu_conv_layouts`: channels-last
    for the convs narrower than CPU_CHANNELS_LAST_BELOW channels, where oneDNN's convolutions are faster in it), with
    other rounding than the default layout (so other weights after training).

    cudnn.benchmark autotunes every new input shape. The sparse MoE runs each expert on a sub-batch whose
    size changes every batch (any of 0..B per layer and expert), so benchmark would re-autotune almost every
    step for the first epochs; padding groups into buckets would fix the shapes but add FLOPs and touch the
    BatchNorm statistics. We keep benchmark off for sparse MoE models (cuDNN's heuristics pick the
    algorithms) and on for dense models and the dense-masked MoE, whose shapes are fixed.
    tf32: TF32 tensor-core matmuls and convolutions (float32 accuracy of ~1e-3 relative, as under AMP).
    Feed channels_last inputs too (`ResidentLoader(memory_format=torch.channels_last)`).
    deterministic: `deterministic_backends()` (benchmark off).
    """
    device = torch.device(device)
    if device.type != "cuda":
        if channels_last:
            cpu_conv_layouts(model)
        return BackendConfig(channels_last=bool(channels_last))
    channels_last = channels_last is not False
    if deterministic:
        deterministic_backends()
    benchmark = not (_has_sparse_moe(model) or deterministic)
    torch.backends.cudnn.benchmark = benchmark
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return BackendConfig(cudnn_benchmark=benchmark, channels_last=channels_last, tf32=tf32,
                         deterministic=deterministic)


@contextmanager
def backend_flags(config: BackendConfig):
    """cudnn autotuning as `config` (from `configure_backends`) says, for the duration; restored after.

    `configure_backends` sets the process-wide flag for the model it configures; code that runs several models in
    turn (utils/tools/benchmark.py) runs each under its own flag with this."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = config.cudnn_benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


# torch.compile traces a dense model's forward 5 times in a training run with evaluation (measured with a
# counting backend on CPU, tests/test_cuda_paths.py): TRADES' clean pass (BatchNorm statistics frozen), its adversarial
# pass, the attack (eval mode, input requiring grad), the attack's target and evaluation (eval, no grad), and
# evaluation under grad mode. Dynamo's default limit of 8 graphs per function is what a smaller last batch hit
# before (every variant traced again); the limit is raised to this on purpose, with margin.
COMPILE_RECOMPILE_LIMIT = 16


def maybe_compile(model, enabled, **compile_kwargs):
    """torch.compile a dense `model` in place (`nn.Module.compile`) when `enabled`; returns the model.

    In place, so the state-dict keys, the class and methods stay as they are (a `torch.compile(model)` wrapper
    would prefix every key with `_orig_mod.`). Shapes are dynamic from the first trace (`dynamic=True`), so a
    smaller last batch reuses the graphs, and Dynamo's recompile limit is raised to COMPILE_RECOMPILE_LIMIT.
    MoE models are refused (ValueError): the sparse MoE's expert groups are read on the host (a graph break per
    routing decision), and train/eval, grad mode, `frozen()` and the number of non-empty groups each force a
    new trace; AdvMoE's first step alone traced 17 graphs, past any sensible limit, after which Dynamo runs the
    model eagerly with one log line. `compile_kwargs` go to torch.compile (tests pass a counting backend).
    """
    if not enabled:
        return model
    if is_moe(model):
        raise ValueError("torch.compile supports dense models only here: an MoE's routing recompiles every batch")
    import torch._dynamo
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, name, max(getattr(config, name), COMPILE_RECOMPILE_LIMIT))
    compile_kwargs.setdefault("dynamic", True)
    model.compile(**compile_kwargs)
    return model


# Mixed precision
# ----------------------------------------------------------------------------------------------------------

def native_bf16(device: torch.device, capability=None) -> bool:
    """Whether CUDA `device` computes bf16 natively: compute capability 8.0 (Ampere) or later, or ROCm.

    `torch.cuda.is_bf16_supported()` also answers True where bf16 is only emulated (pre-Ampere GPUs), slow and
    without bf16 tensor cores. `capability` ((major, minor)) replaces the device's own (tests)."""
    if capability is None:
        if torch.version.hip:
            return True
        capability = torch.cuda.get_device_capability(device)
    return tuple(capability) >= (8, 0)


def grad_scaler():
    """fp16's gradient scaler: `torch.amp.GradScaler` from torch 2.3, `torch.cuda.amp.GradScaler` before."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


class Precision:
    """Mixed precision on CUDA: bf16 where the GPU computes it natively, else fp16 with a gradient scaler; off
    on CPU. `capability` ((major, minor)) replaces the GPU's compute capability (tests)."""

    def __init__(self, device: torch.device, amp: bool | None, capability=None):
        self.enabled = device.type == "cuda" if amp is None else bool(amp)
        if self.enabled and device.type != "cuda":
            raise UsageError("--amp needs a CUDA device")
        self.device_type = device.type
        self.dtype = None
        self.scaler = None
        if self.enabled:
            self.dtype = torch.bfloat16 if native_bf16(device, capability) else torch.float16
            if self.dtype == torch.float16:
                self.scaler = grad_scaler()

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else nullcontext()
