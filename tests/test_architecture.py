"""The package's shape: no import cycle, layers import only downward, every module documented, short files."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400
ROOT_SHARED = {"dist_cardio.config", "dist_cardio.atomic", "dist_cardio.distributed", "dist_cardio.host_memory",
               "dist_cardio.model"}
ALLOWED = {  # layer → layers its modules may import at module level (besides their own and root shared modules)
    "signals": set(),
    "shard": set(),
    "data": {"shard"},
    "train": {"data"},
    "downstream": {"shard", "data", "train"},
}


def _sources() -> list[Path]:
    return sorted(p for d in ("dist_cardio", "launchers") for p in (REPO / d).rglob("*.py"))


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Package modules imported when ``path`` is imported (module-level statements, not TYPE_CHECKING/lazy)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in _sources()}
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "dist_cardio" and len(parts) > 1 else None


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [m, n]))
            if n not in state:
                visit(n, stack + [m] if n != m else stack)
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_layers_import_downward_only():
    bad = []
    for m, deps in _graph().items():
        layer = _layer(m)
        if m in ROOT_SHARED:
            bad += [f"{m} -> {d}" for d in deps if d not in ROOT_SHARED and d != "dist_cardio"]
        elif layer in ALLOWED:
            for d in deps:
                if d in ROOT_SHARED or d == "dist_cardio" or _layer(d) == layer or _layer(d) in ALLOWED[layer]:
                    continue
                bad.append(f"{m} -> {d}")
    assert not bad, bad


def test_every_module_is_named_in_the_architecture_doc():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    missing = [str(p.relative_to(REPO)) for p in _sources() if f"`{p.relative_to(REPO)}`" not in doc]
    assert not missing, missing


def test_no_source_file_is_too_long():
    long = {str(p.relative_to(REPO)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_package_root_holds_only_entry_points_and_shared_modules():
    root = {p.name for p in (REPO / "dist_cardio").glob("*.py")}
    assert root == {"__init__.py", "cli.py", "config.py", "atomic.py", "distributed.py", "host_memory.py", "model.py"}, root
