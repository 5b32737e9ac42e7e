"""Shared fixtures: one small synthetic VOC-layout dataset per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from tools.data.synthetic.voc_writer import generate_dataset


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """Descriptor path of a 3-class synthetic set: 24 train_aug (6 train) and 8 val images, 64-96 px."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_dataset(root, num_classes=3, num_train=24, num_val=8, seed=1, min_size=64, max_size=96,
                            progress=False)

