"""Settings shared by the unit tests and by nbval's notebook kernels (they inherit this environment)."""
import os

# Progress bars write to stderr, which strict nbval compares: keep them out of checked cells.
os.environ.setdefault("TQDM_DISABLE", "1")
# Tests never time anything, and never reach for a GPU by accident.
os.environ.setdefault("NANOLIB_DEVICE", "cpu")
