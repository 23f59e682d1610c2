"""Vocabulary parallelism: the embedding and the cross-entropy split by vocabulary over tp ranks
equal the single process, including vocabularies tp does not divide (padded), with and without
sequence parallelism; the cross-entropy sends exactly 2 all-reduces forward (the max of N
fp32 values, then the sums of exp and the target logits, 2N): 3N values, as 3 separate ones would.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.config import ParallelConfig
from loom.distributed.comm import Comm, Ledger, model_bytes
from loom.distributed.context import init_distributed
from loom.distributed.spawn import run_ranks
from loom.model.init import init_parameter, normal_slice
from loom.parallel.tensor import TensorParallel
from loom.parallel.vocab import (
    VocabParallelEmbedding,
    gather_vocab_logits,
    mask_padded_logits,
    padded_vocab,
    vocab_parallel_cross_entropy,
)

DIM, BATCH, SEQ, SEED, STD = 8, 2, 8, 5, 0.02
NAME = "tok_emb.weight"


def _single_tp() -> TensorParallel:
    return TensorParallel(Comm("tp", None, [0], Ledger(0)))


def _init_embedding(emb: VocabParallelEmbedding) -> None:
    """The model's call: fill the real rows from the full tensor, keep the padding zero."""
    place = emb.placement["weight"]
    n = emb.vocab_end - emb.vocab_start
    with torch.no_grad():
        init_parameter(emb.weight[:n], NAME, SEED, STD, 2, place.full_shape, place.rows, place.cols)
        emb.weight[n:].zero_()


def _data(vocab: int, padded: int, ignore: bool) -> tuple[torch.Tensor, ...]:
    """ids, an upstream gradient for the embedding, padded logits (junk in the padding), targets."""
    g = torch.Generator().manual_seed(vocab)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    ids[0, :2] = torch.tensor([0, vocab - 1])  # both ends of the vocabulary
    upstream = torch.randn(BATCH, SEQ, DIM, generator=g)
    logits = torch.randn(BATCH, SEQ, padded, generator=g) * 3
    logits[..., vocab:] = 50.0  # would dominate the softmax if the padding counted
    targets = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    targets[1, :2] = torch.tensor([0, vocab - 1])
    if ignore:
        targets[0, 3] = targets[1, 5] = -100
    return ids, upstream, logits, targets


def _reference_ce(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """F.cross_entropy on the unpadded logits: loss and the gradient over the padded columns."""
    z = logits.clone().requires_grad_(True)
    loss = F.cross_entropy(z[..., :vocab].float().reshape(-1, vocab), targets.reshape(-1))
    loss.backward()
    return loss.detach(), z.grad


# ----------------------------------------------------------------------------- one process


def test_padded_vocab() -> None:
    assert padded_vocab(50, 4) == 52
    assert padded_vocab(52, 4) == 52
    assert padded_vocab(50257, 8) == 50264
    assert padded_vocab(5, 1) == 5
    assert padded_vocab(1, 3) == 3
    with pytest.raises(ValueError, match="positive"):
        padded_vocab(50, 0)


@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize(("vocab", "padded"), [(50, 50), (50, 52)])
def test_cross_entropy_on_one_rank_equals_torch(vocab: int, padded: int, ignore: bool) -> None:
    _, _, logits, targets = _data(vocab, padded, ignore)
    want_loss, want_grad = _reference_ce(logits, targets, vocab)
    z = logits.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(z, targets, _single_tp(), 0, vocab)
    (loss * 3.0).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(z.grad, 3.0 * want_grad, rtol=1e-6, atol=1e-9)
    assert torch.all(z.grad[..., vocab:] == 0)


def test_cross_entropy_bf16_logits_keep_their_dtype_and_use_fp32_math() -> None:
    _, _, logits, targets = _data(50, 52, False)
    z = logits.to(torch.bfloat16).requires_grad_(True)
    loss = vocab_parallel_cross_entropy(z, targets, _single_tp(), 0, 50)
    loss.backward()
    want_loss, want_grad = _reference_ce(z.detach().float(), targets, 50)
    assert loss.dtype == torch.float32 and z.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(z.grad.float(), want_grad, rtol=1e-2, atol=1e-5)


def test_embedding_on_one_rank_and_its_init() -> None:
    emb = VocabParallelEmbedding(50, DIM, _single_tp())
    _init_embedding(emb)
    full = normal_slice(SEED, NAME, (50, DIM), STD)
    assert (emb.padded_size, emb.vocab_start, emb.vocab_end, emb.pad_rows) == (50, 0, 50, 0)
    assert torch.equal(emb.weight.detach(), full)
    ids = _data(50, 50, False)[0]
    assert torch.equal(emb(ids), F.embedding(ids, full))


def test_mask_and_gather_logits_on_one_rank() -> None:
    logits = torch.randn(2, 3, 8)
    masked = mask_padded_logits(logits, 4, 6)  # columns 4..11, of which 6..11 are padding
    assert torch.equal(masked[..., :2], logits[..., :2]) and torch.all(masked[..., 2:] == float("-inf"))
    assert torch.equal(gather_vocab_logits(logits, _single_tp(), 5), logits[..., :5])


# ----------------------------------------------------------------------------- tp ranks


def _vocab_for(tp_size: int) -> int:
    """A vocabulary ``tp_size`` does not divide."""
    return 4 * 12 + 2 if tp_size == 4 else 2 * 25 + 1


def _rank_checks() -> dict:
    """On 4 ranks as dp=2 x tp=2, on each tp group (tp=2, ranks {0,1} and {2,3}) and on the world
    (tp=4), for a vocabulary tp does not divide and a tiny one (whole shards of padding):
    embedding forward/backward with and without SP, cross-entropy value/gradient and ledger."""
    ctx = init_distributed(ParallelConfig(tp=2))
    out: dict = {}
    for comm in (ctx.comm("tp"), ctx.comm("world")):
        t = comm.size
        out[(t, "rank")] = comm.rank
        for vocab in (_vocab_for(t), 5):
            padded = padded_vocab(vocab, t)
            ids, upstream, logits, targets = _data(vocab, padded, False)
            for sp in (False, True):
                tp = TensorParallel(comm, sequence_parallel=sp)
                emb = VocabParallelEmbedding(vocab, DIM, tp)
                _init_embedding(emb)
                n = emb.vocab_end - emb.vocab_start
                y = emb(ids)
                (y * tp.scatter_sequence(upstream)).sum().backward()
                out[(t, vocab, sp, "emb")] = {
                    "range": (emb.vocab_start, emb.vocab_end, emb.pad_rows, emb.padded_size),
                    "real_weight": emb.weight.detach()[:n].clone(),
                    "pad_weight": emb.weight.detach()[n:].clone(),
                    "y": y.detach(),
                    "grad": emb.weight.grad.clone(),
                }
            tp = TensorParallel(comm)
            per = padded // t
            lo = comm.rank * per
            for ignore in (False, True):
                tgt = _data(vocab, padded, True)[3] if ignore else targets
                z = logits[..., lo : lo + per].clone().requires_grad_(True)
                before = len(ctx.ledger.recent(1000))
                loss = vocab_parallel_cross_entropy(z, tgt, tp, lo, vocab)
                forward = ctx.ledger.recent(1000)[before:]
                (loss * 3.0).backward()
                out[(t, vocab, ignore, "ce")] = {
                    "loss": loss.detach(),
                    "grad": z.grad.clone(),
                    "calls": [(e.op, e.group, e.tag, e.numel, e.dtype, e.bytes_sent) for e in forward],
                    "backward_calls": len(ctx.ledger.recent(1000)) - before - len(forward),
                }
            out[(t, vocab, "gather")] = gather_vocab_logits(logits[..., lo : lo + per], tp, vocab)
    return out


def test_vocab_parallel_on_2_and_4_ranks_equals_one_process() -> None:
    results = run_ranks(_rank_checks, 4, timeout_s=90)
    n = BATCH * SEQ
    for t, group in ((2, "tp"), (4, "world")):
        for vocab in (_vocab_for(t), 5):
            padded = padded_vocab(vocab, t)
            per = padded // t
            assert padded % t == 0 and padded - vocab < t
            ids, upstream, logits, targets = _data(vocab, padded, False)
            full = normal_slice(SEED, NAME, (vocab, DIM), STD).requires_grad_(True)
            y = F.embedding(ids, full)
            (y * upstream).sum().backward()
            for sp in (False, True):
                for result in results:
                    rank, got = result[(t, "rank")], result[(t, vocab, sp, "emb")]
                    start = rank * per
                    end = max(start, min(start + per, vocab))
                    assert got["range"] == (start, end, start + per - end, padded)
                    assert torch.equal(got["real_weight"], full.detach()[start:end])
                    assert torch.all(got["pad_weight"] == 0)
                    want_y = y.detach().chunk(t, dim=1)[rank] if sp else y.detach()
                    torch.testing.assert_close(got["y"], want_y, rtol=0, atol=0)
                    torch.testing.assert_close(got["grad"][: end - start], full.grad[start:end], rtol=1e-6, atol=1e-7)
                    assert torch.all(got["grad"][end - start :] == 0)
                if sp:  # each tp group's slices concatenate to the full output
                    cat = torch.cat([r[(t, vocab, sp, "emb")]["y"] for r in results[:t]], dim=1)
                    torch.testing.assert_close(cat, y.detach(), rtol=0, atol=0)

            for ignore in (False, True):
                tgt = _data(vocab, padded, True)[3] if ignore else targets
                want_loss, want_grad = _reference_ce(logits, tgt, vocab)
                for result in results:
                    rank, got = result[(t, "rank")], result[(t, vocab, ignore, "ce")]
                    torch.testing.assert_close(got["loss"], want_loss, rtol=1e-6, atol=0)
                    torch.testing.assert_close(
                        got["grad"], 3.0 * want_grad[..., rank * per : (rank + 1) * per], rtol=1e-6, atol=1e-9
                    )
                    # each rank's (max, sum of exp, target logit) per position: one all-gather of
                    # 3N fp32 values from each rank; backward is local
                    assert got["calls"] == [
                        (
                            "all_gather",
                            group,
                            "tp-ce",
                            t * 3 * n,
                            "float32",
                            model_bytes("all_gather", t, 4 * t * 3 * n),
                        )
                    ]
                    assert got["backward_calls"] == 0
            for result in results:
                assert torch.equal(result[(t, vocab, "gather")], logits[..., :vocab])
