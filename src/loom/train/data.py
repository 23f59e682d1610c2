"""Corpora -> flat token files -> batches.

``data.corpus`` names one of three kinds of corpus:

* ``stdlib``: the ``*.py`` files of the running Python's standard library, found at run time.
* a folder (or a single file) of ``.txt`` documents and ``.jsonl`` files (one
  ``{"text": ...}`` object per line, each line a document).
* ``X.bin``: a prepared token file with its metadata ``X.json`` (see :func:`write_token_file`).

Text corpora are tokenised once into ``<cache>/datasets/<key>/{train.bin,val.bin,meta.json}``.
The key hashes everything the tokens depend on (corpus, source files with sizes and mtimes,
tokenizer fingerprint, split, byte limit, format version), so a cached folder is never
stale, and it is published by one atomic rename, so a half-written one is never seen.

Which documents a corpus holds is :mod:`loom.train.corpus`; which windows a step
trains on is :mod:`loom.train.batches`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.errors import LoomError
from loom.train.corpus import Source, documents_of, find_source, missing_corpus

if TYPE_CHECKING:
    from loom.config import DataConfig
    from loom.train.tokenizer import Tokenizer

FORMAT_VERSION = 1  # bump when the cached files' layout or contents change
TOKEN_FILE_FORMAT = "loom-tokens-v1"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # token files are little-endian
ENCODE_CHUNK_CHARS = 8 << 20  # text handed to the tokenizer per encode_batch call
LOG_EVERY_S = 5.0

Log = Callable[[str], None]


@dataclass
class TokenData:
    """Train and val token streams as read-only memmaps; each document ends with ``meta["eos_id"]``."""

    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]
    path: Path  # the cache folder, or the .bin file of a prepared token corpus


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids of vocabularies up to 65536; larger ones need uint32."""
    return DTYPES["uint16"] if vocab_size <= 2**16 else DTYPES["uint32"]


# ----------------------------------------------------------------------------- preparation


def cache_root(data_cfg: DataConfig) -> Path:
    """data.cache_dir, else $LOOM_CACHE, else ~/.cache/loom."""
    return Path(data_cfg.cache_dir or os.environ.get("LOOM_CACHE") or "~/.cache/loom").expanduser()


def prepare_dataset(data_cfg: DataConfig, tokenizer: Tokenizer, log: Log | None = None) -> TokenData:
    """Tokenise ``data.corpus`` once (or load it from the cache) and return its two splits.

    A document goes to val when ``hash(doc_id) < val_fraction``; if that leaves a split
    empty (e.g. one document), the last ``val_fraction`` of the token stream is val.
    """
    data_cfg.validate()
    say = log or (lambda _msg: None)
    if data_cfg.corpus.endswith(".bin"):
        return _open_token_file(data_cfg, tokenizer, say)
    source = find_source(data_cfg.corpus)
    key = _cache_key(source, tokenizer, data_cfg)
    final = cache_root(data_cfg) / "datasets" / key
    if final.exists():
        cached = _open_cached(final)
        if cached is not None:
            say(
                f"using cached tokens {final} ({_fmt(cached.train.size)} train, {_fmt(cached.val.size)} val); not re-tokenising"
            )
            return cached
        say(f"cached tokens {final} are incomplete; rebuilding them")
        shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", suffix=".tmp", dir=final.parent))
    try:
        _tokenise(source, data_cfg, tokenizer, tmp, say, key)
        try:
            os.rename(tmp, final)  # atomic: readers see no folder or a complete one
        except OSError:
            if _open_cached(final) is None:  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = _open_cached(final)
    assert data is not None, f"freshly written cache {final} does not open"
    return data


def _cache_key(source: Source, tokenizer: Tokenizer, data_cfg: DataConfig) -> str:
    stats = [(p.relative_to(source.root).as_posix(), *_size_mtime(p)) for p in source.files]
    spec = f"stdlib:{source.root}" if source.kind == "stdlib" else str(Path(data_cfg.corpus).expanduser().resolve())
    blob = json.dumps([FORMAT_VERSION, spec, stats, tokenizer.fingerprint, data_cfg.val_fraction, data_cfg.max_bytes])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _size_mtime(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _in_val(doc_id: str, val_fraction: float) -> bool:
    """Stable across runs and machines: the first 8 bytes of sha256(doc_id) as a fraction."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64 < val_fraction


def _tokenise(source: Source, cfg: DataConfig, tokenizer: Tokenizer, out: Path, say: Log, key: str) -> None:
    """Write train.bin, val.bin, meta.json into ``out``; each document is followed by eos."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    tokens, docs = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    start = last_log = time.monotonic()
    with open(out / "train.bin", "wb") as f_train, open(out / "val.bin", "wb") as f_val:
        files = {"train": f_train, "val": f_val}
        for chunk in _chunks(documents_of(source, cfg.max_bytes)):
            parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            for (doc_id, _), ids in zip(chunk, tokenizer.encode_batch([text for _, text in chunk])):
                split = "val" if _in_val(doc_id, cfg.val_fraction) else "train"
                parts[split] += [ids, eos]
                docs[split] += 1
            for split, arrays in parts.items():
                if arrays:
                    flat = np.concatenate(arrays).astype(dtype, copy=False)
                    flat.tofile(files[split])
                    tokens[split] += flat.size
            if time.monotonic() - last_log > LOG_EVERY_S:
                last_log = time.monotonic()
                say(f"tokenised {sum(docs.values())} documents, {_fmt(sum(tokens.values()))} tokens so far")
    split_rule = f"document: sha256(doc_id) fraction < {cfg.val_fraction} goes to val"
    if not tokens["train"] or not tokens["val"]:
        tokens = _split_tail(out, dtype, cfg.val_fraction)
        split_rule = (
            f"token tail: the last {cfg.val_fraction} of the token stream (the documents all hashed to one side)"
        )
    n_docs, n_tokens = sum(docs.values()), sum(tokens.values())
    say(
        f"tokenised {n_docs} documents, {_fmt(n_tokens)} tokens in {time.monotonic() - start:.1f}s "
        f"(train {_fmt(tokens['train'])}, val {_fmt(tokens['val'])})"
    )
    meta = {
        "format": FORMAT_VERSION,
        "dtype": _dtype_name(dtype),
        "n_train_tokens": tokens["train"],
        "n_val_tokens": tokens["val"],
        "n_train_docs": docs["train"],
        "n_val_docs": docs["val"],
        "tokenizer": tokenizer.fingerprint,
        "tokenizer_spec": tokenizer.spec,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "corpus": cfg.corpus,
        "source": source.description,
        "max_bytes": cfg.max_bytes,
        "val_fraction": cfg.val_fraction,
        "split": split_rule,
        "key": key,
    }
    _json_write(out / "meta.json", meta)


def _chunks(docs: Iterator[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    """Group documents so each encode_batch call sees ~ENCODE_CHUNK_CHARS of text."""
    chunk: list[tuple[str, str]] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc[1])
        if size >= ENCODE_CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _split_tail(out: Path, dtype: np.dtype, val_fraction: float) -> dict[str, int]:
    """Re-split the one non-empty stream: its last ``val_fraction`` of tokens becomes val."""
    whole = out / "all.bin"
    full = "train" if (out / "train.bin").stat().st_size else "val"
    os.replace(out / f"{full}.bin", whole)
    stream = np.memmap(whole, dtype=dtype, mode="r")
    n_val = max(1, int(stream.size * val_fraction))
    stream[:-n_val].tofile(out / "train.bin")
    stream[-n_val:].tofile(out / "val.bin")
    counts = {"train": stream.size - n_val, "val": n_val}
    del stream
    whole.unlink()
    return counts


def _open_cached(folder: Path) -> TokenData | None:
    """The cached splits, or None when the folder is not a complete current-format cache."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            return None
        dtype = DTYPES[meta["dtype"]]
        arrays = {s: _memmap(folder / f"{s}.bin", dtype, meta[f"n_{s}_tokens"]) for s in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(a is None for a in arrays.values()):
        return None
    return TokenData(arrays["train"], arrays["val"], meta, folder)


def _memmap(path: Path, dtype: np.dtype, n: int) -> np.ndarray | None:
    if n <= 0 or path.stat().st_size != n * dtype.itemsize:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


# ----------------------------------------------------------------------------- token files


def write_token_file(path: str | Path, tokens: np.ndarray, meta: dict[str, Any] | None = None) -> Path:
    """Write a prepared token corpus that ``data.corpus = "X.bin"`` reads.

    Format: ``X.bin`` holds the ids back to back as little-endian uint16 (vocabularies up to
    65536, or when ``meta`` names none and every id fits) or uint32, no header. ``X.json``
    holds ``{"format": "loom-tokens-v1", "dtype": "uint16"|"uint32", "n_tokens": N}`` plus
    ``meta`` (e.g. vocab_size, eos_id, tokenizer fingerprint). Documents should be separated
    by the tokenizer's eos id. Invariant: ``size(X.bin) == n_tokens * itemsize(dtype)``.
    """
    path = Path(path).expanduser()
    if path.suffix != ".bin":
        raise LoomError(f"token file {path} must end in .bin.", f"name it e.g. {path.with_suffix('.bin')}.")
    arr = np.asarray(tokens).reshape(-1)
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
        raise ValueError("token ids must be non-negative integers")
    meta = dict(meta or {})
    top = int(arr.max()) if arr.size else 0
    vocab = int(meta.get("vocab_size") or top + 1)
    if top >= vocab:
        raise ValueError(f"token id {top} is outside meta['vocab_size'] = {vocab}")
    dtype = token_dtype(vocab)
    body = {**meta, "format": TOKEN_FILE_FORMAT, "dtype": _dtype_name(dtype), "n_tokens": int(arr.size)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    arr.astype(dtype).tofile(tmp)
    os.replace(tmp, path)
    _json_write(path.with_suffix(".json"), body)
    return path


def _open_token_file(cfg: DataConfig, tokenizer: Tokenizer, say: Log) -> TokenData:
    """A prepared token corpus; val is the last ``val_fraction`` of its tokens."""
    path = Path(cfg.corpus).expanduser()
    meta_path = path.with_suffix(".json")
    rebuild = "rebuild it with loom.train.data.write_token_file(path, tokens, meta), which writes both files, or rerun the job that made it."
    if not path.is_file():
        raise missing_corpus(cfg.corpus, path)
    if not meta_path.is_file():
        raise LoomError(
            f"token file {path} has no metadata file {meta_path}.",
            f'create it with {{"dtype": "uint16", "n_tokens": N}}, or {rebuild}',
        )
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        dtype, n = DTYPES[meta["dtype"]], meta["n_tokens"]
    except (ValueError, KeyError, TypeError):  # bad JSON or UTF-8, not an object, unknown dtype
        dtype, n = None, None
    if dtype is None or not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise LoomError(
            f"token metadata {meta_path} is not a JSON object with dtype (uint16 or uint32) and n_tokens (an integer >= 0).",
            f"fix the file, or {rebuild}",
        )
    size, expected = path.stat().st_size, n * dtype.itemsize
    if size != expected:
        raise LoomError(
            f"token file {path} is truncated or corrupt: it has {size} bytes, but {meta_path} says {n} {meta['dtype']} tokens = {expected} bytes.",
            rebuild,
        )
    if n < 2:
        raise LoomError(
            f"token file {path} holds {n} tokens; training needs a train and a val part.",
            f"use a larger corpus; {rebuild}",
        )
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    top = int(tokens.max())
    if top >= tokenizer.vocab_size:
        raise LoomError(
            f"token file {path} holds id {top}, but the tokenizer {tokenizer.spec!r} has only {tokenizer.vocab_size} ids.",
            f"set data.tokenizer to the tokenizer that made the file (its metadata says {meta.get('tokenizer', 'nothing')!r}), or rebuild the file with this one.",
        )
    if meta.get("tokenizer") not in (None, tokenizer.fingerprint):
        say(f"note: {meta_path} was made with tokenizer {meta['tokenizer']}, not {tokenizer.fingerprint}")
    n_val = max(1, int(n * cfg.val_fraction))
    say(f"using token file {path}: {_fmt(n - n_val)} train, {_fmt(n_val)} val tokens")
    meta = {
        "format": FORMAT_VERSION,
        "dtype": meta["dtype"],
        "tokenizer": tokenizer.fingerprint,
        "tokenizer_spec": tokenizer.spec,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "file_meta": meta,  # what the token file's writer recorded, kept verbatim
        "n_train_tokens": n - n_val,
        "n_val_tokens": n_val,
        "corpus": cfg.corpus,
        "source": f"token file {path}",
        "split": f"token tail: the last {cfg.val_fraction} of the tokens",
    }
    return TokenData(tokens[: n - n_val], tokens[n - n_val :], meta, path)


# ----------------------------------------------------------------------------- helpers


def _dtype_name(dtype: np.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def _json_write(path: Path, obj: dict[str, Any]) -> None:
    """Write JSON through a temp file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _fmt(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)
