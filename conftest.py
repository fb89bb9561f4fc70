"""Settings shared by the unit tests and by nbval's notebook kernels (they inherit this environment)."""
import os

import pytest

# Progress bars write to stderr, which strict nbval compares: keep them out of checked cells.
os.environ.setdefault("TQDM_DISABLE", "1")
# Tests never time anything, and never reach for a GPU by accident.
os.environ.setdefault("NANOLIB_DEVICE", "cpu")


@pytest.fixture
def one_thread():
    """Tiny models run faster on one torch thread, and are then immune to other processes on a busy machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
