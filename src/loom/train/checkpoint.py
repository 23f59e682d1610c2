"""Checkpoints: ``RUN_DIR/checkpoints/step_NNNNNN/``, in one of two formats.

- Single file (:func:`save_checkpoint`; what ``loom convert`` writes, a one-process tool's
  format): ``model.safetensors`` with every weight at full size, ``train_state.pt``
  (optimizer, loss scale, RNG and data position, restricted to values
  ``torch.load(weights_only=True)`` reads back, checked when saving) and ``meta.json``.
- Sharded (:mod:`loom.train.sharded_checkpoint`, what ``loom train`` writes): a file per
  rank holding what that rank holds, and a global index.

:func:`load_checkpoint` reads either as full, name-keyed tensors, for tools and tests;
training resumes through :func:`loom.train.sharded_checkpoint.open_checkpoint`, which reads
only the boxes a rank needs. Both write through :mod:`loom.train.checkpoint_folder`: a
folder appears complete (meta.json last, the checksum of every file in it) or not at all,
and loading verifies every file and never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from loom import __version__
from loom.train.checkpoint_folder import (
    CHECKPOINTS,
    META_FILE,
    RESERVED_META,
    TMP_PREFIX,
    check_weights_only,
    damaged,
    file_record,
    flush,
    fsync,
    fsync_dir,
    install,
    latest_checkpoint,
    list_checkpoints,
    prune,
    read_meta,
    resolve,
    set_aside_newer,
    step_dir_name,
    verify,
)
from loom.train.sharded_checkpoint import FORMAT, MODEL_FILE, STATE_FILE, consolidated, open_checkpoint

__all__ = [
    "Checkpoint",
    "capture_rng_state",
    "check_weights_only",
    "checkpoint_meta",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "set_aside_newer",
    "step_dir_name",
]


@dataclass
class Checkpoint:
    step: int
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    meta: dict[str, Any]  # the whole meta.json
    path: Path


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
    clash = [key for key in RESERVED_META if key in meta]
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
        fsync(tmp / MODEL_FILE)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(train_state, f)
            flush(f)
        files = {name: file_record(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
        record = {"step": step, "loom_version": __version__, "files": files, **json.loads(meta_text)}
        # meta.json is written last: a folder without it is never treated as a checkpoint.
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            flush(f)
        fsync_dir(tmp)
        install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep, protect=final)
    return final


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


# ----------------------------------------------------------------------------- loading


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a verified checkpoint of either format at full size; ``path`` may also be a run
    folder (its latest checkpoint).

    Every file listed in meta.json must match its recorded size and sha256; weights are read
    with safetensors and the training state with ``torch.load(weights_only=True)``. A sharded
    checkpoint is assembled tensor by tensor; its ``train_state["optimizer"]["state"]`` is
    name-keyed AdamW state, as the single-file format's.
    """
    path = resolve(Path(path))
    meta = read_meta(path)
    device = str(map_location)
    if meta.get("format") == FORMAT:
        ckpt = open_checkpoint(path)
        model_state, optim = consolidated(ckpt)
        train_state = dict(ckpt.train_state)
        groups = train_state.get("optimizer", {}).get("param_groups", [])
        train_state["optimizer"] = {"state": optim, "param_groups": groups}
        model_state = {name: t.to(device) for name, t in model_state.items()}
        return Checkpoint(ckpt.step, model_state, train_state, meta, path)
    for name in (MODEL_FILE, STATE_FILE):
        if name not in meta["files"]:
            raise damaged(path, f"meta.json lists no {name}")
    for name, want in meta["files"].items():
        verify(path, name, want)
    try:
        model_state = safetensors.torch.load_file(path / MODEL_FILE, device=device)
        train_state = torch.load(path / STATE_FILE, map_location=device, weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        # Reached only if meta.json was rewritten to match damaged files.
        raise damaged(path, f"its files could not be read ({exc})") from None
    return Checkpoint(step=int(meta["step"]), model_state=model_state, train_state=train_state, meta=meta, path=path)


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint (or of a run folder's latest), without reading its tensors."""
    return read_meta(resolve(Path(path)))


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
