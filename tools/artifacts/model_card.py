"""The model card ``models/<tag>.json``, the one owner of that file.

Written together with ``<tag>.pth``, it says what rebuilds the model (``kind``, ``num_classes`` and the
model's keyword arguments, so later stages need no repeated architecture flags), the run that made it
(``run``: its provenance record, ``tools.artifacts.provenance``) and whether that run has finished
(``finished``: false while training is under way or was interrupted, so the next stage refuses an
intermediate epoch's model). Imported weights (``tools.import_original``) get a card without ``run``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from tools.artifacts.files import ArtifactError, atomic_path, atomic_write_text, read_json

CARD_SUFFIX = ".json"
CARD_KEYS = ("kind", "num_classes", "run", "finished")  # beside the model's keyword arguments


def card_path(model_path: str | Path) -> Path:
    """``models/<tag>.json`` of ``models/<tag>.pth``."""
    return Path(model_path).with_suffix(CARD_SUFFIX)


def describe_model(kind: str, num_classes: int, config: dict) -> dict:
    """A card's content before training adds ``run`` and ``finished``: the model's kind, class count
    (background included) and keyword arguments."""
    return {"kind": kind, "num_classes": num_classes, **config}


def read_card(model_path: str | Path) -> dict[str, Any] | None:
    """The card of a model (None if it has none); a damaged card is an ``ArtifactError`` naming it."""
    return read_json(card_path(model_path), "model description")


def model_config(card: dict[str, Any], kind: str, model_path: str | Path) -> dict[str, Any]:
    """The keyword arguments that rebuild a ``kind`` model from its card (an error if it is another kind)."""
    found = card.get("kind", kind)
    if found != kind:
        raise ArtifactError(f"{card_path(model_path)}: describes a '{found}' model, expected '{kind}'")
    return {key: value for key, value in card.items() if key not in CARD_KEYS}


def run_provenance(model_path: str | Path) -> str | None:
    """The provenance hash of the run that made a model (None for weights without a recorded run)."""
    run = (read_card(model_path) or {}).get("run")
    return run.get("provenance") if isinstance(run, dict) else None


def is_unfinished(model_path: str | Path) -> bool:
    """Whether the card says its training run has not finished (an intermediate epoch's model)."""
    return (read_card(model_path) or {}).get("finished") is False


def write_card(model_path: str | Path, card: dict[str, Any]) -> None:
    """Write a card beside weights saved on their own (imported weights), atomically."""
    atomic_write_text(card_path(model_path), _text(card))


def write_model(model_path: str | Path, card: dict[str, Any], write_weights: Callable[[Path], None]) -> None:
    """Weights (``write_weights(temporary path)``) and card written to temporary files, then both renamed
    (the card first, as before). A failed write names the file it was writing."""
    with atomic_path(model_path) as weights:
        write_weights(weights)
        with atomic_path(card_path(model_path)) as description:
            description.write_text(_text(card))


def mark_finished(model_path: str | Path) -> None:
    """``"finished": true`` once the training run's last iteration is done (the weights stay)."""
    card = read_card(model_path)
    if card is not None:
        write_card(model_path, {**card, "finished": True})


def _text(card: dict[str, Any]) -> str:
    return json.dumps(card, indent=2) + "\n"
