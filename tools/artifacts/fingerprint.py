"""Content fingerprints of folders made outside the pipeline, for provenance records.

A folder the pipeline did not make has no ``run.json`` whose hash could tell a later stage that it
changed. ``folder_fingerprint`` stands in for that hash: it changes whenever a file of the folder is
added, removed, renamed or rewritten with other bytes, and only then (not on a touch or a copy to
another place), so a record that stores it can tell "the same files" from "other files".
``tools.import_cams`` records the fingerprint of the peer's CAM folder it converted, and a stage run with
``--external`` records it as the provenance of an input folder without ``run.json``
(``tools.artifacts.provenance.folder_input``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from tools.artifacts.files import ArtifactError

FINGERPRINT_DIGITS = 16  # hex digits kept, as the provenance hashes of tools.provenance
HASH_NAME = "sha256"


def file_digest(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (files of any size)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, HASH_NAME).hexdigest()


def folder_fingerprint(folder: str | Path, suffixes: tuple[str, ...]) -> str:
    """A hash of the files directly in ``folder`` whose names end with one of ``suffixes``.

    It hashes one line ``<name> <size in bytes> <sha256 of the content>`` per file, in name order:
    the content decides, the folder's path and the files' times do not. Sub-folders and other files
    are left out. Raises ``ArtifactError`` if the folder is missing or holds no such file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: folder not found")
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.name.endswith(suffixes))
    if not files:
        raise ArtifactError(f"{folder}: no {' or '.join(suffixes)} files to fingerprint")
    lines = "".join(f"{path.name} {path.stat().st_size} {file_digest(path)}\n" for path in files)
    return hashlib.new(HASH_NAME, lines.encode()).hexdigest()[:FINGERPRINT_DIGITS]
