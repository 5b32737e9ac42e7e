"""Provenance of every artifact, so that a rerun never silently reuses outputs made another way.

- A prediction folder holds ``run.json``: the script, its settings, the input artifacts it read
  (each with its own provenance hash), package versions and the git commit (with a dirty flag).
- ``models/<tag>.json`` (written with ``<tag>.pth``) holds the model's config and the same record
  under ``run``.

``provenance`` hashes the script, the settings and the inputs' hashes: equal hashes mean the same
computation on the same inputs. Versions, the commit and the execution flags (which ids, where,
how many workers) are recorded but not compared, and the id list is not a setting: a file's
content depends only on its image, so ``train`` and ``train_aug`` runs share a folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from tools.artifacts.files import ArtifactError, atomic_write_text, read_json, remove_stale_temporaries
from tools.artifacts.fingerprint import folder_fingerprint
from tools.artifacts.locks import hold_until_exit
from tools.artifacts.model_card import card_path, is_unfinished, run_provenance
from tools.cli.repository import REPOSITORY
from tools.data.descriptor import DatasetError, load_descriptor

LOG = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = ".lock"  # a prediction folder's writer lock (hidden: not a prediction)
RUN_FORMAT = 1
PACKAGES = ("torch", "torchvision", "timm", "numpy", "pydensecrf2")
# Flags that choose which ids, where, how fast or how often to log, never what a file holds.
EXECUTION_FLAGS = frozenset({
    "domain", "list", "start", "end", "overwrite", "resume", "device", "num_workers", "n_jobs",
    "dataset", "data_dir", "experiments_dir", "print_ratio", "eval_every", "eval_batch_size", "allow_pickle",
    "submission", "checkpoint_every", "external",
})
EXTERNAL_SUFFIXES = (".npz", ".npy")  # the files of an outside CAM / refined-map folder its fingerprint covers
WAIT_SECONDS = 600.0  # how long a non-zero rank waits for rank 0's run.json


def plain(value: Any) -> Any:
    """A JSON-friendly copy: paths and other objects as strings, tuples as lists."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return str(value)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def git_state(root: Path = REPOSITORY) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the repository, or None outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def fingerprint(script: str, settings: Mapping[str, Any], inputs: Mapping[str, Any],
                dataset: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
    """The provenance hash: script, settings, the inputs' own hashes, the dataset read and, for a model, the
    id of the run that made it (so a model retrained with the same flags is a new input downstream)."""
    content = {"script": script, "settings": settings,
               "inputs": {name: entry["provenance"] for name, entry in inputs.items()}}
    if dataset is not None:
        content["dataset"] = dataset
    if run_id is not None:
        content["run_id"] = run_id
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    """SHA-256 (16 hex digits) of a file's bytes; a missing file is a ``DatasetError`` naming it."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror})") from error


def argument_values(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """A script's parsed arguments (or a mapping of them) as a plain name -> value dict."""
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


def dataset_identity(args: argparse.Namespace | Mapping[str, Any], with_list: bool) -> dict[str, str] | None:
    """What a stage read of its dataset: the descriptor's content (and the COCO index's), the resolved data
    root and, ``with_list`` (training: a model depends on its list), the list's content. None for a run
    without dataset flags."""
    values = argument_values(args)
    if not values.get("dataset"):
        return None
    descriptor = load_descriptor(values["dataset"])
    identity = {"descriptor": file_hash(descriptor.path),
                "root": str(descriptor.resolve_data_dir(values.get("data_dir")).resolve())}
    if descriptor.index_file is not None:
        identity["index"] = file_hash(descriptor.index_file)
    if with_list:
        identity["list"] = file_hash(Path(values["list"]) if values.get("list")
                                     else descriptor.list_path(values["domain"]))
    return identity


def settings_of(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The arguments that decide what an artifact holds (all but ``EXECUTION_FLAGS``), JSON-plain."""
    values = argument_values(args)
    return {name: plain(value) for name, value in sorted(values.items())
            if name not in EXECUTION_FLAGS and not name.startswith("_")}


def run_record(script: str, args: argparse.Namespace | Mapping[str, Any],
               inputs: Mapping[str, Mapping[str, Any]] | None = None, *, with_list: bool = False,
               run_id: str | None = None) -> dict[str, Any]:
    """What ``script`` run with ``args`` on ``inputs`` (``name -> folder_input / model_input / ...``) and on its
    dataset (``dataset_identity``; ``with_list`` for training) is; ``run_id`` identifies a model's run."""
    values = argument_values(args)
    settings = settings_of(values)
    execution = {name: plain(value) for name, value in sorted(values.items()) if name in EXECUTION_FLAGS}
    inputs = {name: dict(entry) for name, entry in (inputs or {}).items()}
    dataset = dataset_identity(values, with_list)
    record = {
        "format": RUN_FORMAT, "script": script, "provenance": fingerprint(script, settings, inputs, dataset, run_id),
        "settings": settings, "inputs": inputs, "dataset": dataset, "execution": execution,
        "versions": package_versions(), "git": git_state(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if run_id is not None:
        record["run_id"] = run_id
    return record


# ----------------------------------------------------------------------------- inputs
def read_run(folder: Path) -> dict[str, Any] | None:
    """A folder's ``run.json`` (None if it has none)."""
    path = Path(folder) / RUN_FILE
    run = read_json(path, "provenance record")
    if run is not None and not isinstance(run.get("provenance"), str):
        raise ArtifactError(f"{path}: a provenance record without its 'provenance' hash; delete the folder's "
                            f"{RUN_FILE} and remake the folder with --overwrite")
    return run


def folder_input(folder: Path, command: str, allow_unknown: bool = False, external: bool = False) -> dict[str, Any]:
    """An input prediction folder and its provenance.

    A folder without ``run.json`` is refused (naming the command that makes it and ``--external``) unless
    ``external`` (a folder in our layout made outside the pipeline: its provenance is the fingerprint of its
    ``.npz`` / ``.npy`` files, recomputed by ``stale_reasons``, so a changed file makes every stage built on it
    stale) or ``allow_unknown`` (the original's imported ``.npy`` files: no provenance).
    """
    run = read_run(folder)
    if run is not None:
        return {"path": str(folder), "provenance": run["provenance"]}
    if external:
        return {"path": str(folder), "provenance": folder_fingerprint(folder, EXTERNAL_SUFFIXES), "external": True}
    if not allow_unknown:
        raise ArtifactError(f"{folder}: no {RUN_FILE} (made by an older version, by hand or by another codebase, so "
                            f"its settings are unknown); pass --external to read it as an outside folder (recorded "
                            f"by a fingerprint of its files), or remake it with:\n  {command} --overwrite")
    return {"path": str(folder), "provenance": None}


def model_input(model_path: Path) -> dict[str, Any]:
    """An input model and the provenance on its card (None for imported weights without a recorded run).

    A model whose training run has not finished (killed, or still running) is refused: it is an
    intermediate epoch's, and the next stage would silently build on it.
    """
    if is_unfinished(model_path):
        raise ArtifactError(f"{card_path(model_path)}: the training run of {Path(model_path).stem} has not finished "
                            "(the model is an intermediate epoch's); continue it with the training command plus "
                            "--resume")
    return {"path": str(model_path), "provenance": run_provenance(model_path)}


def external_input(path: Path) -> dict[str, Any]:
    """A folder from outside the pipeline (e.g. ground-truth masks): recorded, no provenance."""
    return {"path": str(path), "provenance": None}


def current_provenance(path: str | Path, external: bool = False) -> str | None:
    """The provenance an input artifact has now: a folder's ``run.json``, a model's ``<tag>.json`` or, for an
    ``external`` folder, the fingerprint of its files (None when they are gone)."""
    path = Path(path)
    if path.suffix == ".pth":
        return run_provenance(path)
    if external:
        try:
            return folder_fingerprint(path, EXTERNAL_SUFFIXES)
        except ArtifactError:  # the folder or its files are gone: not the recorded input any more
            return None
    run = read_run(path) if path.is_dir() else None
    return None if run is None else run["provenance"]


def stale_reasons(record: Mapping[str, Any], args: argparse.Namespace | Mapping[str, Any]) -> list[str]:
    """Why an artifact made as ``record`` is not what ``args`` would make now: changed settings, another
    dataset (descriptor, list or root), or inputs whose provenance changed since (an upstream stage was redone,
    a model retrained, a file of an ``--external`` folder changed)."""
    settings = settings_of(args)
    reasons = differences({**record, "inputs": {}}, {"script": record.get("script", ""), "settings": settings,
                                                     "inputs": {}, "dataset": record.get("dataset")})
    recorded = record.get("dataset")
    current = dataset_identity(args, with_list=bool(recorded) and "list" in recorded)
    if current is not None and recorded != current:
        reasons.append(_dataset_change(recorded, current))
    recorded_root = record.get("execution", {}).get("experiments_dir")
    values = argument_values(args)
    for name, entry in record.get("inputs", {}).items():
        external = bool(entry.get("external"))
        path = input_path_now(entry["path"], recorded_root, values.get("experiments_dir"))
        if entry.get("provenance") is not None and current_provenance(path, external) != entry["provenance"]:
            reasons.append(f"input {name} {path} " + ("changed (its files' fingerprint)" if external else "was remade"))
    return reasons


def input_path_now(path: str, recorded_root: str | None, current_root: str | Path | None) -> Path:
    """Where a recorded input is read now: one that lay under the record's experiments folder is looked up under
    the current one, so a copied experiments folder checks its own models and folders (not the ones it was copied
    from) and a moved one still finds them; any other path as recorded."""
    if recorded_root is not None and current_root is not None:
        try:
            return Path(current_root) / Path(path).relative_to(recorded_root)
        except ValueError:  # outside the experiments folder: an --external folder, GT masks
            pass
    return Path(path)


def _dataset_change(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> str:
    """One phrase naming what differs between two ``dataset_identity`` records."""
    if not old:
        return "the dataset it read is not recorded (made by an older version)"
    changed = [key for key in sorted(set(old) | set(new or {})) if old.get(key) != (new or {}).get(key)]
    if "root" in changed:
        return f"dataset root {old.get('root')} -> {(new or {}).get('root')}"
    return "dataset " + ", ".join(f"{key} content" for key in changed) + " changed"


# ----------------------------------------------------------------------------- outputs
def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two records' script, settings and inputs. A setting the old record
    lacks and the new one holds as None is a flag added since, at its off value (``--max_steps``): no
    difference, so adding a flag does not make every recorded artifact stale."""
    found = []
    if old.get("script") != new["script"]:
        found.append(f"script {old.get('script')} -> {new['script']}")
    old_settings, new_settings = old.get("settings", {}), new["settings"]
    for name in sorted(set(old_settings) | set(new_settings)):
        if name not in old_settings and new_settings[name] is None:
            continue
        if old_settings.get(name, "<unset>") != new_settings.get(name, "<unset>"):
            found.append(f"--{name} {old_settings.get(name, '<unset>')} -> {new_settings.get(name, '<unset>')}")
    if old.get("dataset") != new.get("dataset"):
        found.append(_dataset_change(old.get("dataset"), new.get("dataset")))
    old_inputs, new_inputs = old.get("inputs", {}), new["inputs"]
    for name in sorted(set(old_inputs) | set(new_inputs)):
        before, after = old_inputs.get(name, {}), new_inputs.get(name, {})
        if (before.get("path"), before.get("provenance")) != (after.get("path"), after.get("provenance")):
            found.append(f"input {name} {after.get('path', before.get('path'))} changed")
    return found


def claim_output_folder(folder: Path, record: Mapping[str, Any], suffix: str, overwrite: bool,
                        rank: int = 0) -> None:
    """Make ``folder`` the output of ``record`` before any file is written.

    A folder made with the same provenance is reused (finished files are skipped). One made another
    way, or holding files without ``run.json``, is refused unless ``overwrite``: then rank 0 deletes
    its ``*<suffix>`` files and writes the new ``run.json`` (the deletion comes first, so a killed
    run never leaves old files under the new record); other ranks wait for that ``run.json``.
    """
    folder = Path(folder)
    if rank != 0:
        _wait_for_run(folder, record["provenance"])
        return
    folder.mkdir(parents=True, exist_ok=True)
    hold_until_exit(folder / LOCK_FILE, f"prediction folder {folder.name}")
    remove_stale_temporaries(folder)
    old = read_run(folder)
    files = sorted(folder.glob(f"*{suffix}"))
    if old is not None and old.get("provenance") == record["provenance"]:
        return
    if old is not None or files:
        reason = (f"made with other settings ({'; '.join(differences(old, record)) or 'another version'})"
                  if old is not None else f"holds {len(files)} files but no {RUN_FILE}, so their settings are unknown")
        if not overwrite:
            raise ArtifactError(f"{folder}: {reason}; pass --overwrite to replace its files, or write to another "
                                "folder (another --tag)")
        for path in files:
            path.unlink()
        LOG.info(f"{folder}: {reason}; --overwrite: removed {len(files)} files")
    atomic_write_text(folder / RUN_FILE, json.dumps(record, indent=2) + "\n")


def _wait_for_run(folder: Path, provenance: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            run = read_run(folder)
        except ArtifactError:  # rank 0 is writing it
            run = None
        if run is not None and run.get("provenance") == provenance:
            return
        time.sleep(0.5)
    raise ArtifactError(f"{folder}: rank 0 did not write a matching {RUN_FILE} within {WAIT_SECONDS:.0f} s")
