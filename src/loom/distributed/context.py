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
SPIN_S = 0.005  # how long a CPU rank with a core of its own polls a collective before it blocks


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
    cpu_affinity: str  # auto or none (see share_cores)
    comm_wait: str  # auto, poll or block (see spin_budget)


def _usable_cores() -> list[int]:
    """The cores this process may run on (a scheduler's cgroup or taskset respected)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def threads_per_rank(local: int) -> int:
    """Compute threads each of a host's ``local`` CPU ranks runs with (:func:`share_cores`):
    ``OMP_NUM_THREADS`` where the user set it, else the usable cores over the local ranks, at least one."""
    if "OMP_NUM_THREADS" in os.environ:
        try:
            return max(1, int(os.environ["OMP_NUM_THREADS"]))
        except ValueError:  # a nested list ("4,2"): what torch made of it
            return torch.get_num_threads()
    return max(1, len(_usable_cores()) // max(1, local))


def share_cores(device: torch.device, affinity: str = "auto") -> list[int]:
    """CPU ranks of one host split its cores; returns the cores this rank may run on.

    Each rank computes with cores / local ranks threads (at least one), unless
    ``OMP_NUM_THREADS`` says otherwise: torch's default is one thread per core in every
    process, so N ranks would run N times as many threads as cores and slow each other down
    (torchrun sets ``OMP_NUM_THREADS=1``; loom's own launcher does not go through it). With
    ``affinity="auto"`` and no more local ranks than cores, the calling thread of local rank r
    is also pinned to its own slice ``cores[r k : (r+1) k]``, k = cores / ranks, of the cores it
    was given (a scheduler's cgroup or taskset is respected), and so are the threads it starts
    later (torch's compute threads), so two ranks' compute never shares a core. Threads that
    exist already keep their placement: :func:`init_distributed` calls this after its process
    groups exist, so the backend's threads that move messages (gloo's loops) stay free to run
    wherever a core idles instead of queueing behind their own rank's compute. On 2 cores, the
    tensor-parallel bench job through ``loom train`` at tp 2: 8,657 tokens/s (medians of 4 runs)
    with the backend's threads pinned beside their rank, 9,196 with them free, 8,687 with nothing
    pinned; DDP within 1%, a 2-stage 1F1B pipeline 1.4% slower free (17,040 against 17,275:
    within this host's spread). More ranks than cores, or ``"none"``: the OS places them.
    """
    cores = _usable_cores()
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return cores
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    share = threads_per_rank(local)
    if affinity == "auto" and 1 < local <= len(cores) and hasattr(os, "sched_setaffinity"):
        cores = cores[rank * share : (rank + 1) * share]
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(share)
    return cores


def spin_budget(device: torch.device, backend: str, wait: str = "auto") -> float:
    """Seconds a wait for a collective polls before blocking (:func:`loom.distributed.comm.settle`).

    ``"auto"``: :data:`SPIN_S` for CPU ranks over gloo with no more local ranks than cores (each
    has a core of its own, idle while it waits), else 0: ranks that share cores would take each
    other's time, and on CUDA the waits are the streams'. ``"poll"``: :data:`SPIN_S` for every CPU
    rank over gloo, however many share the cores; ``"block"``: 0. A call whose wait finds the cores
    busy with the backend's own work blocks under every choice (``Comm.all_reduce(poll=False)``:
    DDP's gradient buckets, :mod:`loom.parallel.ddp`).
    """
    if wait == "block" or device.type != "cpu" or backend != "gloo":
        return 0.0
    if wait == "poll":
        return SPIN_S
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return SPIN_S if local <= len(_usable_cores()) else 0.0


@dataclass
class Attempt:
    """One start of an elastic job's ranks (torchrun, ``loom train --nproc``): the agent's store,
    and which start this is, the same number on every rank of it.

    Each rank adds 1 to ``loom/starts`` as it begins, and every rank of a start begins before
    any of the next (the agent stops them all first), so start k's ranks draw the values
    k W + 1 .. (k + 1) W: ``number = (value - 1) // W``. TORCHELASTIC_RESTART_COUNT cannot say
    this: each node's agent counts its own restarts, and one restarts without counting when
    another node rejoins. The number names a fresh key space for the process group
    (``loom/attempt_N/``): after a restart the agent may serve the new ranks from the same
    store, where the failed start's keys (each rank's gloo address) would still be read.
    (A rank that died before drawing its number would shift the next starts' count.)
    """

    store: dist.Store
    number: int
    world_size: int

    @property
    def prefix(self) -> str:
        return f"loom/attempt_{self.number}"

    def keys(self) -> dist.Store:
        """This start's own key space of the agent's store."""
        return dist.PrefixStore(self.prefix, self.store)

    @classmethod
    def join(cls, timeout: timedelta = timedelta(seconds=60)) -> Attempt | None:
        """This rank's start, under an elastic agent's store; None elsewhere (env:// as usual)."""
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return None
        world = int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
        )
        return cls(store, (store.add("loom/starts", 1) - 1) // world, world)


def init_distributed(cfg: ProcessRequest, device_spec: str = "auto", attempt: Attempt | None = None) -> DistContext:
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
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        timeout = timedelta(seconds=cfg.timeout_s + BACKSTOP_S)
        if attempt is not None:  # this start's own keys (Attempt)
            dist.init_process_group(backend, store=attempt.keys(), rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    ledger = Ledger(rank)
    mesh = init_device_mesh(device.type, dims.sizes(), mesh_dim_names=DIM_ORDER)
    spin_s = spin_budget(device, backend, cfg.comm_wait)  # before pinning narrows the cores it counts
    share_cores(device, cfg.cpu_affinity)  # after the groups: their message threads stay unpinned
    comms = {
        dim: Comm(dim, mesh.get_group(dim), dims.group_ranks(dim, rank), ledger, spin_s=spin_s) for dim in DIM_ORDER
    }
    comms["world"] = Comm("world", None, list(range(world_size)), ledger, spin_s=spin_s)
    return DistContext(dims, rank, device, ledger, comms, backend)
