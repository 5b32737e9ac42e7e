"""The repository's own files: its root (data/, the recipes, the presets) and the stage scripts' top-level
code, loaded by path for the tools that need it without running a stage.

The pipeline driver asks each script's own ``parse_args`` which settings a run would record, and the
benchmark times each script's ``train_step`` with its model builders and default constants, so neither
keeps a copy. Imports go one way (scripts -> tools -> core, ``tests/test_layering.py``): no tool imports a
script as a module; this is the one place that runs a script's file, with ``runpy`` under a name other
than ``__main__``, so its ``main`` does not run.
"""
from __future__ import annotations

import runpy
from functools import cache
from pathlib import Path
from types import SimpleNamespace

REPOSITORY = Path(__file__).resolve().parents[2]
TOOLS_PACKAGE = "tools."


@cache
def stage_script(name: str) -> SimpleNamespace:
    """The top-level names of ``<repository>/<name>.py`` (e.g. ``train_semformer``), or of a ``tools.<module>``
    entry point given by its dotted name (a recipe's ``-m tools.baseline_cams`` stage)."""
    if name.startswith(TOOLS_PACKAGE):
        return SimpleNamespace(**runpy.run_module(name, run_name=f"loaded_{name}"))
    path = REPOSITORY / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such stage script")
    return SimpleNamespace(**runpy.run_path(str(path), run_name=f"loaded_{name}"))
