"""Where artifacts live and what their folders are called.

Layout (``root`` defaults to ``experiments/``)::

    models/<tag>.pth                 weights, the next stage's input
    models/<tag>.json                the model card (``tools.artifacts.model_card``)
    models/<tag>.last.pth            full training checkpoint for --resume
    logs/<tag>.txt, logs/<tag>.json  text and JSON logs
    tensorboards/<tag>/              TensorBoard events
    predictions/<experiment name>/   one file per image id (.npz CAMs / random walk, .png labels)
      reports/                       evaluate.py's JSON and plot, kept out of the per-id files so that a
                                     glob of the folder's *.png / *.npz sees only labels and maps
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tools.artifacts.locks import LOCK_SUFFIX
from tools.artifacts.model_card import card_path

CAM_SUFFIX = ".npz"
LEGACY_SUFFIX = ".npy"
PNG_SUFFIX = ".png"
AFFINITY_LABEL_NAME = re.compile(r"^(?P<cams>.+)@aff_fg=[^@_]+_bg=[^@]+(@swapped)?$")  # affinity_label_name's
REPORTS_DIR = "reports"  # evaluation outputs inside a prediction folder


# ----------------------------------------------------------------------------- naming
def domain_tag(domain: str) -> str:
    """The original tags every domain containing 'train' (train, train_aug) as ``train``, else ``val``."""
    return "train" if "train" in domain else "val"


def format_scales(scales: list[float] | tuple[float, ...]) -> str:
    """``[0.5, 1.0]`` -> ``'0.5,1.0'`` as in the original's folder names."""
    return ",".join(str(float(scale)) for scale in scales)


def cam_experiment_name(tag: str, domain: str, scales: list[float] | tuple[float, ...]) -> str:
    return f"{tag}@{domain_tag(domain)}@scale={format_scales(scales)}"


def affinity_label_name(cam_experiment: str, fg_threshold: float, bg_threshold: float) -> str:
    return f"{cam_experiment}@aff_fg={fg_threshold:.2f}_bg={bg_threshold:.2f}"


def affinity_label_source(label_name: str) -> str | None:
    """The CAM folder name an ``affinity_label_name`` (plus ``make_affinity_labels.py``'s ``@swapped``) was
    made from; None for a name of another form."""
    match = AFFINITY_LABEL_NAME.match(label_name)
    return match.group("cams") if match else None


def random_walk_name(model_name: str, domain: str, beta: int, exp_times: int) -> str:
    return f"{model_name}@{domain_tag(domain)}@beta={beta}@exp_times={exp_times}@rw"


def crf_refinement_name(cam_experiment: str, settings: str) -> str:
    """``<cam experiment>@crf_refine=<settings>`` (``refine_crf.py``'s ``bg<power>_t<iterations>``...)."""
    return f"{cam_experiment}@crf_refine={settings}"


def pseudo_label_name(experiment_name: str, crf_iteration: int) -> str:
    return f"{experiment_name}@crf={crf_iteration}"


def reports_dir(pred_dir: str | Path) -> Path:
    """``<pred_dir>/reports``: where ``evaluate.py`` writes by default (out of the way of ``<id>.png``)."""
    return Path(pred_dir) / REPORTS_DIR


def evaluation_json(pred_dir: str | Path, ids_name: str, mode: str) -> Path:
    """The default protocol's result of ``evaluate.py --domain <ids_name> --mode <mode>`` on ``pred_dir``:
    ``<pred_dir>/reports/evaluation_<ids_name>_<mode>.json`` (its plot is the ``.png`` beside it)."""
    return reports_dir(pred_dir) / f"evaluation_{ids_name}_{mode}.json"



@dataclass(frozen=True)
class ExperimentPaths:
    """Where a stage reads and writes its artifacts."""

    root: Path = Path("experiments")

    def model(self, tag: str) -> Path:
        return self.root / "models" / f"{tag}.pth"

    def model_card(self, tag: str) -> Path:
        """The model's card (architecture and provenance), written together with ``model(tag)``."""
        return card_path(self.model(tag))

    def model_lock(self, tag: str) -> Path:
        """The writer lock of a tag (``tools.artifacts.locks``): one training run per tag at a time."""
        return self.root / "models" / f"{tag}{LOCK_SUFFIX}"

    def checkpoint(self, tag: str) -> Path:
        return self.root / "models" / f"{tag}.last.pth"

    def text_log(self, tag: str) -> Path:
        return self.root / "logs" / f"{tag}.txt"

    def json_log(self, tag: str) -> Path:
        return self.root / "logs" / f"{tag}.json"

    def tensorboard(self, tag: str) -> Path:
        return self.root / "tensorboards" / tag

    def predictions(self, experiment_name: str) -> Path:
        return self.root / "predictions" / experiment_name


def prediction_file(directory: str | Path, image_id: str) -> Path:
    """The CAM / random-walk file of an id: ``<id>.npz``, or a legacy ``<id>.npy`` if only that exists."""
    directory = Path(directory)
    native = directory / f"{image_id}{CAM_SUFFIX}"
    legacy = directory / f"{image_id}{LEGACY_SUFFIX}"
    return legacy if not native.exists() and legacy.exists() else native

