"""The per-process handle on the distributed world, passed explicitly (no globals).

``DistContext`` holds this rank's coordinates, its device, one :class:`Comm` per
parallel dimension (cut from a ``DeviceMesh`` of shape (pp, dp, tp)) and the ledger that
counts every byte they send. A single process gets the same object with groups of size
one, whose collectives are no-ops, so the trainer has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from loom.distributed.comm import Comm, Ledger
from loom.distributed.mesh import DIM_ORDER, Coords, LayoutRequest, ParallelDims

BACKSTOP_S = 30.0  # the backend's timeout lags the watchdog's, so the watchdog reports first


@dataclass
class DistContext:
    dims: ParallelDims
    rank: int
    device: torch.device
    ledger: Ledger
    comms: dict[str, Comm] = field(default_factory=dict)
    backend: str = "none"

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def coords(self) -> Coords:
        return self.dims.coords(self.rank)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, checkpoints and the progress bar."""
        return self.rank == 0

    def comm(self, dim: str) -> Comm:
        """The counted communicator of ``dim``: "dp", "tp", "pp" or "world"."""
        return self.comms[dim]

    @classmethod
    def single(cls, device: torch.device) -> DistContext:
        ledger = Ledger(0)
        comms = {name: Comm(name, None, [0], ledger) for name in (*DIM_ORDER, "world")}
        return cls(ParallelDims(), 0, device, ledger, comms)

    def shutdown(self) -> None:
        """Barrier, then tear the process group down (gloo aborts without the barrier)."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def env_world_size() -> int:
    """The world size torchrun (or loom's launcher) announced, 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class ProcessRequest(LayoutRequest, Protocol):
    """What joining the world needs besides the sizes (``loom.config.ParallelConfig`` has it all)."""

    backend: str  # auto, gloo or nccl
    timeout_s: float


def share_cores(device: torch.device) -> int:
    """CPU ranks of one host split its cores: each computes with cores / local ranks threads
    (at least one), unless ``OMP_NUM_THREADS`` says otherwise. Returns the thread count.

    torch's default is one thread per core in every process, so N ranks on one host would
    run N times as many threads as cores and slow each other down; torchrun avoids that by
    setting ``OMP_NUM_THREADS=1``, which loom's own launcher does not go through.
    """
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local))
    return torch.get_num_threads()


def init_distributed(cfg: ProcessRequest, device_spec: str = "auto") -> DistContext:
    """Join the process group described by the torchrun environment and build the groups.

    CPU ranks share the host's cores (:func:`share_cores`). Backend: nccl when this rank drives a
    CUDA device, else gloo (``parallel.backend``
    overrides). A collective pending past ``parallel.timeout_s`` is caught by the
    watchdog (``loom.distributed.watchdog``), which reports it; the backend's own timeout is set
    a little later as a backstop.
    """
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dims = ParallelDims.resolve(cfg, world_size)
    use_cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda")
    device = (
        torch.device(f"cuda:{local_rank}")
        if use_cuda
        else torch.device("cpu" if device_spec == "auto" else device_spec)
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistContext.single(device)
    share_cores(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s + BACKSTOP_S))
    ledger = Ledger(rank)
    mesh = init_device_mesh(device.type, dims.sizes(), mesh_dim_names=DIM_ORDER)
    comms = {dim: Comm(dim, mesh.get_group(dim), dims.group_ranks(dim, rank), ledger) for dim in DIM_ORDER}
    comms["world"] = Comm("world", None, list(range(world_size)), ledger)
    return DistContext(dims, rank, device, ledger, comms, backend)
