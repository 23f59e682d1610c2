"""loom: train GPT-2 and Llama style language models on one process or many.

See README.md for the two commands (demo, tests) and design.md for the architecture.
"""

__version__ = "0.1.0"
