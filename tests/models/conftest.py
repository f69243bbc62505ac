"""Shared by the method tests: one intra-op thread (tiny models only contend on a shared 2-core
machine, up to 40x slower there) and random float64-drawn leaf tensors."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_leaves(*shapes, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    """Leaf tensors of ``shapes`` drawn in float64 (scale 2) and cast to ``dtype``: every dtype sees the same values."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_(True) for s in shapes]
