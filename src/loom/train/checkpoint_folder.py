"""A checkpoint folder on disk, whatever it holds: atomic install, retention, listing, checksums.

Invariants: a folder named ``step_NNNNNN`` is only ever created by one ``os.replace`` of a
finished temp folder (``.tmp-*``), and its ``meta.json`` is written last and lists the size
and sha256 of every other file; so a crash mid-save never leaves a folder that looks
complete and never touches earlier checkpoints, and a damaged file is found before it is
read. :mod:`loom.train.checkpoint` (one file of full tensors) and
:mod:`loom.train.sharded_checkpoint` (a file per rank) both write through this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from loom.errors import LoomError

CHECKPOINTS = "checkpoints"
META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"step_(\d{6,})")
RESERVED_META = ("step", "loom_version", "files")
# Leaves the weights_only unpickler reads back (torch.Size is a tuple, checked first).
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside and deleted after."""
    aside = None
    if final.exists():
        # The aside name starts with .tmp-, so a crash between the renames leaves only
        # folders that listing ignores and the next save removes.
        aside = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{final.name}-", dir=final.parent))
        os.replace(final, aside / final.name)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def prune(root: Path, keep: int, protect: Path) -> None:
    """Delete leftover temp folders and all but the newest ``keep`` checkpoints.

    Assumes one writer per run folder: any ``.tmp-*`` folder is a crashed save.
    """
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = [p for p in _complete(root) if p != protect]
    doomed = complete[: max(0, len(complete) - (keep - 1))]
    for old in doomed:
        # Rename first so a crash mid-delete never leaves a half-deleted "complete" folder.
        gone = root / f"{TMP_PREFIX}del-{old.name}"
        os.replace(old, gone)
        shutil.rmtree(gone, ignore_errors=True)


def check_weights_only(value: Any, where: str = "train_state") -> None:
    """Raise TypeError unless ``torch.load(weights_only=True)`` can read ``value`` back.

    Checking types up front makes a bad state fail at save time, naming the offending
    entry, instead of at resume time when the run is already lost.
    """
    kind = type(value)
    if kind in _TENSORS or kind in _LEAVES:
        return
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in _LEAVES:
                raise TypeError(f"{where} has a key of type {type(key).__name__}: {key!r}")
            check_weights_only(item, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set):
        for i, item in enumerate(value):
            check_weights_only(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
        "cannot read; store tensors, numbers, strings, bools, None, lists and dicts"
    )


def file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def flush(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable; not every platform can open a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (``step_NNNNNN`` folders with meta.json), oldest first."""
    return _complete(Path(run_dir) / CHECKPOINTS)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def set_aside_newer(run_dir: Path, step: int) -> Path | None:
    """Move checkpoints past ``step`` to ``RUN_DIR/checkpoints-abandoned-<time>/`` (kept, not deleted).

    Resuming a run from an earlier checkpoint abandons its later history; moving those
    checkpoints aside keeps ``latest_checkpoint`` truthful without losing anything.
    """
    newer = [p for p in list_checkpoints(run_dir) if int(STEP_DIR.fullmatch(p.name).group(1)) > step]
    if not newer:
        return None
    aside = Path(run_dir) / f"{CHECKPOINTS}-abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=True)
    for p in newer:
        os.replace(p, aside / p.name)
    return aside


def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        match = STEP_DIR.fullmatch(p.name)
        if match and p.is_dir() and (p / META_FILE).is_file():
            found.append((int(match.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve(path: Path) -> Path:
    """A checkpoint folder as given, or the latest checkpoint of a run (or its checkpoints/)."""
    if not path.exists():
        raise LoomError(f"checkpoint {path} does not exist.", _resume_fix(_run_of(path), exclude=None))
    if path.name.startswith(TMP_PREFIX):
        raise LoomError(f"{path} is an unfinished save, not a checkpoint.", _resume_fix(_run_of(path), exclude=path))
    if (path / META_FILE).is_file() or STEP_DIR.fullmatch(path.name):
        return path
    run = path.parent if path.name == CHECKPOINTS else path
    latest = latest_checkpoint(run)
    if latest is None:
        raise LoomError(
            f"{path} holds no complete checkpoint (no {CHECKPOINTS}/step_NNNNNN/{META_FILE}).",
            "pass a checkpoint folder or a run folder that has saved at least once, or start a fresh run.",
        )
    return latest


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise damaged(path, f"{META_FILE} is missing (the save did not finish or the file was removed)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise damaged(path, f"{META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "step" not in meta:
        raise damaged(path, f"{META_FILE} lacks the step or the files table")
    return meta


def verify(path: Path, name: str, want: dict[str, Any]) -> None:
    file = path / name
    if not file.is_file():
        raise damaged(path, f"{name} is missing")
    size = file.stat().st_size
    if size != want.get("size"):
        raise damaged(
            path, f"{name} has {size} bytes but {META_FILE} records {want.get('size')} (truncated or replaced)"
        )
    if sha256(file) != want.get("sha256"):
        raise damaged(path, f"{name} does not match the sha256 in {META_FILE} (corrupted or modified)")


def damaged(path: Path, why: str) -> LoomError:
    return LoomError(f"checkpoint {path} is damaged: {why}.", _resume_fix(_run_of(path), exclude=path))


def _run_of(path: Path) -> Path:
    return path.parent.parent if path.parent.name == CHECKPOINTS else path


def _resume_fix(run: Path, exclude: Path | None) -> str:
    others = [p for p in list_checkpoints(run) if p != exclude]
    if not others:
        return "no other checkpoint exists in this run; start a fresh run (or restore the file from a backup)."
    names = ", ".join(str(p) for p in others)
    return f"resume from an earlier checkpoint with --resume PATH; complete checkpoints here: {names}."
