"""The recipe driver behind ``run_pipeline.py``: a recipe's stages as the commands a user would type.

A recipe (``data/recipes/<name>.json``) is data: the dataset, text variables, and per stage a
title, one command, what it writes (``{"model": tag}`` or ``{"folder", "suffix", "domain"}``),
optionally how it is scored (``{"mode", "domain"}``, through ``evaluate.py``) and whether it runs
under ``torchrun`` with ``--gpus``. Every command gets ``--dataset``, ``--data_dir`` and
``--experiments_dir``.

A stage is skipped when its output is complete and its provenance (``tools.artifacts.provenance``) matches
the command: same settings and dataset, inputs not remade since. Otherwise it runs: a model with ``--resume auto``
if a matching run was interrupted, ``--overwrite`` if its settings or inputs changed; a folder
with ``--overwrite`` if it was made another way (finished files are kept when it was not). Stage
output goes to ``<experiments>/logs/pipeline@<recipe>/<stage>.log``; the terminal shows the stage's
progress bar. Times and scores are kept in ``<experiments>/logs/pipeline@<recipe>.json``, so a rerun
prints the same table.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tools.artifacts.files import ArtifactError, atomic_write_text, read_json
from tools.artifacts.folders import missing_ids
from tools.artifacts.model_card import read_card
from tools.artifacts.paths import ExperimentPaths, evaluation_json
from tools.artifacts.provenance import read_run, stale_reasons
from tools.cli.exits import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, STATUS_DIR_VARIABLE, CommandFailed,
                             reported_statuses)
from tools.cli.presets import recipe_variables
from tools.cli.repository import REPOSITORY, stage_script
from tools.data.descriptor import load_descriptor

LOG = logging.getLogger(__name__)

RECIPES = REPOSITORY / "data" / "recipes"
PROGRESS = re.compile(r"\d+/\d+ \[")  # a tqdm bar: "12/50 [00:03<00:09, ...]"
QUIET_PROGRESS_SECONDS = 30.0  # progress lines when the terminal is not interactive
FAILURE_TAIL_LINES = 30
DEFAULT_EXPERIMENTS = "experiments"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TORCHRUN_MODULE = "torch.distributed.run"  # the module behind the torchrun command


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    argv: list[str]                 # script (or -m module) and its arguments, variables expanded
    output: dict[str, str]
    score: dict[str, str] | None
    distributed: bool

    @property
    def script(self) -> str:
        """The stage script's name (``train_caae``) or the entry point's module (``tools.baseline_cams``)."""
        return self.argv[1] if self.argv[0] == "-m" else Path(self.argv[0]).stem

    @property
    def arguments(self) -> list[str]:
        return self.argv[2:] if self.argv[0] == "-m" else self.argv[1:]


@dataclass(frozen=True)
class Settings:
    """Where the recipe runs: data, artifacts, processes per node (0: plain python)."""

    data_dir: str
    dataset: str
    experiments_dir: str
    gpus: int = 0
    python: str = sys.executable

    def common_flags(self) -> list[str]:
        return ["--dataset", self.dataset, "--data_dir", self.data_dir, "--experiments_dir", self.experiments_dir]

    @property
    def paths(self) -> ExperimentPaths:
        return ExperimentPaths(Path(self.experiments_dir))

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], data_dir: str | None = None, experiments_dir: str | None = None,
                    gpus: int = 0) -> Settings:
        """The flags where given, else the recipe's ``data_dir`` and ``experiments_dir`` (default
        ``experiments``; the demo and smoke recipes keep theirs under ``demo_data/``)."""
        data_dir = data_dir or recipe["data_dir"]
        return cls(data_dir=data_dir, dataset=recipe["dataset"].format(data_dir=data_dir),
                   experiments_dir=experiments_dir or recipe.get("experiments_dir", DEFAULT_EXPERIMENTS), gpus=gpus)


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
def command(stage: Stage, settings: Settings, extra: list[str] = ()) -> list[str]:
    """The full command line of a stage: under ``torchrun`` when it is distributed and ``--gpus`` > 0, as the
    interpreter's own launcher module (``python -m torch.distributed.run``, what ``torchrun`` runs), so it
    works when the virtual environment's ``bin/`` is not on ``PATH``."""
    arguments = [*stage.argv, *settings.common_flags(), *extra]
    if stage.distributed and settings.gpus > 0:
        return [settings.python, "-m", TORCHRUN_MODULE, "--standalone", f"--nproc_per_node={settings.gpus}",
                *arguments]
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
def parsed_args(stage: Stage, settings: Settings):
    """The stage script's own ``parse_args`` of its command: the settings its run would record."""
    return stage_script(stage.script).parse_args([*stage.arguments, *settings.common_flags()])


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


# ----------------------------------------------------------------------------- running
class ProgressEcho:
    """Shows the latest progress bar of a stage on the terminal (every 30 s when not interactive)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.interactive = sys.stdout.isatty()
        self.last_print = 0.0
        self.shown = False

    def offer(self, fragment: str) -> None:
        if not PROGRESS.search(fragment):
            return
        now = time.monotonic()
        if self.interactive:
            width = shutil.get_terminal_size().columns
            sys.stdout.write("\r" + f"  {self.label}: {fragment.strip()}"[: width - 1].ljust(width - 1))
            sys.stdout.flush()
            self.shown = True
        elif now - self.last_print >= QUIET_PROGRESS_SECONDS:
            LOG.info(f"  {self.label}: {fragment.strip()}")
            self.last_print = now

    def close(self) -> None:
        if self.shown:
            sys.stdout.write("\n")
            sys.stdout.flush()


@contextmanager
def forward_signals(process: subprocess.Popen) -> Iterator[None]:
    """Pass SIGINT/SIGTERM/SIGHUP on to ``process`` (which runs in its own session, so a Ctrl-C reaches it
    once, through here): a training stage then saves its checkpoint and exits with ``EXIT_INTERRUPTED``."""
    previous = {number: signal.getsignal(number) for number in FORWARDED_SIGNALS}
    for number in FORWARDED_SIGNALS:
        signal.signal(number, lambda received, frame: process.send_signal(received))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_logged(argv: list[str], log: Path, label: str) -> None:
    """Run ``argv`` from the repository root, all its output appended to ``log``, its progress echoed;
    a failure prints the log's last lines and stops the pipeline (an interrupted stage with exit status
    ``EXIT_INTERRUPTED``, which a rerun of the pipeline resumes)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    echo = ProgressEcho(label)
    statuses = Path(tempfile.mkdtemp(prefix=f".{label}.status.", dir=log.parent))  # each rank's own status
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", STATUS_DIR_VARIABLE: str(statuses)}
    with open(log, "ab") as handle:
        handle.write(f"$ {shlex.join(argv)}\n".encode())
        process = subprocess.Popen(argv, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=environment, start_new_session=True)
        pending = b""
        assert process.stdout is not None
        with forward_signals(process):
            while chunk := process.stdout.read1(65536):
                handle.write(chunk)
                handle.flush()
                pending += chunk
                *fragments, pending = re.split(rb"[\r\n]", pending)
                for fragment in fragments[-3:]:
                    echo.offer(fragment.decode(errors="replace"))
            code = process.wait()
    echo.close()
    reported = reported_statuses(statuses)
    shutil.rmtree(statuses, ignore_errors=True)
    if code != 0:  # torchrun ends with 1 whatever its workers' statuses: theirs decide
        code = next((status for status in (EXIT_INTERRUPTED, EXIT_USAGE) if status in reported), code)
    if code == EXIT_INTERRUPTED:
        LOG.error(f"interrupted: {label} stopped after saving its checkpoint; run the same run_pipeline.py command "
                  f"again to continue (log {log})")
        raise SystemExit(EXIT_INTERRUPTED)
    if code != 0:
        lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
        tail = "\n".join(line for line in lines if line.strip())[-4000:].splitlines()[-FAILURE_TAIL_LINES:]
        raise CommandFailed(f"stage command failed ({code}): {shlex.join(argv)}\n" + "\n".join(tail)
                            + f"\nfull log: {log}", status=EXIT_USAGE if code == EXIT_USAGE else EXIT_ERROR)


def read_miou(path: Path) -> float | None:
    return json.loads(path.read_text())["best"]["miou"] if path.is_file() else None


def run_recipe(name: str, settings: Settings, first: str | None = None, last: str | None = None,
               dry_run: bool = False, force: bool = False) -> list[dict[str, Any]]:
    """Run (or print) the recipe's stages ``first``..``last``; ``force`` redoes them even when done
    (after a code change: provenance compares settings and inputs, not code). Returns the table
    rows (stage, list, mIoU, seconds) of every stage."""
    recipe = load_recipe(name)
    stages = build_stages(recipe, settings.data_dir)
    chosen = select(stages, first, last)
    if dry_run:
        if "make_data" in recipe:
            make = [part.format(data_dir=settings.data_dir) for part in recipe["make_data"]]
            LOG.info(f"# if {settings.dataset} does not exist:\n{printable([settings.python, *make], settings.python)}")
        for stage in chosen:
            LOG.info(f"# {stage.title}\n{printable(command(stage, settings), settings.python)}")
            if stage.score:
                LOG.info(printable(evaluation_command(stage, settings), settings.python))
        return []
    label = recipe_path(name).stem
    logs = settings.paths.root / "logs" / f"pipeline@{label}"
    state_path = settings.paths.root / "logs" / f"pipeline@{label}.json"
    state = read_json(state_path, "pipeline state", {})
    if not Path(settings.dataset).is_file():
        if "make_data" not in recipe:
            raise ArtifactError(f"{settings.dataset}: dataset descriptor not found (see the README's Data section)")
        make = [part.format(data_dir=settings.data_dir) for part in recipe["make_data"]]
        LOG.info(f"=== dataset\n+ {printable([settings.python, *make], settings.python)}")
        run_logged([settings.python, *make], logs / "dataset.log", "dataset")
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
