"""2-rank gloo workers for the StableRep tests (importable by spawned processes as
``genssl.tests.models.stablerep_dist_workers``).

Every rank builds the same student and objective from a fixed seed and the same global batch of
sources (V views each), then runs on its own sources, with BatchNorm synchronised as the trainer does
on > 1 rank. The parent compares with one process on the concatenated batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genssl.tests import dist_spawn
from genssl.tests.models.ssl_dist_workers import TinyBackbone, progress

N_LOCAL, V, SIDE = 3, 3, 5  # sources per rank, views per source, crop side


def build():
    """(student, objective) on a TinyBackbone, identical on every rank."""
    from genssl.models.stablerep import StableRepConfig, StableRepObjective, build_stablerep_student

    torch.manual_seed(0)
    cfg = StableRepConfig(hidden_dim=16, out_dim=7, num_layers=3, temperature=0.2)
    student = build_stablerep_student(TinyBackbone(), cfg)
    return student, StableRepObjective(student, cfg, V, 1, torch.float32)


def global_batch(world: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """V views ``[world·N_LOCAL, 3, SIDE, SIDE]`` and the sources' (global, unordered) indices."""
    g = torch.Generator().manual_seed(7)
    views = [torch.randn(world * N_LOCAL, 3, SIDE, SIDE, generator=g) for _ in range(V)]
    return views, torch.randperm(100, generator=g)[: world * N_LOCAL]


def local(world: int, rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    views, idx = global_batch(world)
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    return [v[sl] for v in views], idx[sl]


def scenario_loss_and_grads(rank: int, world: int) -> dict:
    from genssl.models.sync_batchnorm import convert_sync_batchnorm

    student, objective = build()
    student = convert_sync_batchnorm(student, torch.device("cpu"))
    objective = convert_sync_batchnorm(objective, torch.device("cpu"))
    loss, terms = objective.training_loss(student, local(world, rank), progress())
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in student.parameters()]}


def scenario_loss_rows(rank: int, world: int) -> dict:
    """The bare loss on fixed features: value and gradient w.r.t. this rank's rows."""
    from genssl.models.contrastive import MultiPositiveLoss

    g = torch.Generator().manual_seed(3)
    feats = torch.randn(world * 5, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 3, 0, 3, 1][: world * 5])
    mine = feats[rank * 5:(rank + 1) * 5].clone().requires_grad_(True)
    loss = MultiPositiveLoss(0.3)(mine, labels[rank * 5:(rank + 1) * 5])
    loss.backward()
    return {"loss": loss.detach(), "grad": mine.grad.clone()}


def scenario_both(rank: int, world: int) -> dict:
    """Both scenarios in one spawn (starting ranks is the slow part)."""
    return {"rows": scenario_loss_rows(rank, world), "objective": scenario_loss_and_grads(rank, world)}


SCENARIOS = {"objective": scenario_loss_and_grads, "loss_rows": scenario_loss_rows, "both": scenario_both}


def spawn(scenario: str, tmp_path: Path, world: int = 2) -> list[dict]:
    return dist_spawn.spawn(__name__, scenario, tmp_path, world)
