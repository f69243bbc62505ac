"""2-rank gloo workers for the SimCLR / MoCo v2 / MoCo v3 objective tests (importable by spawned
processes as ``genssl.tests.models.ssl_dist_workers``).

Every rank builds the same student and objective from a fixed seed and the same global batch, then
runs on its own slice, with BatchNorm synchronised as the trainer does on > 1 rank. The parent
compares the results with one process on the concatenated batch (plain BatchNorm over all of it is
what the synchronised BN computes across the ranks).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from genssl.tests import dist_spawn

B_LOCAL, SIDE = 3, 5  # images per rank, crop side


class TinyBackbone(nn.Module):
    """conv → BN → ReLU → pool → linear: ``[B, 3, H, W] -> [B, embed_dim]``, with a BatchNorm to sync."""

    def __init__(self, embed_dim: int = 12):
        super().__init__()
        self.embed_dim = embed_dim
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(method: str, **cfg_overrides):
    """(student, objective) of ``method`` on a TinyBackbone, identical for a given seed on every rank."""
    from genssl.models import mocov2, mocov3, simclr

    torch.manual_seed(0)
    backbone = TinyBackbone()
    if method == "simclr":
        cfg = simclr.SimCLRConfig(hidden_dim=16, out_dim=7, temperature=0.3, **cfg_overrides)
        student = simclr.build_simclr_student(backbone, cfg)
        return student, simclr.SimCLRObjective(student, cfg, 2, 1, torch.float32)
    if method == "mocov2":
        cfg = mocov2.MoCoV2Config(hidden_dim=16, out_dim=7, queue_size=10, **cfg_overrides)
        student = mocov2.build_mocov2_student(backbone, cfg)
        return student, mocov2.MoCoV2Objective(student, cfg, 2, 1, torch.float32)
    cfg = mocov3.MoCoV3Config(hidden_dim=16, out_dim=7, temperature=0.5, **cfg_overrides)
    student = mocov3.build_mocov3_student(backbone, cfg)
    return student, mocov3.MoCoV3Objective(student, cfg, 2, 1, torch.float32)


def global_crops(world: int, step: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(world * B_LOCAL, 3, SIDE, SIDE, generator=g) for _ in range(2)]


def progress():
    from genssl.engine.trainer import Progress

    return Progress(global_step=0, epoch=0, step_in_epoch=0, steps_per_epoch=1, total_steps=1)


def _local(crops: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    return [c[rank * B_LOCAL:(rank + 1) * B_LOCAL] for c in crops]


def scenario_loss_and_grads(method: str, rank: int, world: int) -> dict:
    """One training_loss + backward of SimCLR or MoCo v3: loss and the student's gradients."""
    from genssl.models.sync_batchnorm import convert_sync_batchnorm

    student, objective = build(method)
    student = convert_sync_batchnorm(student, torch.device("cpu"))
    objective = convert_sync_batchnorm(objective, torch.device("cpu"))
    crops = _local(global_crops(world), rank)
    loss, terms = objective.training_loss(student, (crops, torch.arange(B_LOCAL)), progress())
    loss.backward()
    return {"loss": loss.detach(), "term": terms["loss_contrastive"],
            "grads": [p.grad.clone() for p in student.parameters()]}


def scenario_mocov2_queue(rank: int, world: int) -> dict:
    """Two kept steps of MoCo v2 (queue 10, global batch 6: the second step wraps around)."""
    from genssl.models.sync_batchnorm import convert_sync_batchnorm

    student, objective = build("mocov2", shuffle_bn_groups=1)
    student = convert_sync_batchnorm(student, torch.device("cpu"))
    objective = convert_sync_batchnorm(objective, torch.device("cpu"))
    out = {"queue_init": objective.loss.queue.clone()}
    for step in range(2):
        crops = _local(global_crops(world, step), rank)
        loss, _ = objective.training_loss(student, (crops, torch.arange(B_LOCAL)), progress())
        out[f"loss{step}"] = loss.detach()
        out[f"queue_before_kept{step}"] = objective.loss.queue.clone()
        objective.step_kept()
        out[f"queue{step}"] = objective.loss.queue.clone()
        out[f"ptr{step}"] = objective.loss.queue_ptr.clone()
    return out


SCENARIOS = {
    "simclr": lambda rank, world: scenario_loss_and_grads("simclr", rank, world),
    "mocov3": lambda rank, world: scenario_loss_and_grads("mocov3", rank, world),
    "mocov2_queue": scenario_mocov2_queue,
}


def spawn(scenario: str, tmp_path: Path, world: int = 2) -> list[dict]:
    """Run ``SCENARIOS[scenario]`` on ``world`` gloo ranks; each rank's results."""
    return dist_spawn.spawn(__name__, scenario, tmp_path, world)
