"""Imports run one way: each package imports only from its own layer or lower ones, and no
module imports itself back through others (no cycle), not even inside a function.

The order, lowest first (README "Layout" says the same):

    loom, loom.errors        the version and the user-facing error
    loom.distributed         processes, groups, counted collectives
    loom.optim               optimizers, loss scale, lr schedule (over counted collectives)
    loom.parallel            placement, tensor/sequence parallel, DDP, ZeRO (not the pipeline)
    loom.parallel.pipeline   partition, schedules as data, simulator, runtime
    loom.config, presets,    the run's settings, validated (schedule names and layer splits from below);
      sparsity               sparse attention layouts as data
    loom.plan                analytic models from a config: nothing here starts a process
    loom.model               the transformer, built from parallel-aware layers
    loom.train               trainer, update strategies, data, checkpoints, metrics
    loom.viz                 plots of runs and schedules
    loom.cli                 the loom command

A lower layer that needs a value from a higher one gets it passed in (a ``Protocol`` states
what it reads, e.g. ``loom.distributed.mesh.LayoutRequest``).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = [
    ("loom", "loom.errors", "loom.native"),
    ("loom.distributed",),
    ("loom.optim",),
    ("loom.parallel",),
    ("loom.parallel.pipeline",),
    ("loom.config", "loom.presets", "loom.sparsity", "loom.attention_walk"),
    ("loom.plan",),
    ("loom.model",),
    ("loom.train",),
    ("loom.viz",),
    ("loom.cli",),
]


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted((SRC / "loom").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest entry that is ``module`` or a package above it
    (``loom`` itself matches only the root module, not everything under it)."""
    best, index = "", None
    for i, names in enumerate(LAYERS):
        for name in names:
            inside = module == name or (name != "loom" and module.startswith(name + "."))
            if inside and len(name) > len(best):
                best, index = name, i
    if index is None:
        raise AssertionError(f"module {module} is in no layer: add it to LAYERS here and to the README's list")
    return index


def imports_of(path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, loom module) for every import of a loom module anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from loom.a import b``: the submodule loom.a.b when there is one, else loom.a
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        else:
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: use absolute imports"
            continue
        found += [(node.lineno, t) for t in targets if t == "loom" or t.startswith("loom.")]
    return found


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[int, str]]]]:
    known = modules()
    return known, {name: imports_of(path, known) for name, path in known.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_import_goes_up_a_layer() -> None:
    known, edges = graph()
    wrong = [
        f"{known[src].relative_to(SRC)}:{line} imports {dst} "
        f"(layer {layer_of(dst)} {LAYERS[layer_of(dst)][0]}) from layer {layer_of(src)} {LAYERS[layer_of(src)][0]}"
        for src, targets in edges.items()
        for line, dst in targets
        if layer_of(dst) > layer_of(src)
    ]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycle() -> None:
    _, edges = graph()
    targets = {src: sorted({dst for _, dst in found if dst != src}) for src, found in edges.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in targets.get(node, []):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(targets):
        if node not in state:
            visit(node)


def test_the_check_sees_what_it_should(tmp_path: Path) -> None:
    """The walker finds imports inside functions and resolves ``from pkg import module``."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from loom.train import trainer\n    import loom.cli\n", encoding="utf-8")
    known = {"loom.train.trainer": Path(), "loom.cli": Path()}
    assert imports_of(source, known) == [(2, "loom.train.trainer"), (3, "loom.cli")]
    assert layer_of("loom.parallel.pipeline.runtime") > layer_of("loom.parallel.tensor")
    assert layer_of("loom") == layer_of("loom.errors") == 0
