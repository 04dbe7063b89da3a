import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def fixtures_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[1] / "fixtures"
