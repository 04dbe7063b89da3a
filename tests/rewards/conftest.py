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
