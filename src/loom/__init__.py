"""loom: train GPT-2 and Llama style language models on one process or many.

See README.md for the two commands (demo, tests), the configuration, and the layout of the code
(its layers, lowest first, and what each package holds).
"""

__version__ = "0.1.0"
