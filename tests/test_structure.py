"""The package's shape: no import cycle inside mimcli (every import statement counts, also those
inside functions and under ``if TYPE_CHECKING:``), the light modules stay light (results and
the package root without torch; the library without typer), and ARCHITECTURE.md names every
module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mimcli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every module named by an import statement anywhere in the file (absolute form)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)  # submodule imports
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {
        name: {t for t in imported_names(path, name) if t in modules and t != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_function_level_type_checking_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from mimcli.refine.config import RefineConfig\n"
        "def f():\n    from mimcli import probe\n    import mimcli.evaluate.knn\n"
        "from .sibling import thing\n"
    )
    names = imported_names(src, "mimcli.models.m")
    assert {"mimcli.refine.config", "mimcli.probe", "mimcli.evaluate.knn"} <= names
    assert "mimcli.models.sibling" in names


def test_no_import_cycle_inside_mimcli():
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 100  # the graph was really read
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_results_and_the_package_root_stay_free_of_torch():
    graph = import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    modules = all_modules()
    # statically, TYPE_CHECKING imports included; the registry is checked at run time only (its
    # type hints name the torch-based Objective)
    for light in ("mimcli", "mimcli.results", "mimcli.blocks"):
        third_party = set().union(*(imported_names(modules[m], m) for m in reach(light)))
        assert not {n for n in third_party if n.split(".")[0] == "torch"}, light
    code = (
        "import sys, mimcli, mimcli.results, mimcli.blocks, mimcli.objectives; "
        "print(sorted(m for m in ('torch', 'timm', 'typer') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_the_cli_imports_typer():
    modules = all_modules()
    library = [m for m in modules if not m.startswith("mimcli.cli")]
    static = [
        m for m in library if any(n.split(".")[0] == "typer" for n in imported_names(modules[m], m))
    ]
    assert static == []
    code = (
        "import importlib, sys\n"
        + "".join(f"importlib.import_module({m!r})\n" for m in library)
        + "print('typer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def architecture_table() -> set[str]:
    """First-column entries of ARCHITECTURE.md's module table (backquoted names)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            cell = line.split("|")[1]
            names.update(part.strip("` ") for part in cell.split(",") if "`" in part)
    return names


def test_architecture_names_every_module():
    table = architecture_table()
    expected = {name.removeprefix("mimcli.").replace(".", "/") for name in all_modules()}
    expected.discard("mimcli")  # the package root: described in the text
    missing = sorted(expected - table)
    assert not missing, f"ARCHITECTURE.md's module table lacks {missing}"
    stale = sorted(table - expected)
    assert not stale, f"ARCHITECTURE.md's module table names modules that do not exist: {stale}"
