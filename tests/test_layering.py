"""The import direction is scripts -> tools -> core: core never imports tools, tools never a script."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.cli_runner import REPO

SCRIPTS = {path.stem for path in REPO.glob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Top-level package or module names that ``path`` imports (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_nothing_from_the_layers_above():
    offenders = {path.name: sorted(imported_modules(path) & ({"tools"} | SCRIPTS))
                 for path in sorted((REPO / "core").rglob("*.py"))}
    assert not {name: found for name, found in offenders.items() if found}


def test_tools_never_import_a_stage_script():
    offenders = {path.name: sorted(imported_modules(path) & SCRIPTS) for path in sorted((REPO / "tools").glob("*.py"))}
    assert not {name: found for name, found in offenders.items() if found}


def test_evaluate_starts_without_torch():
    probe = "import sys, evaluate; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
