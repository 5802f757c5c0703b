from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.utils.tiny import make_shapes_dataset, make_tiny_bundle

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16x16 bundle trained for a few steps, shared by every test that samples."""
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def shapes_dir(tmp_path: Path) -> Path:
    return make_shapes_dataset(tmp_path / "shapes", n=8, size=32)
