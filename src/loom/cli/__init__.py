"""The ``loom`` command: train, generate, convert, tokenizer, plot, config, presets, schedule,
attention-layout, plan.

``parser`` holds the arguments, ``train_command`` and ``plan_command`` the two large commands,
``tools`` the others. Every user mistake surfaces as a :class:`LoomError`: printed as one paragraph
(problem, then fix) on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import sys

from loom.cli.parser import build_parser
from loom.cli.plan_command import cmd_plan
from loom.cli.tools import (
    cmd_attention_layout,
    cmd_config,
    cmd_convert,
    cmd_generate,
    cmd_plot,
    cmd_presets,
    cmd_schedule,
    cmd_tokenizer,
)
from loom.cli.train_command import cmd_train
from loom.errors import LoomError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "train": cmd_train,
        "generate": cmd_generate,
        "convert": cmd_convert,
        "tokenizer": cmd_tokenizer,
        "plot": cmd_plot,
        "config": cmd_config,
        "presets": cmd_presets,
        "schedule": cmd_schedule,
        "attention-layout": cmd_attention_layout,
        "plan": cmd_plan,
    }[args.command]
    try:
        return handler(args) or 0
    except LoomError as err:
        print(f"loom: error: {err.problem}\n  fix: {err.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loom: interrupted; the newest complete checkpoint is intact (resume with --resume).", file=sys.stderr)
        return 130
