import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny model is fastest on one thread, and one thread keeps timings sane on a shared, busy CPU
    (OpenMP workers spin badly when other processes hold the cores). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
