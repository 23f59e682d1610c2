"""Devices as data: peak FLOP/s, memory, and the links between devices.

A link is modelled alpha-beta (Hockney): moving n bytes over it takes alpha + n / beta
seconds. ``intra`` links join the devices of one node (NVLink, or shared memory between CPU
processes), ``inter`` links join nodes (InfiniBand / Ethernet: the per-device share of the
node's NICs). Peaks are dense (no sparsity) and per device.

Built-in entries come from the vendors' data sheets: H100 SXM 989 TFLOP/s bf16 dense, 67 fp32,
80 GB, NVLink 4 900 GB/s bidirectional (450 each way), one 400 Gb/s NIC per GPU; H200 the same
compute and links with 141 GB; A100 80 GB 312 TFLOP/s bf16, 19.5 fp32, NVLink 3 600 GB/s
(300 each way), one 200 Gb/s NIC per GPU.

``cpu`` is a host whose processes share its cores (``cores``; 0 for devices that compute on
their own, as GPUs do). Its peak is one core's; a process with k threads runs 1 + (k - 1) e
times one thread's speed (``thread_efficiency`` e), and processes beyond the cores take turns
on them (``loom.plan.layout.compute_seconds``). Dropout masks cost ``1 / dropout_rate`` seconds
per element drawn on top of the FLOPs: loom's mask (``loom.model.dropout``) takes one thread
~0.6 ns an element on the test host (0: free, as in a GPU's fused kernels; a second thread takes
a large mask only to ~0.5, so the model counts one). Recomputation costs more than
its FLOPs: the norms, activations, softmax and masks it runs again write the activations it had
dropped, at ``rewrite_bandwidth`` bytes per second of one thread (0: counted as FLOPs only, as
the GPU entries do until measured). Its figures are this host's, to calibrate (``loom plan
--calibrate RUN_DIR``, ``bench/plan_accuracy.py``).

A split backward's weight-gradient pass (W, zero-bubble) is matmuls alone, where the one
calibrated rate is the whole step's: FLOPs and the norms, activations, softmax and residual work
between them. So W runs ``weight_pass_speedup`` times that rate, fitted on a zero-bubble run's
measured passes (``loom.plan.report.calibrate_weight_pass``); the backward's total is unchanged, I
takes the rest. 1 where unmeasured, as on the GPU entries.

Each block a micro-batch passes through costs ``layer_overhead_s`` past its FLOPs: the
framework's dispatch of the forward's and backward's operations, the same for 1 or 100 rows and
not sped up by threads. A step of m micro-batches through a stage of L blocks pays m L of them, so
smaller micro-batches (pipelines, gradient accumulation) cost more than their FLOPs say. Fitted,
with the FLOP rate, on two runs that differ in micro-batches (``loom.plan.report.calibrate_overhead``);
0 where unmeasured.

More processes than cores in a pipeline also wait at every blocking collective or transfer: a
peer that has lost its core answers only when the scheduler gives it one again, and the stages
that wait on each other cannot fill the idle core (``loom.plan.comm``). With P processes on
C < P cores each such transfer waits ``turn_latency`` x (P / C - 1) seconds on average
(:meth:`turn_wait`: the processes queued per core ahead of the peer, one scheduler slice each),
fitted on such a run (``loom.plan.report.calibrate_turns``); 0 with a core per process.
A user adds entries in TOML, one table per device with these fields.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from loom.errors import LoomError

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops_bf16: float  # per device, dense
    peak_flops_fp32: float
    memory_bytes: float  # usable by one device (a CPU process: its share of the host)
    devices_per_node: int
    intra_bandwidth: float  # bytes/s each way, per device, within a node
    inter_bandwidth: float  # bytes/s each way, per device, between nodes
    intra_latency: float = 5e-6  # seconds per message
    inter_latency: float = 1e-5
    compute_efficiency: float = 0.5  # achieved / peak FLOP/s of the model's matmuls (calibrated: --calibrate)
    cores: int = 0  # cores a node's processes share (CPU hosts); 0: each device computes on its own
    thread_efficiency: float = 1.0  # each thread past a process's first adds this much of one thread's speed
    dropout_rate: float = 0.0  # dropout mask elements drawn per second and process; 0: free (fused)
    # bytes/s at which recomputation writes the activations it dropped again, past its FLOPs; 0: FLOPs only
    rewrite_bandwidth: float = 0.0
    turn_latency: float = 0.0  # seconds a blocking collective waits per process queued ahead of a peer (CPU hosts)
    # how many times the calibrated rate a split backward's weight-gradient pass (W) computes at; 1: the same
    weight_pass_speedup: float = 1.0
    layer_overhead_s: float = 0.0  # seconds per block and micro-batch past the FLOPs (forward and backward's dispatch)

    def peak_flops(self, precision: str) -> float:
        return self.peak_flops_fp32 if precision == "fp32" else self.peak_flops_bf16

    def threads(self, processes: int) -> int:
        """Compute threads of each of ``processes`` processes of one node (loom gives each
        cores / processes, at least one; ``loom.distributed.context.share_cores``)."""
        return max(1, self.cores // max(1, processes)) if self.cores else 1

    def thread_speedup(self, threads: int) -> float:
        """How much faster a process of ``threads`` threads computes than one of a single thread."""
        return 1 + (threads - 1) * self.thread_efficiency

    def speedup(self, processes: int) -> float:
        """How much faster than one thread each of a node's ``processes`` computes (1 off a CPU host)."""
        return self.thread_speedup(self.threads(processes)) if self.cores else 1.0

    def turn_wait(self) -> float:
        """Seconds each blocking collective or transfer waits for peers that lost their core:
        ``turn_latency`` x (P / C - 1) for a node's P processes on C < P cores, else 0."""
        if not self.cores or self.devices_per_node <= self.cores:
            return 0.0
        return self.turn_latency * (self.devices_per_node / self.cores - 1)


HARDWARE: dict[str, Hardware] = {
    "h100-sxm": Hardware("h100-sxm", 989e12, 67e12, 80 * GB, 8, 450 * GB, 50 * GB),
    "h200": Hardware("h200", 989e12, 67e12, 141 * GB, 8, 450 * GB, 50 * GB),
    "a100-80gb": Hardware("a100-80gb", 312e12, 19.5e12, 80 * GB, 8, 300 * GB, 25 * GB),
    "cpu": Hardware(
        "cpu",
        50e9,
        50e9,
        8 * GB,
        2,
        2 * GB,
        0.1 * GB,
        intra_latency=4e-4,  # gloo on loopback: a 64 KiB all-reduce of two processes takes 0.8 ms
        inter_latency=1e-3,
        compute_efficiency=1.0,
        cores=2,
        thread_efficiency=0.7,
        dropout_rate=1.6e9,  # loom.model.dropout.keep_mask on one thread: 0.6 ns an element here
        rewrite_bandwidth=1.8e9,
        turn_latency=2.5e-3,  # the test host: tp 2 x pp 2 on its 2 cores, 2.3-2.8 ms more per collective
        weight_pass_speedup=1.55,  # the test host: W 59 of the 305 ms a split pp 2 stage computed (plan_accuracy's job)
    ),
}


def load_hardware(name: str, path: str | Path | None = None) -> Hardware:
    """A built-in device, or one defined in the TOML file ``path`` (a table per device)."""
    known = dict(HARDWARE)
    if path is not None:
        known.update(read_hardware_file(Path(path)))
    if name not in known:
        raise LoomError(
            f"unknown device {name!r}.",
            f"use one of {', '.join(known)}, or define it in a TOML file given with --hardware-file.",
        )
    return known[name]


def read_hardware_file(path: Path) -> dict[str, Hardware]:
    if not path.is_file():
        raise LoomError(f"hardware file {path} does not exist.", "give the path of a TOML file of [device] tables.")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LoomError(
            f"hardware file {path} is not valid TOML: {exc}.", "fix the syntax at the position named."
        ) from None
    fields = {f.name for f in dataclasses.fields(Hardware)} - {"name"}
    out = {}
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise LoomError(f"[{name}] in {path} is not a table.", "write each device as a [name] table of fields.")
        unknown = set(table) - fields
        missing = (
            {f.name for f in dataclasses.fields(Hardware) if f.default is dataclasses.MISSING} - {"name"} - set(table)
        )
        if unknown or missing:
            raise LoomError(
                f"device [{name}] in {path}: "
                + (f"unknown fields {sorted(unknown)}" if unknown else f"missing {sorted(missing)}")
                + ".",
                f"fields: {', '.join(sorted(fields))}.",
            )
        out[name] = Hardware(
            name=name, **{k: int(v) if k in ("devices_per_node", "cores") else float(v) for k, v in table.items()}
        )
    return out


def hardware_of(
    device_type: str, device_name: str = "", local_processes: int | None = None, threads: int | None = None
) -> Hardware:
    """The built-in entry for a device a run uses: ``cpu``, or a GPU recognised by its name
    (H200, H100, A100; others are taken as an H100 SXM). For ``cpu``, the host a run's
    ``local_processes`` of ``threads`` threads each share (:func:`on_this_host`)."""
    if device_type != "cuda":
        return on_this_host(HARDWARE["cpu"], local_processes, threads)
    name = device_name.upper()
    for key, entry in (("H200", "h200"), ("H100", "h100-sxm"), ("A100", "a100-80gb")):
        if key in name:
            return HARDWARE[entry]
    return HARDWARE["h100-sxm"]


def on_this_host(hardware: Hardware, processes: int | None = None, threads: int | None = None) -> Hardware:
    """A CPU entry for ``processes`` processes sharing this machine's cores (all of them: their
    links are the host's). Processes told to use fewer threads than their share (``threads``,
    ``OMP_NUM_THREADS``) compute on ``threads`` x ``processes`` cores at most."""
    if not hardware.cores:
        return hardware
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = max(processes or 1, 1)
    if threads:
        cores = min(cores, threads * processes)
    return dataclasses.replace(hardware, cores=cores, devices_per_node=processes)
