"""How a training run starts on its tag: continue the tag's checkpoint or start fresh, from ``--resume``,
``--overwrite``, a torchrun restart and what the tag already holds (its model card and checkpoint)."""
from __future__ import annotations

from tools.artifacts.files import ArtifactError
from tools.artifacts.model_card import read_card
from tools.artifacts.paths import ExperimentPaths
from tools.training.config import TrainConfig
from tools.training.distributed import restarted_by_torchrun


def start_mode(config: TrainConfig, paths: ExperimentPaths) -> str:
    """``resume`` (continue the tag's checkpoint) or ``fresh``, from ``--resume`` and what the tag holds.

    ``--resume`` (yes) needs a checkpoint; ``--overwrite`` starts again; ``--resume auto`` (and every
    restart of torchrun's workers, whose command is the first start's) continues a checkpoint when there
    is one and starts fresh when there is none, over an unfinished model too; without either, a tag that
    holds a model or checkpoint is refused. A finished model is only ever replaced with ``--overwrite``.
    """
    tag = config.tag
    mode = config.resume
    if mode == "no" and restarted_by_torchrun():
        mode = "auto"
    checkpoint, model = paths.checkpoint(tag), paths.model(tag)
    if config.overwrite:
        return "fresh"
    card = read_card(model)
    finished = card.get("finished", True) if card is not None else model.is_file() and not checkpoint.is_file()
    if mode == "yes" or (mode == "auto" and checkpoint.is_file() and not (card and finished)):
        return "resume"
    if mode == "auto" and not finished:
        return "fresh"
    if finished:
        raise ArtifactError(f"{model}: tag {tag} already holds a trained model (its run finished: --resume only "
                            "continues an interrupted one); train it again with --overwrite, or choose another "
                            "--tag")
    if checkpoint.is_file():
        raise ArtifactError(f"{checkpoint}: tag {tag} holds the checkpoint of an interrupted run; continue it "
                            "with --resume (or --resume auto), start again with --overwrite, or choose another "
                            "--tag")
    if model.is_file():
        raise ArtifactError(f"{model}: tag {tag} holds the unfinished model of a run that stopped before its "
                            "first checkpoint; start again with --resume auto or --overwrite")
    return "fresh"
