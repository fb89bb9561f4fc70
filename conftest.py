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


def pytest_configure(config):
    """nbval opens --nbval-sanitize-with relative to the working directory: anchor it at the repository,
    so that `pytest 03_attention.ipynb` run from notebooks/ (or by an IDE) finds it too."""
    path = getattr(config.option, "nbval_sanitize_with", None)
    if path and not os.path.isabs(path):
        config.option.nbval_sanitize_with = str(config.rootpath / path)
