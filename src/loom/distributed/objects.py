"""Small Python objects between ranks, on the counted collectives: a text from one rank to all,
every rank's JSON-able object on rank 0. For reports and agreement (a failure's message, a
checkpoint's per-rank records), not for tensors."""

from __future__ import annotations

import json
from typing import Any

import torch

from loom.distributed.comm import Comm


def broadcast_text(comm: Comm, device: torch.device | str, text: str, src: int, tag: str) -> str:
    """``text`` of rank ``src`` on every rank of ``comm`` (its length first, then its bytes)."""
    if comm.size == 1:
        return text
    data = text.encode()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    comm.broadcast(size, src, tag=tag)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if comm.rank == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    comm.broadcast(buf, src, tag=tag)
    return bytes(buf.cpu().tolist()).decode()


def gather_json(comm: Comm, device: torch.device | str, obj: Any, tag: str) -> list[Any] | None:
    """Every rank's ``obj`` (JSON) on rank 0, in rank order; None elsewhere."""
    data = json.dumps(obj).encode()
    if comm.size == 1:
        return [json.loads(data)]
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    longest = size.clone()
    comm.all_reduce(longest, op="max", tag=tag)
    buf = torch.zeros(int(longest.item()) + 8, dtype=torch.uint8, device=device)
    buf[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
    buf[8 : 8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    outs = [torch.empty_like(buf) for _ in range(comm.size)] if comm.rank == 0 else None
    comm.gather(buf, outs, 0, tag=tag)
    if outs is None:
        return None
    found = []
    for out in outs:
        raw = bytes(out.cpu().tolist())
        n = int.from_bytes(raw[:8], "little")
        found.append(json.loads(raw[8 : 8 + n]))
    return found
