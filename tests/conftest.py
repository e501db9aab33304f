"""Test-session setup: under pytest-xdist (pytest.ini runs 2 workers) every worker computes on one thread.

Two workers with two OpenMP threads each on a 2-core machine spin against each other: an in-process test that
takes 2 s alone took 122 s that way. Subprocesses started by tests inherit OMP_NUM_THREADS=1 (most set it anyway).
"""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
