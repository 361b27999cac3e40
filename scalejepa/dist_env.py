"""Process-group setup from torchrun's environment (or one plain process)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    """Reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun); initialises NCCL on GPUs
    and gloo on CPU. Errors are raised as they are: a failing rendezvous must stop the
    job, not fall back to one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timeout,
            device_id=dev if use_cuda else None,
            store=_attempt_store(world_size, timeout),
            rank=rank if _under_torchelastic() else -1,
            world_size=world_size if _under_torchelastic() else -1,
        )
    return DistEnv(rank, world_size, local_rank, dev)


def _under_torchelastic() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _attempt_store(world_size: int, timeout: datetime.timedelta):
    """Under torchrun, the agent's store with a prefix per restart attempt (None otherwise:
    env:// rendezvous). torchrun keeps one store across ``--max-restarts`` attempts, so
    without a prefix the workers of a restart can read the addresses that the failed
    attempt's workers left there, and connect to dead processes (seen with torch 2.13 and
    gloo: "Connection refused" on restart)."""
    if not _under_torchelastic():
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"scalejepa/attempt_{attempt}/", store)


def ensure_process_group(env: DistEnv) -> None:
    """FSDP2 and DeepSpeed need a process group even for one process (``python -m
    scalejepa.train ... distributed.backend=fsdp2`` on one GPU): a one-rank group over an
    in-memory store, no network."""
    if dist.is_initialized():
        return
    if env.world_size != 1:
        raise RuntimeError(f"world size {env.world_size} but no process group: call init_distributed first")
    dist.init_process_group(
        backend="nccl" if env.device.type == "cuda" else "gloo",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        device_id=env.device if env.device.type == "cuda" else None,
    )


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a new tensor; the input itself with no process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)  # SUM: gloo has no AVG
    return out / dist.get_world_size()


def barrier() -> None:
    """Wait for every rank. Called on the success path before shutdown: a rank that
    destroys its gloo group while a peer still finishes a collective can abort the peer
    ("terminate called without an active exception", seen 1 run in ~7)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

