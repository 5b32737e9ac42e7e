"""One setup path for every stage that reads artifacts and writes a prediction folder.

Inference stages (CAMs, random walk, segmentation maps) and label stages (affinity labels, pseudo
labels) all start the same way: their input folders are complete for the list and recorded with their
provenance (or refused, naming the command that makes them), their input models are finished runs,
the output folder is claimed for these settings (``tools.artifacts.provenance.claim_output_folder``:
reused when made the same way, refused or replaced otherwise), and the ids still to do are listed.
A new inference or refinement script is its model code plus ``open_stage_output`` and a loop; a label
script or a CPU refinement (``refine_crf.py``) is ``run_label_jobs`` with its per-image function.
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tools.artifacts.folders import pending_ids, require_complete
from tools.artifacts.paths import PNG_SUFFIX, ExperimentPaths
from tools.artifacts.provenance import claim_output_folder, folder_input, model_input, read_run, run_record
from tools.cli.stage_data import StageData, process_rank
from tools.scoring.parallel import parallel_map


@dataclass(frozen=True)
class FolderInput:
    """A prediction folder a stage reads: one ``<id><suffix>`` per id of the list, made by ``command``."""

    path: Path
    suffix: str
    command: str


@dataclass(frozen=True)
class ModelInput:
    """A trained model a stage reads (``models/<tag>.pth``); its training run must have finished."""

    path: Path


StageInput = FolderInput | ModelInput


@dataclass(frozen=True)
class StageOutput:
    """The claimed output folder and the ids of this run still to make there."""

    folder: Path
    todo: list[str]


def record_inputs(inputs: dict[str, StageInput], ids: list[str], allow_pickle: bool = False,
                  external: bool = False) -> dict[str, dict]:
    """Each input checked (folders complete for ``ids``, models finished) and recorded with its provenance
    (``external``: folders without ``run.json`` by the fingerprint of their files)."""
    recorded: dict[str, dict[str, Any]] = {}
    for name, source in inputs.items():
        if isinstance(source, FolderInput):
            require_complete(source.path, ids, source.suffix, source.command)
            recorded[name] = folder_input(source.path, source.command, allow_pickle, external)
        else:
            recorded[name] = model_input(source.path)
    return recorded


def recorded_source(folder: Path, input_name: str, paths: ExperimentPaths) -> list[str] | None:
    """How a printed command names the input folder ``input_name`` that ``folder`` was made from, as its
    ``run.json`` records it: the name when it lies under ``paths``' ``predictions/``, else the path, plus
    ``--external`` (or ``--allow_pickle``) when it was read that way. None when the record does not say."""
    run = read_run(folder) if Path(folder).is_dir() else None
    entry = (run or {}).get("inputs", {}).get(input_name)
    if not isinstance(entry, dict) or "path" not in entry:
        return None
    path = Path(entry["path"])
    words = [path.name if path == paths.predictions(path.name) else shlex.quote(str(path))]
    if entry.get("external"):
        words.append("--external")
    elif entry.get("provenance") is None:
        words.append("--allow_pickle")
    return words


def open_stage_output(args: argparse.Namespace, data: StageData, script: str, inputs: dict[str, StageInput],
                      name: str, suffix: str, ids: list[str], what: str) -> StageOutput:
    """Inputs checked and recorded, ``predictions/<name>`` claimed for ``script`` run with ``args``, and the
    ids of ``ids`` whose ``<id><suffix>`` is still to make (all of them with ``--overwrite``)."""
    recorded = record_inputs(inputs, data.ids, getattr(args, "allow_pickle", False), getattr(args, "external", False))
    folder = data.paths.predictions(name)
    claim_output_folder(folder, run_record(script, args, recorded), suffix, args.overwrite, process_rank())
    return StageOutput(folder, pending_ids(folder, ids, suffix, args.overwrite, what))


def run_label_jobs(args: argparse.Namespace, data: StageData, script: str, inputs: dict[str, StageInput],
                   name: str, make_one: Callable[[str], None], what: str, suffix: str = PNG_SUFFIX) -> Path:
    """A per-image CPU stage (labels, a CRF refinement): ``open_stage_output`` for one ``<id><suffix>`` per id
    (PNG labels by default), then ``make_one(image_id)`` for each file still missing, on ``--n_jobs`` processes.
    Returns the output folder."""
    output = open_stage_output(args, data, script, inputs, name, suffix, data.ids, what)
    for _ in parallel_map(make_one, output.todo, args.n_jobs, what):
        pass
    return output.folder
