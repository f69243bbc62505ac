"""GlobalBatchNorm (CPU SyncBatchNorm) on 2 gloo ranks equals one BatchNorm over the whole batch:
outputs, input and parameter gradients, running statistics."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from genssl.models.sync_batchnorm import GlobalBatchNorm, convert_sync_batchnorm


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 3, 7, generator=g, dtype=torch.float64) * 3 + 2  # odd shapes, a non-zero mean
    w = torch.randn(6, 5, 3, 7, generator=g, dtype=torch.float64)  # weights the output goes into the loss with
    return x, w


def _reference():
    x, w = _data()
    x.requires_grad_(True)
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    y = bn(x)
    (y * w).sum().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    x, w = _data()
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    bn = convert_sync_batchnorm(bn, torch.device("cpu"))
    assert isinstance(bn, GlobalBatchNorm)
    rows = slice(0, 2) if rank == 0 else slice(2, 6)  # uneven halves: the count must be all-reduced too
    xr = x[rows].clone().requires_grad_(True)
    y = bn(xr)
    (y * w[rows]).sum().backward()  # each rank's part of the single-process loss
    torch.save({"y": y.detach(), "gx": xr.grad, "gw": bn.weight.grad, "gb": bn.bias.grad,
                "rm": bn.running_mean, "rv": bn.running_var}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_batchnorm_on_two_ranks_equals_one_batchnorm(tmp_path) -> None:
    mp.spawn(_worker, args=(_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    y, gx, gw, gb, rm, rv = _reference()
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y)
    torch.testing.assert_close(torch.cat([r0["gx"], r1["gx"]]), gx)
    # Parameter gradients are per rank (DeepSpeed sums/averages them); their sum is the global one.
    torch.testing.assert_close(r0["gw"] + r1["gw"], gw)
    torch.testing.assert_close(r0["gb"] + r1["gb"], gb)
    for r in (r0, r1):
        torch.testing.assert_close(r["rm"], rm)
        torch.testing.assert_close(r["rv"], rv)


def test_single_process_is_plain_batchnorm_and_conversion_keeps_tensors() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    weight, mean = model[1].weight, model[1].running_mean
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(converted[1], GlobalBatchNorm)
    assert converted[1].weight is weight and converted[1].running_mean is mean
    x = torch.randn(5, 4, 6, 6)  # [N, C, H, W]: straight into the BatchNorm
    reference = nn.BatchNorm2d(4)
    torch.testing.assert_close(converted[1](x), reference(x))
