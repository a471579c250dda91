"""Set-up shared by every test file: how many threads torch may use.

Under pytest-xdist (`python -m pytest -n N`, an optional plugin, not a requirement) each of the N workers is
its own process, and torch gives each process one thread per core: N workers would run N × cores threads and
spend their time switching between them.
Here each worker takes its share of the cores instead. A plain `python -m pytest` is left as torch sets it.
"""

import os

import torch


def pytest_configure(config):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")  # set by xdist in each worker, absent otherwise
    if workers:
        # the cores this process may run on (a container may show more in os.cpu_count())
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // int(workers)))
