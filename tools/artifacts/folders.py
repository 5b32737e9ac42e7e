"""Which ids of a list a prediction folder holds: what is done, what is missing, what is still to do."""
from __future__ import annotations

import logging
from pathlib import Path

from tools.artifacts.files import ArtifactError
from tools.artifacts.paths import CAM_SUFFIX, prediction_file

LOG = logging.getLogger(__name__)


def pending_ids(directory: str | Path, ids: list[str], suffix: str, overwrite: bool, what: str) -> list[str]:
    """The ids still to compute in ``directory`` (all with ``overwrite``); says how many are done."""
    directory = Path(directory)
    todo = list(ids) if overwrite else [i for i in ids if not (directory / f"{i}{suffix}").exists()]
    LOG.info(f"{len(ids) - len(todo)} of {len(ids)} {what} already exist in {directory}")
    return todo


def missing_ids(directory: str | Path, ids: list[str], suffix: str) -> list[str]:
    """Ids that have no ``<id><suffix>`` in ``directory``; for ``CAM_SUFFIX`` a legacy ``.npy`` also counts."""
    directory = Path(directory)
    if suffix == CAM_SUFFIX:
        return [image_id for image_id in ids if not prediction_file(directory, image_id).exists()]
    return [image_id for image_id in ids if not (directory / f"{image_id}{suffix}").exists()]


def require_complete(directory: str | Path, ids: list[str], suffix: str, command: str) -> None:
    """Fail with the first id whose artifact is missing and the command that makes it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: folder not found; make it first with:\n  {command}")
    absent = missing_ids(directory, ids, suffix)
    if absent:
        raise ArtifactError(
            f"{directory}: {len(absent)} of {len(ids)} files missing, first '{absent[0]}{suffix}'; "
            f"make them with:\n  {command}"
        )

