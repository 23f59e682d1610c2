"""Tokenizers: raw bytes, or a Hugging Face ``tokenizer.json``.

Every tokenizer has an end-of-document id (``eos_id``) that the data pipeline puts after
each document, and a ``fingerprint`` that changes whenever the id mapping could change,
so cached token files are keyed by it (``byte-v1``, or the sha256 of tokenizer.json).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from tokenizers import Tokenizer as _HFCore
from tokenizers import decoders, models, pre_tokenizers, trainers

from loom.errors import LoomError

# Looked up in this order; the first one the vocabulary has ends documents.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
BPE_SPECIALS = ("<|endoftext|>",)
MAX_VOCAB = 2**20


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. Ids lie in ``[0, vocab_size)``; ``decode`` drops ``eos_id``."""

    vocab_size: int
    eos_id: int
    fingerprint: str  # identifies the id mapping, for cache keys
    spec: str  # what the user wrote: "byte" or a path

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """One integer array per text; no eos is added (the data pipeline adds it)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus 256 = end of document. ``decode(encode(s)) == s``."""

    vocab_size = 257
    eos_id = 256
    fingerprint = "byte-v1"
    spec = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # np.frombuffer views the bytes: no per-byte Python work on large corpora.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: list[int]) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        # eos and ids beyond a byte (a model's padded vocabulary) carry no text.
        data = arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a tokenizer.json file.

    Special tokens the file's post-processor would add (BOS, ...) are not added: documents
    are delimited only by ``eos_id``, which the data pipeline appends.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        try:
            raw = path.read_bytes()
            self._tok = _HFCore.from_str(raw.decode("utf-8"))
        except Exception as exc:  # OSError, bad UTF-8, or the Rust parser's plain Exception
            raise LoomError(
                f"could not load the tokenizer {path}: {exc}.",
                "point data.tokenizer at a tokenizer.json saved by Hugging Face tokenizers "
                "(tokenizer.save(path)), or use data.tokenizer=byte.",
            ) from None
        self.spec = str(path)
        self.fingerprint = "sha256:" + hashlib.sha256(raw).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = next((i for t in EOS_CANDIDATES if (i := self._tok.token_to_id(t)) is not None), None)
        if eos is None:
            raise LoomError(
                f"the tokenizer {path} has no end-of-document token (looked for {', '.join(EOS_CANDIDATES)}).",
                "add one as a special token (tok.add_special_tokens(['<|endoftext|>']); tok.save(path)), "
                "or train a tokenizer with loom, which adds <|endoftext|>.",
            )
        self.eos_id = eos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch_fast skips offset tracking and runs in parallel on the Rust side.
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids if i != self.eos_id], skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; a tokenizer.json path (or its folder) -> :class:`HFTokenizer`."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise LoomError(
            f"data.tokenizer = {spec!r}: {path} does not exist.",
            "use data.tokenizer=byte, or the path of a tokenizer.json (train one with `loom` "
            "train_tokenizer or save one from Hugging Face tokenizers).",
        )
    return HFTokenizer(path)


def train_tokenizer(corpus: str, vocab_size: int, out_path: Path, max_bytes: int = 0) -> HFTokenizer:
    """Train a byte-level BPE on a corpus spec (see ``corpus.iter_documents``) and save it.

    The vocabulary is the 256 byte symbols, ``<|endoftext|>`` and ``vocab_size - 257``
    merges, so every string encodes (no unknown token) and decodes back unchanged. A
    corpus too small for that many merges yields a smaller vocabulary.
    """
    from loom.train.corpus import iter_documents

    floor = 256 + len(BPE_SPECIALS)
    if not floor < vocab_size <= MAX_VOCAB:
        raise LoomError(
            f"tokenizer vocab_size = {vocab_size} is outside ({floor}, {MAX_VOCAB}].",
            f"choose a vocabulary above the {floor} byte and special symbols, e.g. 4096 or 32000.",
        )
    tok = _HFCore(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text for _, text in iter_documents(corpus, max_bytes)), trainer=trainer)
    out_path = Path(out_path).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return HFTokenizer(out_path)
