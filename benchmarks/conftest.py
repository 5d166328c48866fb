"""pytest-benchmark suite of glmix-kernels: ``pytest benchmarks/ [--full] [--benchmark-json=R.json]``.

The default run is a short CPU-sized sweep; ``--full`` (or ``GLMIX_BENCH_FULL=1``) runs the whole
one. Turn JSON files into a report with ``python -m glmix_kernels.bench report R.json``.
"""

import gc
import os

import pytest
import torch

from . import _common


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="glmix-kernels benchmarks: the full sweep (also GLMIX_BENCH_FULL=1)",
    )


def pytest_generate_tests(metafunc):
    full = metafunc.config.getoption("--full") or os.environ.get("GLMIX_BENCH_FULL") == "1"
    for name, cases in _common.CASES.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, cases(full, _common.DEVICE), ids=str)


@pytest.fixture(autouse=True)
def _fresh_state():
    torch.manual_seed(0)
    yield
    # Drop the last benchmark's tensors before the next one measures its peak memory.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
