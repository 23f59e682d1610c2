"""Checkpoints: ``RUN_DIR/checkpoints/step_NNNNNN/`` with weights, training state and meta.

A checkpoint folder holds three files:

- ``model.safetensors``: the model weights (safetensors; no code runs on load),
- ``train_state.pt``: optimizer, scheduler, RNG and data position, restricted to values
  ``torch.load(weights_only=True)`` can read back (checked when saving, not when loading),
- ``meta.json``: step, loom version, the caller's meta (the run config goes in
  ``meta["config"]``) and ``files``: the size and sha256 of the other two files.

Invariants: a folder named ``step_NNNNNN`` is only ever created by one ``os.replace`` of a
finished temp folder, so a crash mid-save never leaves a folder that looks complete and
never touches earlier checkpoints. Loading verifies every file against ``meta.json`` and
never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from loom import __version__
from loom.errors import LoomError

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"step_(\d{6,})")
_RESERVED_META = ("step", "loom_version", "files")
# Leaves the weights_only unpickler reads back (torch.Size is a tuple, checked first).
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


@dataclass
class Checkpoint:
    step: int
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    meta: dict[str, Any]  # the whole meta.json
    path: Path


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``RUN_DIR/checkpoints/step_NNNNNN`` atomically, then keep the newest ``keep``.

    The folder appears complete or not at all. Re-saving a step replaces the old folder
    (renamed aside first, deleted last). The checkpoint just written is always kept, even
    when newer-numbered ones exist (e.g. after resuming from an earlier step).
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    clash = [key for key in _RESERVED_META if key in meta]
    if clash:
        raise ValueError(f"meta keys {clash} are reserved by the checkpoint format")
    check_weights_only(train_state)
    meta_text = json.dumps(meta)  # fail on unserialisable meta before writing anything

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=root))
    try:
        safetensors.torch.save_file(_safetensors_ready(model_state), tmp / MODEL_FILE)
        _fsync(tmp / MODEL_FILE)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(train_state, f)
            _flush(f)
        files = {name: _file_record(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
        record = {"step": step, "loom_version": __version__, "files": files, **json.loads(meta_text)}
        # meta.json is written last: a folder without it is never treated as a checkpoint.
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            _flush(f)
        _fsync_dir(tmp)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep, protect=final)
    return final


def _install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside and deleted after."""
    aside = None
    if final.exists():
        # The aside name starts with .tmp-, so a crash between the renames leaves only
        # folders that listing ignores and the next save removes.
        aside = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{final.name}-", dir=final.parent))
        os.replace(final, aside / final.name)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _prune(root: Path, keep: int, protect: Path) -> None:
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


def _safetensors_ready(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (safetensors refuses shared memory).

    Tied weights (e.g. embedding and LM head) appear under two names with one storage;
    the second and later names get a clone, so loading restores both names.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key in seen:
            t = t.clone()
        seen.add((str(t.device), t.untyped_storage().data_ptr()))
        out[name] = t
    return out


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


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _flush(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
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


# ----------------------------------------------------------------------------- listing


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
    newer = [p for p in list_checkpoints(run_dir) if int(_STEP_DIR.fullmatch(p.name).group(1)) > step]
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
        match = _STEP_DIR.fullmatch(p.name)
        if match and p.is_dir() and (p / META_FILE).is_file():
            found.append((int(match.group(1)), p))
    return [p for _, p in sorted(found)]


# ----------------------------------------------------------------------------- loading


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a verified checkpoint; ``path`` may also be a run folder (its latest checkpoint).

    Every file listed in meta.json must match its recorded size and sha256; weights are read
    with safetensors and the training state with ``torch.load(weights_only=True)``.
    """
    path = _resolve(Path(path))
    meta = _read_meta(path)
    for name in (MODEL_FILE, STATE_FILE):
        if name not in meta["files"]:
            raise _damaged(path, f"meta.json lists no {name}")
    for name, want in meta["files"].items():
        _verify(path, name, want)
    device = str(map_location)
    try:
        model_state = safetensors.torch.load_file(path / MODEL_FILE, device=device)
        train_state = torch.load(path / STATE_FILE, map_location=device, weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        # Reached only if meta.json was rewritten to match damaged files.
        raise _damaged(path, f"its files could not be read ({exc})") from None
    return Checkpoint(step=int(meta["step"]), model_state=model_state, train_state=train_state, meta=meta, path=path)


def _resolve(path: Path) -> Path:
    """A checkpoint folder as given, or the latest checkpoint of a run (or its checkpoints/)."""
    if not path.exists():
        raise LoomError(f"checkpoint {path} does not exist.", _resume_fix(_run_of(path), exclude=None))
    if path.name.startswith(TMP_PREFIX):
        raise LoomError(f"{path} is an unfinished save, not a checkpoint.", _resume_fix(_run_of(path), exclude=path))
    if (path / META_FILE).is_file() or _STEP_DIR.fullmatch(path.name):
        return path
    run = path.parent if path.name == CHECKPOINTS else path
    latest = latest_checkpoint(run)
    if latest is None:
        raise LoomError(
            f"{path} holds no complete checkpoint (no {CHECKPOINTS}/step_NNNNNN/{META_FILE}).",
            "pass a checkpoint folder or a run folder that has saved at least once, or start a fresh run.",
        )
    return latest


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise _damaged(path, f"{META_FILE} is missing (the save did not finish or the file was removed)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(path, f"{META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "step" not in meta:
        raise _damaged(path, f"{META_FILE} lacks the step or the files table")
    return meta


def _verify(path: Path, name: str, want: dict[str, Any]) -> None:
    file = path / name
    if not file.is_file():
        raise _damaged(path, f"{name} is missing")
    size = file.stat().st_size
    if size != want.get("size"):
        raise _damaged(
            path, f"{name} has {size} bytes but {META_FILE} records {want.get('size')} (truncated or replaced)"
        )
    if _sha256(file) != want.get("sha256"):
        raise _damaged(path, f"{name} does not match the sha256 in {META_FILE} (corrupted or modified)")


def _damaged(path: Path, why: str) -> LoomError:
    return LoomError(f"checkpoint {path} is damaged: {why}.", _resume_fix(_run_of(path), exclude=path))


def _run_of(path: Path) -> Path:
    return path.parent.parent if path.parent.name == CHECKPOINTS else path


def _resume_fix(run: Path, exclude: Path | None) -> str:
    others = [p for p in list_checkpoints(run) if p != exclude]
    if not others:
        return "no other checkpoint exists in this run; start a fresh run (or restore the file from a backup)."
    names = ", ".join(str(p) for p in others)
    return f"resume from an earlier checkpoint with --resume PATH; complete checkpoints here: {names}."


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (when present) CUDA generator states, weights_only-safe."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored for the devices present."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # A resume may see fewer GPUs than the save did; restore the ones that exist.
        for index, gen in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gen.cpu(), index)
