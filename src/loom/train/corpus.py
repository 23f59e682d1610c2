"""Text corpora: which files a ``data.corpus`` names, and their documents in a fixed order.

``stdlib`` is the ``*.py`` files of the running Python's standard library; a folder (or a
single file) holds ``.txt`` documents and ``.jsonl`` files with one ``{"text": ...}``
object per line. Documents are ``(doc_id, text)`` with ids relative to the corpus root
(``file.jsonl:LINE`` for jsonl lines); every problem is a LoomError naming the file and
the fix.
"""

from __future__ import annotations

import json
import os
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loom.errors import LoomError

TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Source:
    kind: str  # "stdlib" or "files"
    root: Path
    files: list[Path]
    description: str


def find_source(corpus: str) -> Source:
    """The sorted files behind a text corpus spec; raises LoomError when there are none."""
    if corpus == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _walk(root, (".py",), skip_dirs=("site-packages", "__pycache__"))
        desc = f"Python {platform.python_version()} standard library at {root} ({len(files)} .py files)"
        return Source("stdlib", root, files, desc)
    path = Path(corpus).expanduser()
    if not path.exists():
        raise missing_corpus(corpus, path)
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise LoomError(
                f"data.corpus = {corpus!r} is a {path.suffix or 'suffix-less'} file; loom reads .txt, .jsonl or prepared .bin files.",
                "point data.corpus at a folder of .txt/.jsonl files, one such file, or a .bin token file with its .json metadata.",
            )
        return Source("files", path.parent, [path], f"file {path}")
    files = _walk(path, TEXT_SUFFIXES)
    if not files:
        raise LoomError(
            f"data.corpus folder {path} holds no .txt or .jsonl files.",
            'put UTF-8 .txt files (one document each) or .jsonl files (one {"text": ...} object per line) in it, or use data.corpus=stdlib.',
        )
    return Source("files", path, files, f"folder {path} ({len(files)} .txt/.jsonl files)")


def _walk(root: Path, suffixes: tuple[str, ...], skip_dirs: tuple[str, ...] = ()) -> list[Path]:
    """Files under ``root`` with one of ``suffixes``, sorted by relative path.

    os.walk with pruning, not rglob: the stdlib folder may hold a site-packages tree
    ten times its own size.
    """
    found: list[tuple[str, Path]] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs]
        rel = Path(folder).relative_to(root)
        found += [((rel / n).as_posix(), Path(folder, n)) for n in names if n.endswith(suffixes)]
    return [path for _, path in sorted(found)]


def iter_documents(corpus: str, max_bytes: int = 0) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` for every non-empty document of a corpus, in a fixed order.

    doc ids are paths relative to the corpus root (``file.jsonl:LINE`` for jsonl lines).
    With ``max_bytes > 0`` the texts total at most ``max_bytes`` UTF-8 bytes: reading stops
    there and the last document is cut at a character boundary, deterministically.
    """
    return documents_of(find_source(corpus), max_bytes)


def documents_of(source: Source, max_bytes: int) -> Iterator[tuple[str, str]]:
    budget = max_bytes if max_bytes > 0 else None
    found = False
    for doc_id, text in _documents(source):
        if budget is not None:
            data = text.encode("utf-8")
            if len(data) > budget:
                text = data[:budget].decode("utf-8", errors="ignore")
            budget -= len(data)
        if text:
            found = True
            yield doc_id, text
        if budget is not None and budget <= 0:
            return
    if not found:
        raise LoomError(
            f"data.corpus {source.description} contains no text: every document is empty.",
            "add UTF-8 text to the files, or point data.corpus at another folder (or stdlib).",
        )


def _documents(source: Source) -> Iterator[tuple[str, str]]:
    for path in source.files:
        rel = path.relative_to(source.root).as_posix()
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise LoomError(
                f"cannot read corpus file {path}: {exc.strerror}.",
                "fix its permissions, or remove it from the corpus folder.",
            ) from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            if source.kind == "stdlib":
                continue  # a few stdlib test files are deliberately in legacy encodings
            raise LoomError(
                f"corpus file {path} is not valid UTF-8 (byte {exc.start} is 0x{raw[exc.start]:02x}).",
                f"re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} -o {path}.new && mv {path}.new {path}`, or remove it.",
            ) from None
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, rel, text)
        else:
            yield rel, text


def _jsonl_documents(path: Path, rel: str, text: str) -> Iterator[tuple[str, str]]:
    # split on "\n" only: str.splitlines would also cut at U+2028, which JSON strings may hold.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            record, why = None, f"is not valid JSON ({exc.msg} at column {exc.colno})"
        else:
            why = 'has no "text" string field'
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LoomError(
                f"{path}:{lineno} {why}.",
                'each line of a .jsonl file must be one JSON object with a "text" string, e.g. {"text": "hello"}; fix or delete that line.',
            )
        yield f"{rel}:{lineno}", record["text"]


def missing_corpus(corpus: str, path: Path) -> LoomError:
    return LoomError(
        f"data.corpus = {corpus!r}: {path} does not exist.",
        "set data.corpus to stdlib, a folder of .txt/.jsonl files, or a prepared .bin token file (with its .json metadata).",
    )
