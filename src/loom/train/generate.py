"""Sampling text from a model: temperature and top-k, no KV cache (the context is re-run)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loom.config import Config, config_from_dict
from loom.errors import LoomError
from loom.model.transformer import Transformer
from loom.train.checkpoint import load_checkpoint
from loom.train.precision import resolve_device
from loom.train.tokenizer import Tokenizer, load_tokenizer


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    max_seq_len: int,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Extend ``prompt`` by up to ``max_new_tokens`` tokens; temperature 0 is greedy.

    The context fed to the model is the last ``max_seq_len`` tokens. Sampling uses its own
    generator seeded by ``seed``, so the same call gives the same text.
    """
    if not getattr(model, "head", True) or not getattr(model, "embed", True):
        raise ValueError("generate needs the whole model; this one is a pipeline stage (load the full checkpoint)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_seq_len:])[:, -1, :].float()
        if temperature <= 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
        if stop_id is not None and next_id.item() == stop_id:
            break
    model.train(was_training)
    return ids[0, len(prompt) :].tolist()


def load_for_inference(
    path: Path, device: str = "auto", tokenizer_spec: str | None = None
) -> tuple[nn.Module, Config, Tokenizer]:
    """Model (eval mode), config and tokenizer of a checkpoint folder or a run folder's newest.

    The tokenizer is the one the checkpoint's config names, unless ``tokenizer_spec`` is given.
    """
    checkpoint = load_checkpoint(path)
    config = config_from_dict(checkpoint.meta["config"])
    tokenizer = load_tokenizer(tokenizer_spec or config.data.tokenizer)
    if config.model.vocab_size is None:
        config.model.vocab_size = tokenizer.vocab_size
    if tokenizer.vocab_size > config.model.vocab_size:
        raise LoomError(
            f"the tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} tokens but the model in {checkpoint.path} "
            f"only {config.model.vocab_size}.",
            "pass the tokenizer the model was trained with: --tokenizer PATH/tokenizer.json.",
        )
    model = Transformer(config.model, device=resolve_device(device))
    model.load_state_dict(checkpoint.model_state)
    model.eval()
    return model, config, tokenizer
