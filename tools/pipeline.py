"""The recipe driver behind ``run_pipeline.py``: a recipe's stages as the commands a user would type.

A recipe (``data/recipes/<name>.json``) is data: the dataset, text variables, and per stage a
title, one command, what it writes (``{"model": tag}`` or ``{"folder", "suffix", "domain"}``),
optionally how it is scored (``{"mode", "domain"}``, through ``evaluate.py``) and whether it runs
under ``torchrun`` (``"distributed"``) when ``--processes`` (alias ``--gpus``) is above 0: one process per
GPU, or on a CPU several one-thread processes (a recipe's ``"cpu_processes"``, the default without CUDA).
Every command gets ``--dataset``, ``--data_dir`` and ``--experiments_dir``, absolute: paths written in a
recipe are relative to the repository root (where the stages run), paths given on the command line to the
current folder. Overrides (``Overrides``:
``--pretrained``, ``--stage_flags``) follow a command's own flags, so they win, and are part of it: the
provenance check sees them.

A stage is skipped when its output is complete and its provenance (``tools.artifacts.provenance``) matches
the command: same settings and dataset, inputs not remade since. Otherwise it runs: a model with ``--resume auto``
if a matching run was interrupted, ``--overwrite`` if its settings or inputs changed; a folder
with ``--overwrite`` if it was made another way (finished files are kept when it was not). Stage
output goes to ``<experiments>/logs/pipeline@<recipe>/<stage>.log``; the terminal shows the stage's
progress bar (``tools.cli.stage_process``). Times and scores are kept in
``<experiments>/logs/pipeline@<recipe>.json``, so a rerun prints the same table.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shlex
import sys
import time
from contextlib import redirect_stderr
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from core.backbones.weights import IMAGENET_ALIAS, PRETRAINED_NONE, PRETRAINED_TIMM
from tools.artifacts.files import ArtifactError, atomic_write_text, read_json
from tools.artifacts.folders import missing_ids
from tools.artifacts.model_card import read_card
from tools.artifacts.paths import ExperimentPaths, evaluation_json
from tools.artifacts.provenance import read_run, stale_reasons
from tools.cli.arguments import UsageError
from tools.cli.presets import recipe_variables
from tools.cli.repository import REPOSITORY, stage_script
from tools.cli.stage_process import run_logged
from tools.data.descriptor import load_descriptor

LOG = logging.getLogger(__name__)

RECIPES = REPOSITORY / "data" / "recipes"
DEFAULT_EXPERIMENTS = "experiments"
TORCHRUN_MODULE = "torch.distributed.run"  # the module behind the torchrun command
CPU_PROCESSES = "cpu_processes"  # recipe key: torchrun processes per node on a machine without CUDA
ALL_STAGES = "*"  # --stage_flags '*=FLAGS': every stage that takes them
PRETRAINED_WORDS = (PRETRAINED_TIMM, PRETRAINED_NONE, IMAGENET_ALIAS)  # --pretrained values that are not paths
UNRECOGNIZED = "unrecognized arguments"  # argparse's message for a flag the script does not have


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    argv: list[str]                 # script (or -m module) and its arguments, variables expanded
    output: dict[str, str]
    score: dict[str, str] | None
    distributed: bool
    overrides: tuple[str, ...] = ()  # flags from the command line, after the common ones (``with_overrides``)

    @property
    def script(self) -> str:
        """The stage script's name (``train_caae``) or the entry point's module (``tools.baseline_cams``)."""
        return self.argv[1] if self.argv[0] == "-m" else Path(self.argv[0]).stem

    @property
    def arguments(self) -> list[str]:
        return self.argv[2:] if self.argv[0] == "-m" else self.argv[1:]


def absolute(path: str | Path, base: Path | None = None) -> str:
    """``path`` made absolute: against ``base`` (the repository root, for a recipe's paths), else against the
    current folder (the command line's); normalised, symbolic links kept."""
    return os.path.normpath(Path(base or Path.cwd()) / path)


def default_processes(recipe: dict[str, Any]) -> int:
    """Processes per node when ``--processes`` is not given: the recipe's ``cpu_processes`` on a machine without
    CUDA (the demo's 2 one-thread processes use 2 cores better than one 2-thread process), else 0 (plain python:
    one GPU, or the CPU's threads)."""
    value = recipe.get(CPU_PROCESSES, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ArtifactError(f"recipe: {CPU_PROCESSES!r} must be a whole number >= 0, got {value!r}")
    return 0 if torch.cuda.is_available() else value


@dataclass(frozen=True)
class Settings:
    """Where the recipe runs: data, artifacts (absolute paths), processes per node (0: plain python)."""

    data_dir: str
    dataset: str
    experiments_dir: str
    processes: int = 0
    python: str = sys.executable

    def common_flags(self) -> list[str]:
        return ["--dataset", self.dataset, "--data_dir", self.data_dir, "--experiments_dir", self.experiments_dir]

    @property
    def paths(self) -> ExperimentPaths:
        return ExperimentPaths(Path(self.experiments_dir))

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], data_dir: str | None = None, experiments_dir: str | None = None,
                    processes: int | None = None, dataset: str | None = None) -> Settings:
        """The flags where given (relative to the current folder), else the recipe's ``data_dir``,
        ``experiments_dir`` (default ``experiments``; the demo and smoke recipes keep theirs under ``demo_data/``)
        and ``dataset`` (with ``{data_dir}`` filled in), relative to the repository root; all absolute. The
        processes per node likewise: the flag's, else ``default_processes``."""
        data_dir = absolute(data_dir) if data_dir else absolute(recipe["data_dir"], REPOSITORY)
        dataset = absolute(dataset) if dataset else absolute(recipe["dataset"].format(data_dir=data_dir), REPOSITORY)
        experiments_dir = (absolute(experiments_dir) if experiments_dir
                           else absolute(recipe.get("experiments_dir", DEFAULT_EXPERIMENTS), REPOSITORY))
        if processes is None:
            processes = default_processes(recipe)
        return cls(data_dir=data_dir, dataset=dataset, experiments_dir=experiments_dir, processes=processes)


@dataclass(frozen=True)
class Overrides:
    """Flags the command line adds to a recipe's commands, after their own (so they win): ``pretrained`` to every
    stage whose script takes ``--pretrained``, and each ``stage_flags`` entry ``(stage name, flags)`` to that
    stage; ``*`` entries go to every stage, each option only where the stage's script takes it, before a
    stage's own entries."""

    pretrained: str | None = None
    stage_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_arguments(cls, pretrained: str | None, entries: list[str] | None) -> Overrides:
        """From ``--pretrained`` (a path made absolute) and the ``--stage_flags STAGE=FLAGS`` texts."""
        parsed = []
        for entry in entries or ():
            name, separator, flags = entry.partition("=")
            if not separator or not name.strip() or name.strip().startswith("-"):
                raise UsageError(f"--stage_flags {entry!r}: expected STAGE=FLAGS, e.g. caae='--batch_size 32', or "
                                 f"{ALL_STAGES}=FLAGS for every stage that takes them")
            try:
                parsed.append((name.strip(), tuple(shlex.split(flags))))
            except ValueError as error:
                raise UsageError(f"--stage_flags {entry!r}: {error}") from None
        if pretrained is not None and pretrained not in PRETRAINED_WORDS:
            if not Path(pretrained).is_file():
                raise UsageError(f"--pretrained {pretrained}: no such file (give {', '.join(PRETRAINED_WORDS)} or a "
                                 "weight file)")
            pretrained = absolute(pretrained)
        return cls(pretrained, tuple(parsed))

    def general_groups(self) -> list[tuple[str, ...]]:
        """The options for every stage that takes them, one tuple (option and values) each."""
        groups = [("--pretrained", self.pretrained)] if self.pretrained else []
        for name, flags in self.stage_flags:
            if name == ALL_STAGES:
                groups.extend(option_groups(flags))
        return groups


def option_groups(flags: tuple[str, ...]) -> list[tuple[str, ...]]:
    """``--a 1 --b`` -> ``[("--a", "1"), ("--b",)]``: each option with the values that follow it."""
    groups: list[list[str]] = []
    for token in flags:
        if token.startswith("--"):
            groups.append([token])
        elif not groups:
            raise UsageError(f"--stage_flags {ALL_STAGES}={shlex.join(flags)}: {token!r} is not an option (--name)")
        else:
            groups[-1].append(token)
    return [tuple(group) for group in groups]


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES.glob("*.json"))


def recipe_path(name: str) -> Path:
    """``data/recipes/<name>.json``, or ``name`` itself when it is a ``.json`` file (your own recipe)."""
    path = Path(name) if name.endswith(".json") else RECIPES / f"{name}.json"
    if not path.is_file():
        raise ArtifactError(f"{path}: no such recipe; give one of {', '.join(recipe_names())} or a .json file")
    return path


def load_recipe(name: str) -> dict[str, Any]:
    return read_json(recipe_path(name), "recipe")


def build_stages(recipe: dict[str, Any], data_dir: str) -> list[Stage]:
    """The recipe's stages with ``{data_dir}``, the presets' ``{VIT_<size>}`` (``tools.cli.presets``) and the
    recipe's own variables expanded."""
    variables = {"data_dir": data_dir, **recipe_variables()}
    for name, value in recipe.get("vars", {}).items():
        variables[name] = value.format_map(variables)
    stages = []
    for entry in recipe["stages"]:
        output = {key: value.format_map(variables) for key, value in entry["output"].items()}
        stages.append(Stage(entry["name"], entry["title"], shlex.split(entry["command"].format_map(variables)),
                            output, entry.get("score"), entry.get("distributed", False)))
    return stages


def select(stages: list[Stage], first: str | None, last: str | None) -> list[Stage]:
    """The stages from ``first`` to ``last`` (names), inclusive."""
    names = [stage.name for stage in stages]
    for name in (first, last):
        if name is not None and name not in names:
            raise ArtifactError(f"unknown stage {name!r}; the recipe's stages are {', '.join(names)}")
    start = names.index(first) if first else 0
    end = names.index(last) + 1 if last else len(stages)
    return stages[start:end]


# ----------------------------------------------------------------------------- commands
def torchrun_processes(stage: Stage, settings: Settings) -> int:
    """Processes ``torchrun`` starts for the stage: ``settings.processes`` for a distributed stage, else 0 (plain
    python)."""
    return settings.processes if stage.distributed else 0


def command(stage: Stage, settings: Settings, extra: list[str] = ()) -> list[str]:
    """The full command line of a stage: under ``torchrun`` when ``torchrun_processes`` > 0, as the
    interpreter's own launcher module (``python -m torch.distributed.run``, what ``torchrun`` runs), so it
    works when the virtual environment's ``bin/`` is not on ``PATH``."""
    arguments = [*stage.argv, *settings.common_flags(), *stage.overrides, *extra]
    processes = torchrun_processes(stage, settings)
    if processes > 0:
        return [settings.python, "-m", TORCHRUN_MODULE, "--standalone", f"--nproc_per_node={processes}", *arguments]
    return [settings.python, *arguments]


def evaluation_command(stage: Stage, settings: Settings) -> list[str]:
    score = stage.score
    return [settings.python, "evaluate.py", "--experiment_name", stage.output["folder"], "--domain", score["domain"],
            "--mode", score["mode"], *settings.common_flags()]


def evaluation_file(stage: Stage, settings: Settings) -> Path:
    """The JSON that ``evaluation_command`` writes (in the scored folder's ``reports/``)."""
    score = stage.score
    return evaluation_json(settings.paths.predictions(stage.output["folder"]), score["domain"], score["mode"])


def printable(argv: list[str], python: str) -> str:
    return shlex.join(["python" if part == python else part for part in argv])


# ----------------------------------------------------------------------------- status
def parse_stage_command(stage: Stage, arguments: list[str]) -> argparse.Namespace:
    """The stage script's own ``parse_args`` of ``arguments``; flags it refuses are a ``UsageError`` naming the
    stage and argparse's reason."""
    errors = io.StringIO()
    try:
        with redirect_stderr(errors):
            return stage_script(stage.script).parse_args(arguments)
    except SystemExit:
        lines = errors.getvalue().strip().splitlines() or ["its flags are refused"]
        raise UsageError(f"stage {stage.name} ({stage.script}): {lines[-1].split('error: ', 1)[-1]}") from None


def parsed_args(stage: Stage, settings: Settings) -> argparse.Namespace:
    """The stage script's own ``parse_args`` of its command: the settings its run would record."""
    return parse_stage_command(stage, [*stage.arguments, *settings.common_flags(), *stage.overrides])


def takes(stage: Stage, settings: Settings, group: tuple[str, ...]) -> bool:
    """Whether the stage's script has the option of ``group`` (an option and its values); a value it refuses
    is a ``UsageError``."""
    try:
        parse_stage_command(stage, [*stage.arguments, *settings.common_flags(), *group])
    except UsageError as error:
        if UNRECOGNIZED in str(error):
            return False
        raise
    return True


def with_overrides(stages: list[Stage], overrides: Overrides, settings: Settings) -> list[Stage]:
    """The stages with the command line's flags (``Overrides``), each command checked by its script's parser."""
    names = [stage.name for stage in stages]
    for name, _ in overrides.stage_flags:
        if name != ALL_STAGES and name not in names:
            raise UsageError(f"--stage_flags {name}=...: no stage {name!r}; the recipe's stages are {', '.join(names)}")
    groups = overrides.general_groups()
    if not groups and not overrides.stage_flags:
        return stages
    changed = []
    for stage in stages:
        flags = [token for group in groups if takes(stage, settings, group) for token in group]
        flags += [token for name, own in overrides.stage_flags if name == stage.name for token in own]
        changed.append(replace(stage, overrides=tuple(flags)))
        parsed_args(changed[-1], settings)
    return changed


def plan(stage: Stage, settings: Settings) -> tuple[list[str] | None, str]:
    """``(extra flags, reason)`` to run the stage with, or ``(None, reason)`` when it is done."""
    args = parsed_args(stage, settings)
    paths = settings.paths
    if "model" in stage.output:
        tag = stage.output["model"]
        content = read_card(paths.model(tag)) or {}
        if "run" not in content:
            if paths.checkpoint(tag).is_file():
                return ["--resume", "auto"], "continuing an interrupted run"
            if paths.model(tag).is_file():
                return ["--overwrite"], "a model of unknown provenance is replaced"
            return ["--resume", "auto"], "new"
        reasons = stale_reasons(content["run"], args)
        if reasons:
            return ["--overwrite"], "changed: " + "; ".join(reasons)
        if content.get("finished"):
            return None, "done"
        return ["--resume", "auto"], "continuing an interrupted run"
    folder = paths.predictions(stage.output["folder"])
    overwrite = ["--overwrite"] if hasattr(args, "overwrite") else []
    run = read_run(folder)
    if run is None:
        exists = folder.is_dir() and any(folder.glob(f"*{stage.output['suffix']}"))
        return (overwrite, "files of unknown provenance are replaced") if exists else ([], "new")
    reasons = stale_reasons(run, args)
    if reasons:
        return overwrite, "changed: " + "; ".join(reasons)
    ids = load_descriptor(settings.dataset).read_ids(stage.output["domain"])
    missing = missing_ids(folder, ids, stage.output["suffix"])
    if missing:
        return [], f"{len(missing)} of {len(ids)} files to make"
    return None, "done"


def read_miou(path: Path) -> float | None:
    return json.loads(path.read_text())["best"]["miou"] if path.is_file() else None


def recipe_stages(recipe: dict[str, Any], settings: Settings, overrides: Overrides) -> list[Stage]:
    """The recipe's stages as they run here: variables expanded, the command line's overrides added."""
    return with_overrides(build_stages(recipe, settings.data_dir), overrides, settings)


def make_data_command(recipe: dict[str, Any], settings: Settings) -> list[str] | None:
    """The command that makes the recipe's dataset (its ``make_data``), None for a recipe without one."""
    if "make_data" not in recipe:
        return None
    return [settings.python, *(part.format(data_dir=settings.data_dir) for part in recipe["make_data"])]


def ensure_dataset(recipe: dict[str, Any], settings: Settings, logs: Path) -> None:
    """Make the recipe's dataset when its descriptor is missing (the synthetic sets, COCO's preparation)."""
    if Path(settings.dataset).is_file():
        return
    make = make_data_command(recipe, settings)
    if make is None:
        raise ArtifactError(f"{settings.dataset}: dataset descriptor not found (see the README's Data section)")
    LOG.info(f"=== dataset\n+ {printable(make, settings.python)}")
    run_logged(make, logs / "dataset.log", "dataset")


def run_recipe(name: str, settings: Settings, first: str | None = None, last: str | None = None,
               dry_run: bool = False, force: bool = False, overrides: Overrides | None = None) -> list[dict[str, Any]]:
    """Run (or print) the recipe's stages ``first``..``last`` with the command line's ``overrides``; ``force``
    redoes them even when done (after a code change: provenance compares settings and inputs, not code).
    Returns the table rows (stage, list, mIoU, seconds) of every stage."""
    recipe = load_recipe(name)
    stages = recipe_stages(recipe, settings, overrides or Overrides())
    chosen = select(stages, first, last)
    if dry_run:
        make = make_data_command(recipe, settings)
        if make is not None:
            LOG.info(f"# if {settings.dataset} does not exist:\n{printable(make, settings.python)}")
        for stage in chosen:
            LOG.info(f"# {stage.title}\n{printable(command(stage, settings), settings.python)}")
            if stage.score:
                LOG.info(printable(evaluation_command(stage, settings), settings.python))
        return []
    label = recipe_path(name).stem
    logs = settings.paths.root / "logs" / f"pipeline@{label}"
    state_path = settings.paths.root / "logs" / f"pipeline@{label}.json"
    state = read_json(state_path, "pipeline state", {})
    ensure_dataset(recipe, settings, logs)
    for stage in chosen:
        if force:
            extra, reason = (["--overwrite"] if hasattr(parsed_args(stage, settings), "overwrite") else []), "forced"
        else:
            extra, reason = plan(stage, settings)
        LOG.info(f"=== {stage.title} ({stage.name}): {reason}")
        if extra is not None:
            started = time.monotonic()
            argv = command(stage, settings, extra)
            LOG.info(f"+ {printable(argv, settings.python)}")
            run_logged(argv, logs / f"{stage.name}.log", stage.name)
            if stage.score:
                run_logged(evaluation_command(stage, settings), logs / f"{stage.name}.log", "evaluate")
            state[stage.name] = {"seconds": round(time.monotonic() - started)}
        elif stage.score and not evaluation_file(stage, settings).is_file():
            run_logged(evaluation_command(stage, settings), logs / f"{stage.name}.log", "evaluate")
        if stage.score:
            state.setdefault(stage.name, {})["miou"] = read_miou(evaluation_file(stage, settings))
            LOG.info(f"    mIoU on {stage.score['domain']}: {state[stage.name]['miou']:.2f}")
        atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    rows = table_rows(label, stages, settings)
    print_table(rows)
    return rows


def table_rows(label: str, stages: list[Stage], settings: Settings) -> list[dict[str, Any]]:
    """Stage, list scored, mIoU and wall time of every stage, from ``logs/pipeline@<label>.json``."""
    state_path = settings.paths.root / "logs" / f"pipeline@{label}.json"
    state = read_json(state_path, "pipeline state", {})
    return [{"stage": stage.title, "list": stage.score["domain"] if stage.score else "-",
             "miou": state.get(stage.name, {}).get("miou"), "seconds": state.get(stage.name, {}).get("seconds")}
            for stage in stages]


def print_table(rows: list[dict[str, Any]]) -> None:
    LOG.info(f"\n{'stage':<36} {'scored on':>10} {'mIoU':>8} {'time (s)':>9}")
    for row in rows:
        miou = "-" if row["miou"] is None else f"{row['miou']:.2f}"
        seconds = "-" if row["seconds"] is None else str(row["seconds"])
        LOG.info(f"{row['stage']:<36} {row['list']:>10} {miou:>8} {seconds:>9}")
    total = sum(row["seconds"] or 0 for row in rows)
    LOG.info(f"{'total':<36} {'':>10} {'':>8} {total:>9}")
