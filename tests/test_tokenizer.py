"""Tokenizers: byte round trip, BPE training, loading a user's tokenizer.json, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from loom.errors import LoomError
from loom.train.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_tokenizer
from loom.train.tokenizer import Tokenizer as TokenizerProtocol

TEXT = "def grüße(x):\n    return 'héllo ✓ 日本 🐍' * x\n"


def _small_corpus(folder: Path) -> Path:
    """A few KB of varied text: enough pairs for a few hundred BPE merges."""
    folder.mkdir()
    for i in range(4):
        lines = [
            f"def function_{i}_{j}(value, other):\n    return value * {j} + other - {i}  # naïve ✓\n" for j in range(60)
        ]
        (folder / f"part{i}.txt").write_text("".join(lines), encoding="utf-8")
    return folder


def test_byte_round_trip_non_ascii() -> None:
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, TokenizerProtocol)
    assert (tok.vocab_size, tok.eos_id, tok.fingerprint, tok.spec) == (257, 256, "byte-v1", "byte")
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids[:10] + [tok.eos_id] + ids[10:]) == TEXT  # eos carries no text
    (arr,) = tok.encode_batch([TEXT])
    assert np.array_equal(arr, ids)
    assert "\ufffd" in tok.decode(list("é".encode())[:1])  # a cut character decodes with a replacement


def test_bpe_trained_on_folder_round_trips(tmp_path: Path) -> None:
    corpus = _small_corpus(tmp_path / "corpus")
    out = tmp_path / "nested" / "dir" / "tokenizer.json"
    tok = train_tokenizer(str(corpus), 320, out)
    assert out.is_file()
    assert tok.vocab_size == 320
    assert tok.eos_id == Tokenizer.from_file(str(out)).token_to_id("<|endoftext|>")
    for text in (TEXT, "def function_1_2(value, other):\n", "  leading spaces\tand tabs\n\n"):
        ids = tok.encode(text)
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    assert len(tok.encode("def function_1_2(value, other):")) < len("def function_1_2(value, other):")
    again = load_tokenizer(str(out))
    assert again.fingerprint == tok.fingerprint == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
    assert load_tokenizer(str(out.parent)).fingerprint == tok.fingerprint  # a folder holding tokenizer.json


def test_user_tokenizer_json_loads(tmp_path: Path) -> None:
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "user" / "tokenizer.json"
    path.parent.mkdir()
    hf.save(str(path))
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.spec) == (4, 1, str(path))
    assert tok.encode("hello world") == [2, 3]
    assert [a.tolist() for a in tok.encode_batch(["world", "hello hello"])] == [[3], [2, 2]]


def test_tokenizer_without_eos_is_rejected(tmp_path: Path) -> None:
    hf = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    with pytest.raises(LoomError) as err:
        load_tokenizer(str(path))
    assert str(path) in err.value.problem and "<|endoftext|>" in err.value.fix


def test_bad_tokenizer_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(LoomError) as err:
        load_tokenizer(str(missing))
    assert str(missing) in err.value.problem and "byte" in err.value.fix
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(LoomError) as err:
        load_tokenizer(str(garbage))
    assert str(garbage) in err.value.problem and err.value.fix


@pytest.mark.parametrize("vocab_size", [0, 257, 2**20 + 1])
def test_train_tokenizer_rejects_bad_vocab_size(tmp_path: Path, vocab_size: int) -> None:
    with pytest.raises(LoomError, match="vocab_size"):
        train_tokenizer(str(_small_corpus(tmp_path / "c")), vocab_size, tmp_path / "t.json")
