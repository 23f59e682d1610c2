"""The training loop and what it needs: data, tokenizer, checkpoints, metrics."""
