"""``loom convert``: a local Hugging Face folder (config.json + safetensors) to a loom checkpoint, and back.

The tensor and config mapping is :mod:`loom.model.hf`'s; this module reads and writes the
folders: weights only through safetensors (never a pickle), the config through JSON, and
the loom side through :mod:`loom.train.checkpoint`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from loom.config import TrainConfig, config_from_dict
from loom.errors import LoomError
from loom.model.hf import check_loads, config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from loom.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from loom.train.tokenizer import load_tokenizer


def import_hf(hf_dir: Path, out_dir: Path) -> Path:
    """Turn a local HF folder (config.json + safetensors) into loom checkpoint step 0 of ``out_dir``."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise LoomError(
            f"Hugging Face folder {hf_dir} does not exist.", "pass a local folder written by save_pretrained."
        )
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise LoomError(
            f"{hf_dir} has no config.json.", "pass the folder save_pretrained wrote (config.json next to the weights)."
        )
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoomError(
            f"{config_file} is not valid JSON ({exc}).", "re-save the model with save_pretrained."
        ) from None
    if not isinstance(hf_config, dict):
        raise LoomError(f"{config_file} is not a JSON object.", "re-save the model with save_pretrained.")
    cfg = config_from_hf(hf_config)
    state = state_dict_from_hf(_read_weights(hf_dir), cfg)
    check_loads(state, cfg)
    if [p for p in list_checkpoints(out_dir) if p.name != "step_000000"]:
        raise LoomError(
            f"{out_dir} already holds training checkpoints, which importing (keep=1) would delete.",
            "import into a new, empty folder.",
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    source: dict[str, Any] = {
        "format": "huggingface",
        "path": str(hf_dir.resolve()),
        "model_type": hf_config["model_type"],
        "architectures": hf_config.get("architectures"),
    }
    if (hf_dir / "tokenizer.json").is_file():
        tokenizer = str((out_dir / "tokenizer.json").resolve())
        shutil.copyfile(hf_dir / "tokenizer.json", tokenizer)
    else:
        tokenizer = "byte"
        source["note"] = (
            "no tokenizer.json in the Hugging Face folder; data.tokenizer is byte, whose ids differ from the model's."
        )
    loom_config: dict[str, Any] = {"model": asdict(cfg), "data": {"tokenizer": tokenizer}}
    if cfg.max_seq_len < TrainConfig.seq_len:
        loom_config["train"] = {"seq_len": cfg.max_seq_len}
    config_from_dict(loom_config)  # fail now, not when someone trains from it
    return save_checkpoint(out_dir, 0, state, train_state={}, meta={"config": loom_config, "source": source}, keep=1)


def _read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards model.safetensors.index.json names. Never pickles."""
    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif index.is_file():
        try:
            files = [
                hf_dir / f for f in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LoomError(
                f"{index} is not a shard index ({exc!r}).", "re-save the model with save_pretrained."
            ) from None
    elif pickles := sorted(p.name for p in hf_dir.glob("pytorch_model*.bin")):
        raise LoomError(
            f"{hf_dir} holds only pickled weights ({', '.join(pickles)}); loom never unpickles weights (that can run code).",
            "re-save the model in a Python session you trust: model.save_pretrained(dir, safe_serialization=True).",
        )
    else:
        raise LoomError(
            f"{hf_dir} has no model.safetensors or model.safetensors.index.json.",
            "pass the folder save_pretrained wrote.",
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise LoomError(
                f"weight shard {file} named by {index.name} is missing.",
                "download or copy every shard into the folder.",
            )
        try:
            state |= safetensors.torch.load_file(file)
        except (SafetensorError, OSError) as exc:
            raise LoomError(f"could not read {file} ({exc}).", "re-save or re-download the weights.") from None
    return state


def consolidate(checkpoint: Path, out_dir: Path) -> Path:
    """A checkpoint of any layout (or a run's latest) as one single-file checkpoint in ``out_dir``:
    ``model.safetensors`` with every weight at full size, the AdamW state name-keyed in
    ``train_state.pt``; loom resumes it under any layout, and any safetensors reader reads it.
    Assembled tensor by tensor, on one host (the whole model is held once while writing)."""
    ckpt = load_checkpoint(Path(checkpoint))
    out_dir = Path(out_dir)
    if list_checkpoints(out_dir):
        raise LoomError(
            f"{out_dir} already holds checkpoints, which consolidating (keep=1) would delete.",
            "consolidate into a new, empty folder.",
        )
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("step", "loom_version", "files", "format", "world_size")}
    meta["consolidated_from"] = str(ckpt.path.resolve())
    return save_checkpoint(out_dir, ckpt.step, ckpt.model_state, ckpt.train_state, meta, keep=1)


def export_hf(checkpoint: Path, out_dir: Path) -> Path:
    """Write a loom checkpoint (or a run's latest) as an HF folder: config.json, model.safetensors, tokenizer.json."""
    ckpt = load_checkpoint(Path(checkpoint))
    if not isinstance(ckpt.meta.get("config"), dict):
        raise LoomError(
            f"checkpoint {ckpt.path} has no run config in meta.json.",
            "export a checkpoint loom train or import_hf wrote.",
        )
    config = config_from_dict(ckpt.meta["config"])
    cfg = config.model
    hf_config = config_to_hf(cfg)
    check_loads(ckpt.model_state, cfg)
    hf_state = state_dict_to_hf(ckpt.model_state, cfg)
    tokenizer = load_tokenizer(config.data.tokenizer)
    eos = tokenizer.eos_id if tokenizer.eos_id < cfg.vocab_size else None
    hf_config |= {
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": None,
        "dtype": str(ckpt.model_state["tok_emb.weight"].dtype).removeprefix("torch."),
    }

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(hf_state, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    if config.data.tokenizer != "byte":
        shutil.copyfile(tokenizer.spec, out_dir / "tokenizer.json")
    return out_dir
