"""Suite-wide settings."""

import os

import torch

# The test models are tiny: one thread is as fast as two on an idle machine and many times faster on a busy one
# (OpenMP threads of concurrent processes wait on each other). Subprocess tests inherit it via the environment.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(session, config, items):
    """Files with the most `slow` tests first, each file's tests kept together and in order.

    `make test` runs the files in parallel processes (pytest-xdist, --dist loadfile), handing out files in this
    order: the long files start first instead of leaving one process running alone at the end.
    """
    slow: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        path = str(item.path)
        first_seen.setdefault(path, index)
        slow[path] = slow.get(path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (-slow[str(item.path)], first_seen[str(item.path)]))
