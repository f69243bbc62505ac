"""Suite-wide settings: a private data cache, and `gpu` tests skipped with a reason on CPU machines."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

# Built-in data and dataset indexes go to a throw-away cache, never to the user's ~/.cache/genssl.
# Set before any test runs so subprocesses (launchers, recipes) inherit it; removed when the session ends.
_OWN_CACHE = None if "GENSSL_CACHE" in os.environ else tempfile.mkdtemp(prefix="genssl-test-cache-")
if _OWN_CACHE:
    os.environ["GENSSL_CACHE"] = _OWN_CACHE
# Without a GPU, Triton kernels run in the interpreter; it must be on before triton.language is
# imported (by any test folder), so it is set here. With a GPU the compiled kernels are tested.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
