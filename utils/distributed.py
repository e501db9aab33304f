"""Multi-process training with torch.distributed, launched by torchrun (NCCL on GPUs, gloo on CPU).

Gradients are averaged with bucketed all-reduces after each backward, over the parameters of the
optimizer that steps (the same list on every rank). We do not wrap the model in DistributedDataParallel:
AdvMoE alternates which parameters train, and the attacks run many backward passes that must not
synchronise, both of which the DDP wrapper handles poorly; an explicit all-reduce gives the same update
(the mean gradient over all ranks' shards) with one reduction per update. A parameter without a gradient
on a rank (say, an expert that got no image there) contributes zeros, so no rank waits for another.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .errors import UsageError

BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, *, backend=None, timeout=None) -> tuple[DistEnv, torch.device]:
    """Join the torchrun process group if WORLD_SIZE > 1; returns (env, this rank's device).

    backend: default nccl on CUDA, gloo on CPU; timeout (a timedelta): how long a collective may wait for
    the slowest rank (default: torch's, 10 to 30 minutes).
    """
    world_size, rank, local_rank = launch_env()
    if world_size <= 1:
        return DistEnv(), device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistEnv(rank, world_size, local_rank), device


def _env_int(name, text, low):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise UsageError(f"environment variable {name}={text[:40]!r} must be a whole number >= {low}")
    return value


def launch_env() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from torchrun's environment variables, checked: UsageError (exit 2)
    for values that would crash or hang the process group (RANK missing or >= WORLD_SIZE, no MASTER_ADDR)."""
    world_size = _env_int("WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"), 1)
    if world_size == 1:
        return 1, 0, 0

    def required(name):
        if not os.environ.get(name):
            raise UsageError(f"{name} is not set, but WORLD_SIZE={world_size} asks for several processes: "
                             f"launch with torchrun, which sets it")
        return os.environ[name]
    rank = _env_int("RANK", required("RANK"), 0)
    if rank >= world_size:
        raise UsageError(f"RANK={rank} must be below WORLD_SIZE={world_size}")
    required("MASTER_ADDR")
    _env_int("MASTER_PORT", required("MASTER_PORT"), 1)
    return world_size, rank, _env_int("LOCAL_RANK", os.environ.get("LOCAL_RANK", "0"), 0)


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv, device=None) -> torch.Tensor:
    """Sum of `tensor` over ranks (a new tensor on the original device)."""
    if not env.enabled:
        return tensor
    t = tensor.detach().clone().to(device or tensor.device)
    dist.all_reduce(t)
    return t.to(tensor.device)


def any_rank(flag: bool, env: DistEnv, device) -> bool:
    """True on every rank if `flag` is True on some rank (agree on stopping)."""
    if not env.enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device), env).item() > 0)


def average_gradients(params, env: DistEnv):
    """Replace each parameter's .grad by the mean over ranks (missing grads count as zeros)."""
    if not env.enabled:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in params:
        bucket.append(p)
        size += p.numel() * p.element_size()
        if size >= BUCKET_BYTES:
            _reduce_bucket(bucket, env)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, env)


def _reduce_bucket(params, env):
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= env.world_size
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def broadcast_module(module: torch.nn.Module, env: DistEnv):
    """Make parameters and buffers (BatchNorm statistics) equal to rank 0's."""
    if not env.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj` as a list indexed by rank (on every rank)."""
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv):
    if env.enabled:
        dist.barrier()
