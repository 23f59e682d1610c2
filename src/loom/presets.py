"""Model presets as data. ``tiny`` is the demo; the large ones are for planning.

Each preset lists only architecture fields; anything not listed keeps the
:class:`loom.config.ModelConfig` default. The Llama presets follow the Llama-2 family
(32k vocabulary); ``llama-1b`` has the shape of TinyLlama-1.1B.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "custom": {},  # every field from the config itself (used for imported checkpoints)
    "tiny": dict(family="gpt2", n_layers=4, d_model=128, n_heads=4, max_seq_len=256),
    "tiny-llama": dict(family="llama", n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "gpt2-124m": dict(family="gpt2", n_layers=12, d_model=768, n_heads=12, vocab_size=50257, max_seq_len=1024),
    "gpt2-350m": dict(family="gpt2", n_layers=24, d_model=1024, n_heads=16, vocab_size=50257, max_seq_len=1024),
    "gpt2-1.5b": dict(family="gpt2", n_layers=48, d_model=1600, n_heads=25, vocab_size=50257, max_seq_len=1024),
    "gpt3-175b": dict(family="gpt2", n_layers=96, d_model=12288, n_heads=96, vocab_size=50257, max_seq_len=2048),
    "llama-1b": dict(
        family="llama",
        n_layers=22,
        d_model=2048,
        n_heads=32,
        n_kv_heads=4,
        d_ff=5632,
        vocab_size=32000,
        max_seq_len=2048,
    ),
    "llama-7b": dict(
        family="llama",
        n_layers=32,
        d_model=4096,
        n_heads=32,
        d_ff=11008,
        vocab_size=32000,
        max_seq_len=4096,
    ),
    "llama-13b": dict(
        family="llama",
        n_layers=40,
        d_model=5120,
        n_heads=40,
        d_ff=13824,
        vocab_size=32000,
        max_seq_len=4096,
    ),
    "llama-70b": dict(
        family="llama",
        n_layers=80,
        d_model=8192,
        n_heads=64,
        n_kv_heads=8,
        d_ff=28672,
        vocab_size=32000,
        max_seq_len=4096,
    ),
}


def preset_fields(name: str) -> dict[str, Any]:
    """The preset's fields plus its own name, ready to be overridden by the user's keys."""
    return {"preset": name, **PRESETS[name]}
