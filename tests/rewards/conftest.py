import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture()
def fake_server():
    """A real HTTP server on 127.0.0.1 with fault modes (see fake_http.py)."""
    from fake_http import FakeServer

    server = FakeServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_orm(tmp_path_factory) -> str:
    """A tiny sequence-classification ORM trained in seconds (tiny_rm.py)."""
    from tiny_rm import train_tiny_orm

    return train_tiny_orm(tmp_path_factory.mktemp("tiny_orm"))


@pytest.fixture(scope="session")
def tiny_prm(tmp_path_factory) -> str:
    """A tiny token-classification PRM trained in seconds (tiny_rm.py)."""
    from tiny_rm import train_tiny_prm

    return train_tiny_prm(tmp_path_factory.mktemp("tiny_prm"))
