"""Import directions, read from the source (AST): lower layers never import upper ones, and no module import cycle.

Every import counts, those inside functions too; imports under `if TYPE_CHECKING:` do not (they never run).
Entry points (`__main__.py`, a `cli.py`, and the thin `python -m` launchers named below) may import upward, to
read a run config, say; library modules may not."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("drafting", "migration", "actors", "trainer", "configs", "bench")
# `python -m drafting.profile` and `python -m trainer.distill_draft`: documented commands, kept as launchers
LAUNCHERS = {"drafting.profile", "trainer.distill_draft"}
# the engine's layers, bottom up; a module imports only from its own layer or those below it
DRAFTING_LAYERS = ("drafting.records", "drafting.model", "drafting.spec", "drafting.policy", "drafting.runtime",
                   "drafting.calibrate")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {"launch": ROOT / "launch.py"}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            found[module_name(p)] = p
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(path: Path) -> set[str]:
    """Every module this file imports (absolute names; `from a import b` gives `a` and `a.b`)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (this project imports absolutely)"
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def is_entry_point(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("__main__", "cli") or name in LAUNCHERS or name == "launch"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path) for name, path in mods.items()}


def project_edges(graph) -> dict[str, set[str]]:
    """Edges between project modules only (a package import counts as its `__init__`)."""
    return {m: {i for i in imps if i in graph and i != m} for m, imps in graph.items()}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph, owners: str, forbidden: tuple[str, ...], allow_entry_points: bool = True) -> list[str]:
    return sorted(f"{m} imports {i}" for m, imps in graph.items() if within(m, owners)
                  and not (allow_entry_points and is_entry_point(m))
                  for i in imps if any(within(i, f) for f in forbidden))


def test_no_module_import_cycle(graph):
    edges = project_edges(graph)
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_engine_imports_nothing_above_it(graph):
    assert violations(graph, "drafting", ("trainer", "actors", "migration", "configs", "bench", "ray")) == []


def test_the_engines_layers_import_downward_only(graph):
    def layer(name: str) -> int | None:
        return next((i for i, pre in enumerate(DRAFTING_LAYERS) if within(name, pre)), None)

    bad = []
    for m, imps in graph.items():
        own = layer(m)
        if own is None or is_entry_point(m):
            continue
        bad += [f"{m} (layer {DRAFTING_LAYERS[own]}) imports {i}" for i in imps
                if within(i, "drafting") and (layer(i) is None or layer(i) > own)]
    assert sorted(bad) == []


def test_migration_does_not_import_the_trainer(graph):
    assert violations(graph, "migration", ("trainer", "actors", "configs", "ray")) == []


def test_trainer_core_imports_no_ray_and_no_layer_above_it(graph):
    assert violations(graph, "trainer.core", ("ray", "actors", "trainer.loop", "trainer.draft", "trainer.tiny"),
                      allow_entry_points=False) == []


def test_trainer_draft_imports_no_ray_and_not_the_loop(graph):
    assert violations(graph, "trainer.draft", ("ray", "actors", "trainer.loop")) == []


def test_the_checker_sees_what_it_must(tmp_path):
    """The rules above would pass on an empty graph: the reader finds function-level imports, skips
    TYPE_CHECKING ones, and the cycle search reports a cycle."""
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trainer.loop\n"
                   "def f():\n    from trainer.core import algorithms\n")
    assert imports_of(src) == {"typing", "typing.TYPE_CHECKING", "trainer.core", "trainer.core.algorithms"}
    assert violations({"drafting.x": {"trainer.core"}}, "drafting", ("trainer",)) == ["drafting.x imports trainer.core"]
    assert violations({"drafting.cli": {"trainer.core"}}, "drafting", ("trainer",)) == []
