"""The layout holds: imports go scripts -> tools -> core (statically and dynamically), the tools' modules form
no import cycle, package ``__init__`` files are empty, and usage errors exit 2 through the shared path."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.cli_runner import REPO

SCRIPTS = {path.stem for path in REPO.glob("*.py")}
TOOLS = sorted((REPO / "tools").rglob("*.py"))
SCRIPT_LOADER = REPO / "tools" / "cli" / "repository.py"  # the one place that runs a stage script's file
DYNAMIC_IMPORTS = {"import_module", "__import__", "run_path", "run_module", "spec_from_file_location", "exec"}


def imported_modules(path: Path) -> set[str]:
    """Full dotted names that ``path`` imports (at any depth of the file, lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def test_core_imports_nothing_from_the_layers_above():
    offenders = {path.name: sorted(name for name in imported_modules(path)
                                   if name.split(".")[0] in {"tools"} | SCRIPTS)
                 for path in sorted((REPO / "core").rglob("*.py"))}
    assert not {name: found for name, found in offenders.items() if found}


def test_tools_never_import_a_stage_script():
    offenders = {module_name(path): sorted(name for name in imported_modules(path) if name.split(".")[0] in SCRIPTS)
                 for path in TOOLS}
    assert not {name: found for name, found in offenders.items() if found}


def test_tools_load_code_dynamically_only_through_the_script_loader():
    """``importlib.import_module`` / ``__import__`` / ``runpy`` would hide an upward import from the test above;
    only ``tools/cli/repository.py`` may run a stage script, by path, without its ``main``."""
    offenders = {}
    for path in TOOLS:
        calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)}
        found = sorted(calls & DYNAMIC_IMPORTS)
        if found and path != SCRIPT_LOADER:
            offenders[module_name(path)] = found
    assert not offenders


def test_the_tools_modules_import_no_cycle():
    """Following imports from any tools module never comes back to it (the data layer used to run in a circle)."""
    modules = {module_name(path).removesuffix(".__init__"): path for path in TOOLS}
    graph = {name: {imported for imported in imported_modules(path) if imported in modules and imported != name}
             for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            assert state.get(imported) != "open", " -> ".join([*trail, name, imported])
            if imported not in state:
                visit(imported, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_package_init_files_are_empty():
    assert [str(path) for path in sorted(REPO.glob("*/**/__init__.py")) if ".venv" not in path.parts
            and path.read_text().strip()] == []


def test_no_script_ends_a_usage_error_with_its_own_exit():
    """Every usage error goes through ``UsageError`` or argparse (exit 2), every bad input through the error
    types ``run_main`` maps to 1: no ``SystemExit("error: ...")`` of its own, which exits 1 whatever it is."""
    offenders = []
    for path in [*sorted(REPO.glob("*.py")), *TOOLS]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "SystemExit" and node.args \
                    and not isinstance(node.args[0], ast.Name):  # SystemExit(EXIT_...) only
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_evaluate_starts_without_torch():
    probe = "import sys, evaluate; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
