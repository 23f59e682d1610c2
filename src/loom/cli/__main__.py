"""``python -m loom.cli``: what torchrun and the local launcher start on every rank."""

import sys

from loom.cli import main

sys.exit(main())
