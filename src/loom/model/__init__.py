"""Decoder-only transformer (GPT-2 and Llama families), presets, and HF interop."""
