"""Tiny models and the 2-rank gloo workers of the BYOL / SimSiam / Barlow Twins / SwAV tests.

Importable by spawned processes as ``genssl.tests.models.ssl_dist_workers_b``. Every rank builds the
same global batch and the same seeded student, runs on its slice of the batch (BatchNorms converted
to global ones, as the trainer does), and saves tensors that the parent compares with a
single-process run on the concatenated batch (`single_process_*`, which the parent runs itself).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from genssl.tests import dist_spawn

WORLD = 2
B_LOCAL = 3  # images per rank
K = 7        # prototypes (SwAV)


class TinyBackbone(nn.Sequential):
    """Conv-BN-ReLU-pool: any crop size, BatchNorm included (as the ResNets); ``embed_dim`` = width."""

    def __init__(self, width: int = 6):
        super().__init__(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed_dim = width


def tiny_student(method: str, seed: int = 0, **cfg_overrides):
    """A seeded student and config of ``method`` with a TinyBackbone and small heads."""
    from genssl.models import barlow, byol, simsiam, swav

    torch.manual_seed(seed)
    if method == "barlow":
        cfg = barlow.BarlowConfig(hidden_dim=10, out_dim=9, lambd=0.3, **cfg_overrides)
        return barlow.build_barlow_student(TinyBackbone(), cfg), cfg
    if method == "byol":
        cfg = byol.BYOLConfig(hidden_dim=10, out_dim=5, predictor_hidden_dim=8, **cfg_overrides)
        return byol.build_byol_student(TinyBackbone(), cfg), cfg
    if method == "simsiam":
        cfg = simsiam.SimSiamConfig(hidden_dim=10, out_dim=9, predictor_hidden_dim=4, **cfg_overrides)
        return simsiam.build_simsiam_student(TinyBackbone(), cfg), cfg
    cfg = swav.SwAVConfig(hidden_dim=10, out_dim=5, n_prototypes=K, **cfg_overrides)
    return swav.build_swav_student(TinyBackbone(), cfg), cfg


def global_crops(sizes: list[int], batch: int, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g, dtype=dtype) for s in sizes]


def _local(t: torch.Tensor, rank: int, n: int = B_LOCAL) -> torch.Tensor:
    return t[rank * n:(rank + 1) * n].clone()


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def _progress(step: int, epoch: int = 0):
    from genssl.engine.trainer import Progress

    return Progress(global_step=step, epoch=epoch, step_in_epoch=step, steps_per_epoch=100, total_steps=100)


# ------------------------------------------------------------------------------- Barlow Twins

def barlow_batch(world: int = WORLD, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = world * B_LOCAL
    return {"x1": torch.randn(n, 4, generator=g, dtype=torch.float64),
            "x2": torch.randn(n, 4, generator=g, dtype=torch.float64),
            "a": torch.randn(4, 6, generator=g, dtype=torch.float64)}


def barlow_objective_run(world: int, rank: int) -> dict:
    """Barlow objective on this rank's slice of a WORLD-rank batch (all of it when world == 1): loss, gradients."""
    from genssl.models.barlow import BarlowObjective
    from genssl.models.sync_batchnorm import convert_sync_batchnorm

    student, cfg = tiny_student("barlow")
    student = convert_sync_batchnorm(student, torch.device("cpu")).double()
    objective = BarlowObjective(student, cfg, n_global=2, epochs=1, dtype=torch.float64)
    crops = global_crops([8, 8], WORLD * B_LOCAL, seed=1)
    if world > 1:
        crops = [_local(c, rank) for c in crops]
    loss, terms = objective.training_loss(student, (crops, None), _progress(0))
    loss.backward()
    return {"loss": loss.detach(), "on_diag": terms["on_diag"], "grads": _grads(student)}


def scenario_barlow(rank: int, world: int) -> dict:
    from genssl.models.barlow import barlow_twins_loss

    b = barlow_batch(world)
    a = b["a"].clone().requires_grad_(True)  # a weight shared by the ranks (as the model's)
    x1 = _local(b["x1"], rank).requires_grad_(True)
    x2 = _local(b["x2"], rank).requires_grad_(True)
    loss, on_diag, off_diag = barlow_twins_loss(x1 @ a, x2 @ a, lambd=0.3)
    da, dx1, dx2 = torch.autograd.grad(loss, (a, x1, x2))
    return {"loss": loss.detach(), "on_diag": on_diag.detach(), "off_diag": off_diag.detach(),
            "da": da, "dx1": dx1, "dx2": dx2, "objective": barlow_objective_run(world, rank)}


# ------------------------------------------------------------------------------- SwAV

SWAV_QUEUE = 8  # a multiple of WORLD; full after two steps of WORLD * B_LOCAL = 6 images
SWAV_SIZES = [8, 8, 4]  # two global crops and one local crop
SWAV_STEPS = 4  # epoch 0 (queue off), fill, fill (now full), use


def swav_batch(world: int = WORLD, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = world * B_LOCAL
    return {"scores": torch.rand(n, K, generator=g, dtype=torch.float64) * 2 - 1,
            "queue_scores": torch.rand(SWAV_QUEUE, K, generator=g, dtype=torch.float64) * 2 - 1,
            "crop_scores": torch.rand(3 * n, K, generator=g, dtype=torch.float64) * 2 - 1}


def swav_objective_run(world: int, rank: int) -> dict:
    """SWAV_STEPS steps of the SwAV objective with a queue (no optimizer step: weights fixed).

    Per step: the loss, the gradients, the codes of the global crops, and the queue after step_kept."""
    from genssl.models.swav import SwAVObjective
    from genssl.models.sync_batchnorm import convert_sync_batchnorm

    student, cfg = tiny_student("swav", queue_length=SWAV_QUEUE, epoch_queue_starts=1)
    student = convert_sync_batchnorm(student, torch.device("cpu")).double()
    objective = SwAVObjective(student, cfg, n_global=2, epochs=3, dtype=torch.float64).double()
    out = []
    for step in range(SWAV_STEPS):
        crops = global_crops(SWAV_SIZES, WORLD * B_LOCAL, seed=10 + step)
        if world > 1:
            crops = [_local(c, rank) for c in crops]
        with torch.no_grad():
            _, scores = student(crops[:2])
            codes = objective.codes(scores, student)
        student.zero_grad(set_to_none=True)
        # Step 0 is in epoch 0, before epoch_queue_starts=1: it must leave the queue empty.
        loss, terms = objective.training_loss(student, (crops, None), _progress(step, epoch=min(step, 1)))
        loss.backward()
        objective.step_kept()
        out.append({"loss": loss.detach(), "grads": _grads(student), "codes": codes,
                    "queue": objective.queue.clone(), "filled": objective.queue_filled.clone(),
                    "in_use": terms["queue_in_use"]})
    return {"steps": out}


def scenario_swav(rank: int, world: int) -> dict:
    from genssl.models.swav import sinkhorn_knopp, swav_loss

    b = swav_batch(world)
    n_q = SWAV_QUEUE // world
    # Codes over [queue; batch]: this rank holds its slice of the queue and of the batch.
    local = torch.cat([b["queue_scores"][rank * n_q:(rank + 1) * n_q], _local(b["scores"], rank)])
    codes = sinkhorn_knopp(local, epsilon=0.05, iterations=3)[-B_LOCAL:]
    # The loss on this rank's rows of 3 crops (crop-major), codes from the first 2.
    crop_scores = torch.cat([_local(b["crop_scores"].view(3, world * B_LOCAL, K)[v], rank) for v in range(3)])
    crop_scores.requires_grad_(True)
    crop_codes = torch.softmax(crop_scores.detach()[:2 * B_LOCAL] * 3, dim=1)
    loss, _ = swav_loss(crop_scores, crop_codes, n_global=2, temperature=0.1)
    (dscores,) = torch.autograd.grad(loss, crop_scores)
    return {"codes": codes, "loss": loss.detach(), "dscores": dscores, "objective": swav_objective_run(world, rank)}


# ------------------------------------------------------------------------------- spawning

SCENARIOS = {"barlow": scenario_barlow, "swav": scenario_swav}


def spawn(scenario: str, tmp_path: Path, world: int = WORLD) -> list[dict]:
    """Run ``SCENARIOS[scenario]`` on ``world`` gloo ranks; each rank's results."""
    return dist_spawn.spawn(__name__, scenario, tmp_path, world)
