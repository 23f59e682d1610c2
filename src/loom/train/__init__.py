"""The training loop and what it needs: the wiring of a rank, the update strategies, data,
tokenizer, checkpoints, metrics, generation and HF folder conversion."""
