"""Data pipeline: corpora, the token cache, token files, deterministic batches, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loom.config import DataConfig
from loom.errors import LoomError
from loom.train.batches import batch_offsets, batch_rows, get_batch
from loom.train.corpus import iter_documents
from loom.train.data import TokenData, prepare_dataset, write_token_file
from loom.train.tokenizer import ByteTokenizer, train_tokenizer

BYTE = ByteTokenizer()
STDLIB_BYTES = 200_000


def _cfg(tmp_path: Path, corpus: str, **kw) -> DataConfig:
    return DataConfig(corpus=corpus, cache_dir=str(tmp_path / "cache"), **kw)


def _raises(fn, *needles: str) -> LoomError:
    """``fn()`` raises a LoomError whose problem names every needle and which offers a fix."""
    with pytest.raises(LoomError) as err:
        fn()
    for needle in needles:
        assert needle in err.value.problem, (needle, err.value.problem)
    assert len(err.value.fix) > 10
    return err.value


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first document, plain text.\n", encoding="utf-8")
    lines = [json.dumps({"text": "jsonl one ✓"}), "", json.dumps({"text": "jsonl two", "id": 7})]
    (root / "sub" / "b.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "notes.md").write_text("not a corpus file")
    return root


class NoEncode(ByteTokenizer):
    """A byte tokenizer that fails if asked to tokenise: proves a cache hit."""

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        raise AssertionError("re-tokenised despite a cached dataset")


# ----------------------------------------------------------------------------- corpora


def test_stdlib_corpus_prepares_both_splits(tmp_path: Path) -> None:
    logs: list[str] = []
    data = prepare_dataset(_cfg(tmp_path, "stdlib", max_bytes=STDLIB_BYTES, val_fraction=0.2), BYTE, logs.append)
    assert isinstance(data, TokenData)
    assert data.train.dtype == np.uint16 and not data.train.flags.writeable
    assert data.train.size > 0 and data.val.size > 0
    n_docs = data.meta["n_train_docs"] + data.meta["n_val_docs"]
    eos = int((data.train == BYTE.eos_id).sum() + (data.val == BYTE.eos_id).sum())
    assert eos == n_docs > 1
    assert data.train.size + data.val.size == STDLIB_BYTES + n_docs  # every byte, one eos per document
    assert data.train[-1] == BYTE.eos_id  # documents are eos-terminated
    assert data.meta["tokenizer"] == "byte-v1" and data.meta["vocab_size"] == 257
    assert data.path.parent == tmp_path / "cache" / "datasets"
    assert any("tokenised" in line for line in logs)
    first = next(iter_documents("stdlib", STDLIB_BYTES))
    assert BYTE.decode(list(data.train[:200])) in first[1] or BYTE.decode(list(data.val[:200])) in first[1]


def test_second_call_loads_from_cache(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "stdlib", max_bytes=STDLIB_BYTES)
    first = prepare_dataset(cfg, BYTE)
    mtime = (first.path / "train.bin").stat().st_mtime_ns
    logs: list[str] = []
    second = prepare_dataset(cfg, NoEncode(), logs.append)
    assert second.path == first.path and second.meta == first.meta
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert (first.path / "train.bin").stat().st_mtime_ns == mtime
    assert any("cached" in line for line in logs)
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_damaged_cache_is_rebuilt_and_inputs_change_the_key(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    cfg = _cfg(tmp_path, str(root))
    first = prepare_dataset(cfg, BYTE)
    with open(first.path / "train.bin", "r+b") as f:
        f.truncate(3)
    logs: list[str] = []
    again = prepare_dataset(cfg, BYTE, logs.append)
    assert again.path == first.path and again.train.size == first.train.size
    assert any("rebuilding" in line for line in logs)
    (root / "a.txt").write_text("changed text\n")
    assert prepare_dataset(cfg, BYTE).path != first.path


def test_folder_corpus_txt_and_jsonl(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    docs = list(iter_documents(str(root)))
    assert [d for d, _ in docs] == ["a.txt", "sub/b.jsonl:1", "sub/b.jsonl:3"]
    assert docs[1][1] == "jsonl one ✓"
    data = prepare_dataset(_cfg(tmp_path, str(root), val_fraction=0.3), BYTE)
    stream = np.concatenate([data.train, data.val])
    assert int((stream == BYTE.eos_id).sum()) == 3
    text = BYTE.decode(stream.tolist())
    assert all(t in text for _, t in docs)


def test_bpe_tokenizer_prepares_a_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    for i in range(20):
        (root / f"more{i}.txt").write_text(f"document number {i} says hello to document {i + 1}.\n" * 5)
    tok = train_tokenizer(str(root), 300, tmp_path / "tok" / "tokenizer.json")
    data = prepare_dataset(_cfg(tmp_path, str(root), tokenizer=tok.spec), tok)
    assert data.train.dtype == np.uint16 and data.meta["tokenizer"] == tok.fingerprint
    stream = np.concatenate([data.train, data.val])
    assert int((stream == tok.eos_id).sum()) == 23 and int(stream.max()) < 300
    assert "document number 7 says hello" in tok.decode(stream.tolist())


def test_single_document_splits_the_token_stream(tmp_path: Path) -> None:
    root = tmp_path / "one"
    root.mkdir()
    (root / "only.txt").write_text("x" * 999)
    data = prepare_dataset(_cfg(tmp_path, str(root), val_fraction=0.1), BYTE)
    assert (data.train.size, data.val.size) == (900, 100)
    assert data.val[-1] == BYTE.eos_id and "tail" in data.meta["split"]


def test_max_bytes_is_deterministic(tmp_path: Path) -> None:
    a = list(iter_documents("stdlib", 50_000))
    assert a == list(iter_documents("stdlib", 50_000))
    assert sum(len(t.encode()) for _, t in a) == 50_000


def test_token_file_round_trip(tmp_path: Path) -> None:
    tokens = np.arange(1000) % 257
    path = write_token_file(tmp_path / "tok" / "corpus.bin", tokens, {"vocab_size": 257, "eos_id": 256})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert (meta["dtype"], meta["n_tokens"], meta["format"]) == ("uint16", 1000, "loom-tokens-v1")
    data = prepare_dataset(_cfg(tmp_path, str(path), val_fraction=0.1), BYTE)
    assert (data.train.size, data.val.size) == (900, 100)
    assert np.array_equal(np.concatenate([data.train, data.val]), tokens)
    big = write_token_file(tmp_path / "big.bin", np.array([0, 70_000]))
    assert json.loads(big.with_suffix(".json").read_text())["dtype"] == "uint32"


# ----------------------------------------------------------------------------- batches


def test_offsets_are_a_pure_function_of_seed_step_stream() -> None:
    a = batch_offsets(10_000, 64, 8, seed=1, step=5)
    assert a.dtype == np.int64 and a.shape == (8,)
    assert np.array_equal(a, batch_offsets(10_000, 64, 8, seed=1, step=5))
    assert not np.array_equal(a, batch_offsets(10_000, 64, 8, seed=1, step=6))
    assert not np.array_equal(a, batch_offsets(10_000, 64, 8, seed=1, step=5, stream=1))
    assert not np.array_equal(a, batch_offsets(10_000, 64, 8, seed=2, step=5))
    tight = batch_offsets(66, 64, 200, seed=0, step=0)  # only offsets 0 and 1 fit
    assert set(tight.tolist()) == {0, 1}


def test_get_batch_shifts_targets() -> None:
    tokens = np.arange(500, dtype=np.uint16)
    x, y = get_batch(tokens, 16, np.array([0, 7, 483]))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, 16)
    assert torch.equal(x[1], torch.arange(7, 23)) and torch.equal(y[1], torch.arange(8, 24))
    assert int(y[2, -1]) == 499


def test_rank_and_micro_batch_rows_cover_the_global_batch() -> None:
    tokens = np.arange(5_000, dtype=np.uint16)
    offsets = batch_offsets(tokens.size, 32, 8, seed=3, step=11)
    x, y = get_batch(tokens, 32, offsets)
    # 2 data-parallel ranks x 2 micro-batches of 2 rows each
    parts = [x[batch_rows(2, 2, rank, k)] for rank in range(2) for k in range(2)]
    assert torch.equal(torch.cat(parts), x)
    # another layout of the same global batch: 4 ranks x 1 micro-batch of 2 rows
    assert torch.equal(torch.cat([y[batch_rows(2, 1, r, 0)] for r in range(4)]), y)


def test_short_token_stream_is_rejected() -> None:
    err = _raises(lambda: batch_offsets(65, 64, 4, seed=0, step=0), "65 tokens", "seq_len = 64")
    assert "train.seq_len" in err.fix
    _raises(lambda: get_batch(np.zeros(10, np.uint16), 64, np.array([0])), "10 tokens")


# ----------------------------------------------------------------------------- errors


def test_missing_corpus(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    _raises(lambda: prepare_dataset(_cfg(tmp_path, str(missing)), BYTE), str(missing), "does not exist")
    _raises(lambda: prepare_dataset(_cfg(tmp_path, str(missing) + ".bin"), BYTE), "nowhere.bin")


def test_empty_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(lambda: prepare_dataset(_cfg(tmp_path, str(empty)), BYTE), str(empty), "no .txt or .jsonl")
    (empty / "blank.txt").write_text("")
    _raises(lambda: prepare_dataset(_cfg(tmp_path, str(empty)), BYTE), str(empty), "no text")


def test_non_utf8_file(tmp_path: Path) -> None:
    root = tmp_path / "latin"
    root.mkdir()
    bad = root / "old.txt"
    bad.write_bytes("café au lait".encode("latin-1"))
    err = _raises(lambda: prepare_dataset(_cfg(tmp_path, str(root)), BYTE), str(bad), "not valid UTF-8")
    assert "iconv" in err.fix


def test_bad_jsonl_line(tmp_path: Path) -> None:
    root = tmp_path / "j"
    root.mkdir()
    (root / "d.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    _raises(lambda: prepare_dataset(_cfg(tmp_path, str(root)), BYTE), f"{root / 'd.jsonl'}:2", "not valid JSON")
    (root / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    _raises(lambda: list(iter_documents(str(root))), "d.jsonl:2", '"text"')


def test_truncated_token_file(tmp_path: Path) -> None:
    path = write_token_file(tmp_path / "c.bin", np.arange(100), {"vocab_size": 257})
    with open(path, "r+b") as f:
        f.truncate(150)
    err = _raises(lambda: prepare_dataset(_cfg(tmp_path, str(path)), BYTE), str(path), "truncated")
    assert "write_token_file" in err.fix


def test_token_file_needs_metadata_and_matching_vocab(tmp_path: Path) -> None:
    path = write_token_file(tmp_path / "c.bin", np.array([1, 2, 300, 4]))
    _raises(lambda: prepare_dataset(_cfg(tmp_path, str(path)), BYTE), "id 300", "257")
    path.with_suffix(".json").write_text('{"dtype": "uint16", "n_tokens": "four"}')
    _raises(lambda: prepare_dataset(_cfg(tmp_path, str(path)), BYTE), "n_tokens")
    path.with_suffix(".json").unlink()
    _raises(lambda: prepare_dataset(_cfg(tmp_path, str(path)), BYTE), str(path.with_suffix(".json")))
