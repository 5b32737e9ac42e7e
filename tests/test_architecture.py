"""One owner per artifact format and one setup path per kind of stage (the layout's promises, part 10)."""
from __future__ import annotations

import ast

import numpy as np
import pytest

from tests.cli_runner import REPO
from tools.artifacts.files import ArtifactError
from tools.artifacts.predictions import ScoreMaps, score_maps

CODE = [path for path in [*REPO.glob("*.py"), *(REPO / "tools").rglob("*.py"), *(REPO / "core").rglob("*.py")]]
PREDICTION_STAGES = ("inference_semformer.py", "inference_rw.py", "inference_segmentation.py",
                     "make_affinity_labels.py", "make_pseudo_labels.py", "refine_crf.py")
SCORE_READERS = ("make_pseudo_labels.py", "tools/scoring/evaluation.py", "tools/report.py")


def calls(path) -> set[str]:
    """Names of the functions ``path`` calls (plain and attribute calls)."""
    return {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)}


def test_the_model_card_has_one_owner():
    """Only ``tools/artifacts/model_card.py`` knows where ``models/<tag>.json`` lives and how it is read."""
    owner = REPO / "tools" / "artifacts" / "model_card.py"
    offenders = [str(path.relative_to(REPO)) for path in CODE if path != owner
                 and ('with_suffix(".json")' in path.read_text() or '"model description"' in path.read_text())]
    assert offenders == []


def test_every_prediction_stage_starts_through_the_shared_setup_path():
    for name in PREDICTION_STAGES:
        found = calls(REPO / name)
        assert found & {"open_stage_output", "run_label_jobs"}, name
        assert not found & {"claim_output_folder", "pending_ids", "folder_input", "require_complete"}, name


def test_every_reader_of_score_maps_goes_through_one_function():
    for name in SCORE_READERS:
        assert "score_maps" in calls(REPO / name), name


def test_score_maps_prefer_the_refined_maps_and_their_background():
    keys = np.array([0, 2])
    cams = {"keys": keys, "cam": np.ones((1, 2, 2)), "hr_cam": np.full((1, 4, 4), 0.5, np.float32)}
    walk = {"keys": keys, "rw": np.full((1, 4, 4), 0.7, np.float32), "rw_bg": np.zeros((4, 4), np.float32)}
    raw = score_maps(cams, "c.npz")
    assert isinstance(raw, ScoreMaps) and raw.background is None and raw.scores.max() == 0.5
    refined = score_maps({**cams, **walk}, "w.npz")
    assert refined.scores.max() == pytest.approx(0.7) and refined.background is not None
    assert score_maps({**cams, **walk}, "w.npz", "hr_cam").background is None
    assert refined.keys.dtype == np.int64 and refined.keys.tolist() == [0, 2]
    with pytest.raises(ArtifactError, match="w.npz: no 'rw' array"):
        score_maps(cams, "w.npz", "rw")
