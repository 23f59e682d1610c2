"""Start N local ranks without torchrun, through torch's elastic launcher.

``loom train --nproc N`` validates the config and the layout first, then runs
``python -m loom.cli train ...`` once per rank with the torchrun environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). When any rank fails the launcher
stops the others; the failure is reported with each rank's exit code.

``max_restarts`` (``loom train --max-restarts K``, as torchrun's flag of that name): after a
failure the launcher stops every rank and starts them all again, at most K times. The
restarted ranks know they are a later start (``loom.distributed.context.Attempt``) and resume
from the run folder's newest complete checkpoint (``loom.cli``), so the loss curve goes on as
if nothing happened.
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


def launch_local(nproc: int, cli_args: list[str], max_restarts: int = 0) -> None:
    """Run ``loom <cli_args>`` on ``nproc`` local ranks, restarting all of them after a failure at
    most ``max_restarts`` times; returns when all have finished."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"loom-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=max_restarts,
        monitor_interval=0.2,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", "-m", "loom.cli", *cli_args)
    except ChildFailedError as exc:
        failed = ", ".join(f"rank {rank} (exit code {f.exitcode})" for rank, f in sorted(exc.failures.items()))
        tries = f" (and {max_restarts} restart{'s' if max_restarts > 1 else ''})" if max_restarts else ""
        raise LoomError(
            f"the run failed on {failed}{tries}; the other ranks were stopped.",
            "read the first rank's message above (and any failure_rank*.txt in the run folder), fix it, and rerun "
            "with --resume to continue from the newest checkpoint.",
        ) from None
