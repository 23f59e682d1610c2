"""Sharded checkpoints: every rank writes what it holds; any layout reads back only what it needs.

A sharded checkpoint folder::

    step_NNNNNN/
      shard_00000.safetensors  the pieces one rank wrote (loom.parallel.pieces), keys p0, p1, ...
      ...                      (a rank that holds nothing to write, e.g. a dp replica, has none)
      index.json               every global tensor: shape, dtype and its pieces
                               (file, key, offsets, sizes)
      train_state.pt           rank 0: loss scale, RNG, data position, optimizer groups
      meta.json                written last: step, "format": "sharded", the world size, the
                               run config, and the size and sha256 of every other file

Global tensors are those of the single-process run (``model/NAME``, ``optim/NAME/exp_avg``,
...), so the folder does not depend on the layout that wrote it: a reader asks for the box
it holds and gets it assembled from whichever pieces overlap, through safetensors' lazy
slices (only those bytes are read). No rank ever holds more than its own part plus the box
being read.

Why not ``torch.distributed.checkpoint``: its pieces are boxes of a global tensor, one per
rank and tensor (DTensor), and loom's ZeRO owns a slice of a flat buffer that cuts
parameters at any element, several boxes per parameter (:func:`loom.parallel.pieces.flat_boxes`),
which only DCP's deprecated ShardedTensor could describe. Per-rank safetensors with a
global index say the same thing, are read by every framework, and never unpickle.

Saving is collective over ``comm`` (the world): rank 0 makes ``.tmp-step_NNNNNN-sharded``;
every rank writes and fsyncs its shard and sends rank 0 its file's checksum and its index
entries; rank 0 checks that the pieces cover every tensor exactly once, writes the index,
the train state and meta.json, renames the folder into place and prunes old ones. A failure
on any rank is told to every rank, which all raise the same error: none waits forever, and
the previous checkpoint is never touched. The run folder must be one all ranks see (a
shared filesystem across nodes), which rank 0 checks before installing.

Loading: every rank reads meta.json and the index and checks every file's size; the sha256
of the shard files is split over the ranks (rank r hashes files r, r + w, ...) and their
verdicts agreed, so loading time falls with the world size while every file is verified.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from loom import __version__
from loom.distributed.comm import Comm
from loom.distributed.objects import broadcast_text, gather_json
from loom.errors import LoomError
from loom.parallel.pieces import Piece, coverage
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
    prune,
    read_meta,
    resolve,
    sha256,
    step_dir_name,
    verify,
)

FORMAT = "sharded"
INDEX_FILE = "index.json"
STATE_FILE = "train_state.pt"
MODEL_FILE = "model.safetensors"  # the single-file format's weights (loom.train.checkpoint)
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def shard_file(rank: int) -> str:
    return f"shard_{rank:05d}.safetensors"


# ----------------------------------------------------------------------------- saving


def save_sharded(
    run_dir: Path,
    step: int,
    pieces: list[Piece],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    comm: Comm,
    device: torch.device | str = "cpu",
) -> Path:
    """Write ``RUN_DIR/checkpoints/step_NNNNNN`` from every rank's ``pieces`` (collective over
    ``comm``); ``train_state`` and ``meta`` count on rank 0 only. Returns the folder on every
    rank; raises the same :class:`LoomError` on every rank if any rank failed."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{FORMAT}"
    # never a checkpoint holding an inf or NaN: refused on every rank before anything is written
    bad = next((p.key for p in pieces if not _finite(p.data)), None)
    _agree(
        comm,
        device,
        f"rank {comm.rank}'s {bad} holds an inf or NaN" if bad else None,
        "the model diverged: resume from the last checkpoint with a lower train.lr or train.grad_clip on "
        "(the previous checkpoint is intact).",
    )
    error = None
    if comm.rank == 0:
        try:
            if keep < 1:
                raise ValueError(f"keep must be at least 1, got {keep}")
            clash = [key for key in (*RESERVED_META, "format", "world_size") if key in meta]
            if clash:
                raise ValueError(f"meta keys {clash} are reserved by the checkpoint format")
            check_weights_only(train_state)
            json.dumps(meta)  # fail on unserialisable meta before anything is written
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that died
            tmp.mkdir()
        except (OSError, ValueError, TypeError) as exc:
            error = f"rank 0 could not start the checkpoint at {tmp}: {exc}"
    _agree(comm, device, error)

    name, record, entries = shard_file(comm.rank), None, []
    try:
        if pieces:
            tensors = {f"p{i}": p.data.detach().to("cpu").contiguous() for i, p in enumerate(pieces)}
            safetensors.torch.save_file(tensors, tmp / name)
            fsync(tmp / name)
            record = file_record(tmp / name)
            entries = [
                [p.key, list(p.shape), _dtype_name(p.data), list(p.offsets), list(p.data.shape), f"p{i}"]
                for i, p in enumerate(pieces)
            ]
            del tensors
    except (OSError, SafetensorError, RuntimeError) as exc:
        error = f"rank {comm.rank} could not write {tmp / name}: {_first_line(exc)}"
    reports = _gather_json(comm, device, {"error": error, "file": name, "record": record, "entries": entries})

    if comm.rank == 0:
        errors = [r["error"] for r in reports if r["error"]]
        if not errors:
            try:
                _finish(tmp, final, step, reports, train_state, meta, comm.size)
                prune(root, keep, protect=final)
            except (OSError, ValueError, RuntimeError) as exc:
                errors.append(f"rank 0 could not finish the checkpoint {final}: {_first_line(exc)}")
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)
        error = errors[0] if errors else None
    _agree(comm, device, error)
    return final


def _finish(tmp: Path, final: Path, step: int, reports: list[dict], train_state: dict, meta: dict, world: int) -> None:
    """Rank 0: check the pieces, write the index, the train state and meta.json (last), install."""
    index: dict[str, dict] = {}
    files = {}
    for report in reports:
        if report["record"] is None:
            continue
        path = tmp / report["file"]
        if not path.is_file() or path.stat().st_size != report["record"]["size"]:
            raise RuntimeError(
                f"{path} is not where its rank wrote it; the run folder must be on a filesystem every rank "
                "sees (a shared one across nodes)"
            )
        files[report["file"]] = report["record"]
        for key, shape, dtype, offsets, sizes, name in report["entries"]:
            entry = index.setdefault(key, {"shape": shape, "dtype": dtype, "pieces": []})
            if entry["shape"] != shape or entry["dtype"] != dtype:
                raise RuntimeError(f"ranks disagree on {key}: {entry['shape']} {entry['dtype']} and {shape} {dtype}")
            entry["pieces"].append([report["file"], name, offsets, sizes])
    for key, entry in index.items():
        wrong = coverage(tuple(entry["shape"]), [(tuple(o), tuple(s)) for _, _, o, s in entry["pieces"]])
        if wrong:
            raise RuntimeError(f"the pieces of {key} do not cover it once: {wrong}")
    with open(tmp / INDEX_FILE, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "tensors": index}, f)
        flush(f)
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(train_state, f)
        flush(f)
    files |= {name: file_record(tmp / name) for name in (INDEX_FILE, STATE_FILE)}
    record = {"step": step, "loom_version": __version__, "format": FORMAT, "world_size": world, "files": files}
    with open(tmp / META_FILE, "w", encoding="utf-8") as f:
        json.dump({**record, **meta}, f, indent=2)
        flush(f)
    fsync_dir(tmp)
    install(tmp, final)


def _finite(t: torch.Tensor) -> bool:
    """No inf or NaN in ``t``: its min and max are finite (NaN propagates into both; one pass over
    the data, no mask: 35x faster than ``isfinite(t).all()`` on a CPU, so saves stay cheap)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- collectives


def _agree(
    comm: Comm,
    device: torch.device | str,
    error: str | None,
    fix: str = "check the run folder's free space and permissions; the previous checkpoint is intact.",
) -> None:
    """Raise on every rank if ``error`` is set on any (the first failing rank's message)."""
    first = torch.tensor([comm.rank if error else comm.size], dtype=torch.int64, device=device)
    comm.all_reduce(first, op="min", tag="checkpoint")
    failed = int(first.item())
    if failed == comm.size:
        return
    text = _broadcast_text(comm, device, error or "", failed)
    raise LoomError(f"the checkpoint could not be saved: {text}.", fix)


def _broadcast_text(comm: Comm, device: torch.device | str, text: str, src: int) -> str:
    return broadcast_text(comm, device, text, src, tag="checkpoint")


def _gather_json(comm: Comm, device: torch.device | str, obj: Any) -> list[Any] | None:
    return gather_json(comm, device, obj, tag="checkpoint")


# ----------------------------------------------------------------------------- loading


@dataclass
class OpenCheckpoint:
    """A verified checkpoint of either format, its tensors read by box on demand."""

    step: int
    meta: dict[str, Any]
    train_state: dict[str, Any]
    tensors: CheckpointTensors
    path: Path


class CheckpointTensors:
    """The global tensors of a checkpoint (:class:`loom.parallel.pieces.Reader`), read lazily.

    ``index``: key -> {"shape", "dtype", "pieces": [[file, name, offsets, sizes], ...]};
    ``memory``: global tensors already in memory (a single-file checkpoint's optimizer state).
    """

    def __init__(self, path: Path, index: dict[str, dict], memory: dict[str, torch.Tensor] | None = None) -> None:
        self.path, self.index, self.memory = path, index, memory or {}
        self._open: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return [*self.index, *self.memory]

    def shape(self, key: str) -> tuple[int, ...] | None:
        if key in self.memory:
            return tuple(self.memory[key].shape)
        return tuple(self.index[key]["shape"]) if key in self.index else None

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        if key in self.memory:
            return self.memory[key][box].to(dtype, copy=True)
        if key not in self.index:
            raise damaged(self.path, f"it has no tensor {key}")
        out = torch.empty(sizes, dtype=dtype)
        covered = 0
        for file, name, p_offsets, p_sizes in self.index[key]["pieces"]:
            lo = [max(o, po) for o, po in zip(offsets, p_offsets)]
            hi = [min(o + s, po + ps) for o, s, po, ps in zip(offsets, sizes, p_offsets, p_sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            handle = self._handle(file)
            try:
                if not sizes:  # 0-d
                    part = handle.get_tensor(name)
                else:
                    part = handle.get_slice(name)[tuple(slice(a - po, b - po) for a, b, po in zip(lo, hi, p_offsets))]
            except (SafetensorError, RuntimeError) as exc:
                raise damaged(self.path, f"piece {name} of {key} in {file} could not be read ({exc})") from None
            box = tuple(b - a for a, b in zip(lo, hi))
            if tuple(part.shape) != box:  # the file's tensor is not the shape the index gives it
                raise damaged(
                    self.path, f"piece {name} of {key} in {file} holds {tuple(part.shape)} where the index says {box}"
                )
            out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))] = part.to(dtype)
            covered += math.prod(b - a for a, b in zip(lo, hi))
        if covered != math.prod(sizes):
            raise damaged(self.path, f"the pieces of {key} do not cover the box at {offsets} of {sizes}")
        return out

    def full(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole global tensor ``key`` (in its saved dtype unless ``dtype``)."""
        shape = self.shape(key)
        saved = self.memory[key].dtype if key in self.memory else _DTYPES[self.index[key]["dtype"]]
        return self.read(key, (0,) * len(shape), shape, dtype or saved)

    def _handle(self, file: str) -> Any:
        if file not in self._open:
            try:
                self._open[file] = safe_open(self.path / file, framework="pt", device="cpu")
            except (SafetensorError, OSError) as exc:
                raise damaged(self.path, f"{file} could not be opened ({exc})") from None
        return self._open[file]

    def close(self) -> None:
        self._open.clear()


def open_checkpoint(path: Path, comm: Comm | None = None, device: torch.device | str = "cpu") -> OpenCheckpoint:
    """Open a checkpoint of either format (``path`` may be a run folder: its latest), every file
    verified against meta.json; with ``comm``, the shard files' hashing is split over its ranks."""
    path = resolve(Path(path))
    meta = read_meta(path)
    sharded = meta.get("format") == FORMAT
    needed = (INDEX_FILE, STATE_FILE) if sharded else (MODEL_FILE, STATE_FILE)
    for name in needed:
        if name not in meta["files"]:
            raise damaged(path, f"meta.json lists no {name}")
    if sharded:
        _verify_split(path, meta["files"], needed, comm, device)
    else:
        for name, want in meta["files"].items():
            verify(path, name, want)
    try:
        train_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        if sharded:
            index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))["tensors"]
            tensors = CheckpointTensors(path, index)
        else:
            tensors = _single_file_tensors(path, train_state)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        # Reached only if meta.json was rewritten to match damaged files.
        raise damaged(path, f"its files could not be read ({exc})") from None
    return OpenCheckpoint(int(meta["step"]), meta, train_state, tensors, path)


def _verify_split(
    path: Path, files: dict[str, dict], always: tuple[str, ...], comm: Comm | None, device: torch.device | str
) -> None:
    """Sizes of every file and sha256 of the small ones here; the shards' sha256 split over ``comm``."""
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    shards = sorted(name for name in files if name not in always)
    problem = None
    try:
        for name in always:
            verify(path, name, files[name])
        for name in shards:
            file = path / name
            if not file.is_file() or file.stat().st_size != files[name].get("size"):
                verify(path, name, files[name])  # raises, naming what is wrong
        for name in shards[rank::size]:
            if sha256(path / name) != files[name].get("sha256"):
                verify(path, name, files[name])
    except LoomError as exc:
        problem = exc
    if comm is None or comm.size == 1:
        if problem is not None:
            raise problem
        return
    first = torch.tensor([rank if problem else size], dtype=torch.int64, device=device)
    comm.all_reduce(first, op="min", tag="checkpoint")
    if int(first.item()) < size:
        text = _broadcast_text(comm, device, str(problem) if problem else "", int(first.item()))
        raise problem if problem is not None else LoomError(text.split("\nFix: ")[0], text.partition("\nFix: ")[2])


def _single_file_tensors(path: Path, train_state: dict) -> CheckpointTensors:
    """The single-file format as global tensors: weights by lazy slices, AdamW state in memory."""
    index = {}
    with safe_open(path / MODEL_FILE, framework="pt", device="cpu") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            shape = list(sl.get_shape())
            piece = [MODEL_FILE, name, [0] * len(shape), shape]
            index[f"model/{name}"] = {"shape": shape, "dtype": _st_dtype(sl.get_dtype()), "pieces": [piece]}
    memory = {}
    for name, entry in train_state.get("optimizer", {}).get("state", {}).items():
        for what, value in entry.items():
            if torch.is_tensor(value):
                memory[f"optim/{name}/{what}"] = value.detach().float() if what == "step" else value.detach()
    return CheckpointTensors(path, index, memory)


def _st_dtype(code: str) -> str:
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}.get(code, "float32")


def consolidated(ckpt: OpenCheckpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model state and AdamW state of a checkpoint at full size, name-keyed (one tensor at a
    time is assembled; the result holds them all: for tools and exports, not for training)."""
    model, optim = {}, {}
    for key in ckpt.tensors.keys():
        kind, _, rest = key.partition("/")
        if kind == "model":
            model[rest] = ckpt.tensors.full(key)
        elif kind == "optim":
            name, _, what = rest.rpartition("/")
            optim.setdefault(name, {})[what] = ckpt.tensors.full(key)
    return model, optim
