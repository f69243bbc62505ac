"""On CUDA the contrastive objectives' losses run the fused Triton kernel, not the torch reference."""

from __future__ import annotations

import pytest
import torch

from genssl.kernels import contrastive as kernel
from genssl.models.contrastive import MoCoV2Loss, MoCoV3Loss, NTXentLoss

pytestmark = pytest.mark.gpu


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    calls: list = []
    original = kernel._ContrastiveRows.apply

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(kernel._ContrastiveRows, "apply", counting)
    monkeypatch.setattr(kernel, "contrastive_rows_reference", lambda *a, **k: pytest.fail("reference path taken on CUDA"))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_simclr_mocov2_mocov3_losses_take_the_fused_kernel(fused_calls: list, dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    z1, z2 = (torch.randn(64, 128, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    NTXentLoss(temperature=0.1)(z1, z2).backward()
    MoCoV3Loss(temperature=0.2)(z1, z2.detach()).backward()
    mocov2 = MoCoV2Loss(128, queue_size=4096, temperature=0.2).to(device)
    mocov2(z1, z2.detach()).backward()
    assert len(fused_calls) == 3, fused_calls
    assert fused_calls[0] == (128, 128) and fused_calls[2][0] == 64
