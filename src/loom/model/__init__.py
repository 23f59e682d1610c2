"""Decoder-only transformer (GPT-2 and Llama families), its init, and HF tensor names."""
