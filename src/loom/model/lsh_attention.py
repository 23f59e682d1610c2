"""LSH attention (Reformer, Kitaev et al. 2020): queries attend only to keys that hash alike.

One hash round: random rotations ``R`` (d x n_buckets/2) bucket a vector ``x`` as
``argmax([xR, -xR])`` (angular LSH); positions are sorted by (bucket, position), cut into
chunks of ``chunk``, and each chunk attends to itself and to the chunk before it (causally:
never to a later position). Every query also meets its own key, exactly once, as a column of
its own (so no row is ever empty). With shared QK (the keys are the unit-length queries, so
a query and its key share a bucket) a token attends to itself only when it has nothing else:
that column's score is -1e9, not its dot product. Without shared QK queries and keys are hashed and
sorted separately and chunk c of the queries meets chunks c and c - 1 of the keys. Several
rounds (fresh rotations) are combined by their log-sum-exps: ``out = sum_r softmax_r(lse_r)
out_r``, with Reformer's duplicate correction: in every round a score is lowered by the log of
the number of rounds whose window holds that pair (``n_ij``, counted from every round's chunk
of each position), so ``sum_r exp(lse_r)`` sums each key of the union of windows once and the
result is exactly softmax attention over that union (a key found in several rounds does not
count more).

Memory: per round the sorted q, k, v and one ``chunk x 2 chunk`` score tile per chunk, so
linear in S. Backward is autograd's through the gathers (the buckets and the sort are
constants). With one bucket, one round and shared QK off, it is dense causal attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SELF = -1e9  # a token's score for itself under shared QK: used only when nothing else is visible


def hash_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH: ``x`` (B, H, S, d), ``rotations`` (H, d, n_buckets / 2) -> buckets (B, H, S)."""
    if rotations.shape[-1] == 0:  # one bucket
        return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    rotated = torch.einsum("bhsd,hdr->bhsr", x, rotations.to(x.dtype))
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


def _sorted(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return x.gather(2, order.unsqueeze(-1).expand(*order.shape, x.shape[-1]))


def _with_previous(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, n, c, ...) -> each chunk followed by the chunk before it (cyclically): (B, H, n, 2c, ...)."""
    return x if n == 1 else torch.cat([x, x.roll(1, dims=2)], dim=3)


def lsh_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    rotations: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Causal LSH attention: (batch, heads, S, d). ``k`` None: shared QK (keys = unit queries).
    ``rotations`` (H, d, n_hashes, n_buckets / 2): one set per round."""
    b, h, s, d = q.shape
    if s % chunk:
        raise ValueError(f"sequence length {s} is not a multiple of the LSH chunk {chunk}")
    shared = k is None
    keys = F.normalize(q, dim=-1) if shared else k
    n = s // chunk
    positions = torch.arange(s, device=q.device)
    rounds = rotations.shape[2]
    with torch.no_grad():  # each round's order of the queries and of the keys, and each position's chunk in it
        orders = []
        for r in range(rounds):
            query_buckets = hash_buckets(q, rotations[:, :, r])
            order_q = (query_buckets * s + positions).argsort(dim=-1)
            key_buckets = query_buckets if shared else hash_buckets(keys, rotations[:, :, r])
            order_k = order_q if shared else (key_buckets * s + positions).argsort(dim=-1)
            orders.append((order_q, order_k))
        # chunk_q[r][..., p]: the chunk of query position p in round r (and chunk_k of key p)
        chunk_q = [o.argsort(dim=-1) // chunk for o, _ in orders]
        chunk_k = [o.argsort(dim=-1) // chunk for _, o in orders]
    outs, lses = [], []
    for r in range(rounds):
        order_q, order_k = orders[r]
        qs = _sorted(q, order_q).view(b, h, n, chunk, d)
        ks = _with_previous(_sorted(keys, order_k).view(b, h, n, chunk, d), n)
        vs = _with_previous(_sorted(v, order_k).view(b, h, n, chunk, d), n)
        pq = order_q.view(b, h, n, chunk, 1)
        pk = _with_previous(order_k.view(b, h, n, chunk), n).unsqueeze(-2)
        scores = (qs @ ks.transpose(-1, -2)) / math.sqrt(d)
        if rounds > 1:  # duplicate correction: - log(rounds whose window holds the pair)
            scores = scores - _window_counts(chunk_q, chunk_k, pq.squeeze(-1), pk.squeeze(-2), n, scores.dtype).log()
        scores = scores.masked_fill(pk >= pq, float("-inf"))  # the future, and itself: its own column below
        # every query also meets its own key, once: always something to attend to
        v_self = _sorted(v, order_q).view(b, h, n, chunk, d)
        if shared:
            own = torch.full((b, h, n, chunk, 1), SELF, dtype=scores.dtype, device=q.device)
        else:
            own = (qs * _sorted(keys, order_q).view(b, h, n, chunk, d)).sum(-1, keepdim=True) / math.sqrt(d)
        own = own - math.log(rounds)  # every round holds the own column once
        lse = torch.logsumexp(torch.cat([scores, own], dim=-1), dim=-1)
        out = torch.exp(scores - lse.unsqueeze(-1)) @ vs + torch.exp(own - lse.unsqueeze(-1)) * v_self
        back = order_q.argsort(dim=-1)  # sorted position of each original position
        outs.append(_sorted(out.view(b, h, s, d), back))
        lses.append(lse.view(b, h, s).gather(2, back))
    if len(outs) == 1:
        return outs[0]
    weights = torch.softmax(torch.stack(lses), dim=0).unsqueeze(-1)
    return (weights * torch.stack(outs)).sum(0)


def _window_counts(
    chunk_q: list[torch.Tensor],
    chunk_k: list[torch.Tensor],
    pq: torch.Tensor,
    pk: torch.Tensor,
    n: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """For the pairs of one round's tiles (query positions ``pq`` (B, H, n, c), key positions ``pk``
    (B, H, n, 2c)), in how many rounds the key's chunk is the query's or the one before it."""
    count = torch.zeros(*pq.shape, pk.shape[-1], dtype=dtype, device=pq.device)
    for cq, ck in zip(chunk_q, chunk_k, strict=True):
        mine = cq.gather(2, pq.flatten(2)).view(pq.shape).unsqueeze(-1)
        theirs = ck.gather(2, pk.flatten(2)).view(pk.shape).unsqueeze(-2)
        count += (theirs == mine) | ((n > 1) & (theirs == (mine - 1) % n))
    return count


def draw_rotations(heads: int, head_dim: int, n_hashes: int, n_buckets: int, generator=None, device=None):  # noqa: ANN001, ANN201
    """Random rotations (heads, head_dim, n_hashes, n_buckets / 2) from ``generator``."""
    return torch.randn(heads, head_dim, n_hashes, n_buckets // 2, generator=generator, device=device)
