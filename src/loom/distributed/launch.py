"""Start N local ranks without torchrun, through torch's elastic launcher.

``loom train --nproc N`` validates the config and the layout first, then runs
``python -m loom.cli train ...`` once per rank with the torchrun environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). When any rank fails the launcher
stops the others; the failure is reported with each rank's exit code.
"""

from __future__ import annotations

import socket
import sys
import uuid

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from loom.errors import LoomError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_local(nproc: int, cli_args: list[str]) -> None:
    """Run ``loom <cli_args>`` on ``nproc`` local ranks; returns when all have finished."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"loom-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", "-m", "loom.cli", *cli_args)
    except ChildFailedError as exc:
        failed = ", ".join(f"rank {rank} (exit code {f.exitcode})" for rank, f in sorted(exc.failures.items()))
        raise LoomError(
            f"the run failed on {failed}; the other ranks were stopped.",
            "read the first rank's message above (and any failure_rank*.txt in the run folder), fix it, and rerun "
            "with --resume to continue from the newest checkpoint.",
        ) from None
