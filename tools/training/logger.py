"""Training logs of rank 0: text log, JSON log, TensorBoard scalars/images and a tqdm progress bar.

- text: ``ExperimentPaths.text_log(tag)``, every line also printed (above the progress bar);
- JSON: ``ExperimentPaths.json_log(tag)`` = ``{"train": [...], "validation": [...]}``, rewritten
  atomically after each entry, plus ``"diverged": {"iteration", "loss"}`` when the loss went non-finite
  (the trace of a diverged run that the report shows; a new or resumed run starts without it);
- TensorBoard: ``ExperimentPaths.tensorboard(tag)``, ``Train/<name>`` and ``Evaluation/<name>``.

On other ranks (``enabled=False``) every method does nothing, so scripts call them unconditionally.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from tools.artifacts.files import atomic_write_text
from tools.artifacts.paths import ExperimentPaths

TRAIN, VALIDATION, DIVERGED = "train", "validation", "diverged"


class TrainingLogger:
    """Create with the experiment paths and tag; the trainer calls ``start`` when it knows the step.

    ``history`` (the JSON content) goes into the training checkpoint, so a resumed run's JSON log
    continues exactly where the checkpoint was taken.
    """

    def __init__(self, paths: ExperimentPaths, tag: str, enabled: bool = True) -> None:
        self.paths, self.tag, self.enabled = paths, tag, enabled
        self.step = 0
        self.history: dict[str, list[dict[str, Any]]] = {TRAIN: [], VALIDATION: []}
        self._writer: SummaryWriter | None = None
        self._bar: tqdm | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, step: int, total_steps: int, history: dict[str, list[dict[str, Any]]] | None = None) -> None:
        """Open the logs at global ``step``: a new run (``history=None``) starts empty logs; a resumed run
        passes the JSON history saved in its checkpoint and appends to the text log."""
        self.step = step
        if not self.enabled:
            return
        text_log = self.paths.text_log(self.tag)
        text_log.parent.mkdir(parents=True, exist_ok=True)
        if history is None:
            text_log.write_text("")
        self.history = {TRAIN: [], VALIDATION: [], **(history or {})}
        self._write_json()
        # purge_step hides events of a previous or interrupted run from this step on.
        self._writer = SummaryWriter(str(self.paths.tensorboard(self.tag)), purge_step=step)
        self._bar = tqdm(total=total_steps, initial=step, desc=self.tag, dynamic_ncols=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._bar = self._writer = None

    # ------------------------------------------------------------------ writing
    def info(self, message: str) -> None:
        """Print a line (without breaking the progress bar) and append it to the text log."""
        if not self.enabled:
            return
        tqdm.write(message)
        with open(self.paths.text_log(self.tag), "a") as handle:
            handle.write(message + "\n")

    def advance(self, step: int, postfix: dict[str, float]) -> None:
        """Move the progress bar to global ``step`` and show ``postfix`` (e.g. the loss)."""
        self.step = step
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({name: f"{value:.4f}" for name, value in postfix.items()}, refresh=False)

    def log_train(self, entry: dict[str, Any]) -> None:
        """One logging interval: ``entry`` holds ``iteration`` and scalar values (means over the interval)."""
        self._append(TRAIN, entry)

    def log_validation(self, entry: dict[str, Any]) -> None:
        """One evaluation: ``entry`` holds ``iteration`` and the evaluation's scalar values."""
        self._append(VALIDATION, entry)

    def log_divergence(self, iteration: int, loss: float) -> None:
        """The iteration whose ``loss`` went non-finite: kept as ``diverged`` in the JSON log (the loss as text,
        ``"nan"`` / ``"inf"``, which JSON cannot hold as a number) and printed."""
        if not self.enabled:
            return
        self.history[DIVERGED] = {"iteration": iteration, "loss": str(loss)}
        self._write_json()
        self.info(f"[{DIVERGED}] iteration={iteration}, loss={loss}")

    def add_scalar(self, name: str, value: float, step: int | None = None) -> None:
        if self._writer is not None:
            self._writer.add_scalar(name, value, self.step if step is None else step)

    def add_image(self, name: str, image: torch.Tensor | np.ndarray, step: int | None = None,
                  dataformats: str = "CHW") -> None:
        """TensorBoard image (e.g. a CAM overlay), float in [0, 1] or uint8; ``dataformats`` as in
        ``SummaryWriter.add_image``."""
        if self._writer is not None:
            self._writer.add_image(name, image, self.step if step is None else step, dataformats=dataformats)

    def _append(self, kind: str, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.history[kind].append(entry)
        self._write_json()
        prefix = "Train" if kind == TRAIN else "Evaluation"
        for name, value in entry.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and name not in ("iteration", "epoch"):
                self.add_scalar(f"{prefix}/{name}", value, entry["iteration"])
        fields = ", ".join(f"{name}={_format(value)}" for name, value in entry.items())
        self.info(f"[{kind}] {fields}")

    def _write_json(self) -> None:
        atomic_write_text(self.paths.json_log(self.tag), json.dumps(self.history, indent="\t"))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``'1:02:05'``."""
    hours, remainder = divmod(int(max(0.0, seconds)), 3600)
    minutes, seconds = divmod(remainder, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
