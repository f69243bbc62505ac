"""Suite-wide settings: a private data cache, and `gpu` tests skipped with a reason on CPU machines."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Built-in data and dataset indexes go to a throw-away cache, never to the user's ~/.cache/genssl.
# Set before any test runs so subprocesses (launchers, recipes) inherit it.
os.environ.setdefault("GENSSL_CACHE", tempfile.mkdtemp(prefix="genssl-test-cache-"))
# Without a GPU, Triton kernels run in the interpreter; it must be on before triton.language is
# imported (by any test folder), so it is set here. With a GPU the compiled kernels are tested.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
