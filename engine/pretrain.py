"""Pretrain, export, evaluate: what every training recipe does after building its student.

A recipe supplies the seeded student builder, the objective and which network is the encoder
(DINO's EMA teacher; the student for SimCLR, MoCo, BYOL, ...). `pretrain` trains it with
`engine.trainer.fit`, exports the encoder (encoder.safetensors + encoder.json), runs k-NN and the
linear probe, writes ``eval.json`` (its accuracies also to TensorBoard, ``eval/*`` at the last step)
and prints the result beside the random-init floor.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from genssl.engine.atomic import write_json_atomic
from genssl.engine.config import to_dict
from genssl.engine.distributed import DistInfo, barrier
from genssl.engine.evaluate import calibrate_batchnorm, describe, evaluate_encoder
from genssl.engine.export import save_encoder
from genssl.engine.metrics import log_scalars
from genssl.engine.run_config import TrainConfig
from genssl.engine.setup import Data
from genssl.engine.trainer import fit
from genssl.models.backbones import backbone_config, build_backbone

__all__ = ["evaluate", "evaluate_random_init", "student_backbone", "accuracy_scalars", "pretrain"]


def evaluate(backbone: nn.Module, cfg: TrainConfig, dist: DistInfo, data: Data) -> dict:
    """k-NN and linear probe (``cfg.eval``) of a frozen backbone, on images normalised as in training."""
    return evaluate_encoder(backbone, data.train, data.val, cfg.eval, dist, cfg.seed, cfg.num_workers,
                            cfg.crops.mean, cfg.crops.std)


def evaluate_random_init(initial_student: Callable[[], nn.Module], cfg: TrainConfig, dist: DistInfo, data: Data) -> dict:
    """The floor a trained encoder must beat: `evaluate` of the backbone training starts from
    (``initial_student()``, seeded), its BatchNorm statistics set from the data (`calibrate_batchnorm`:
    a trained encoder has them too).

    Leaves the global RNG as it was, so calling it does not change what a later run draws.
    """
    with torch.random.fork_rng(devices=[]):
        backbone = initial_student().backbone.to(dist.device)
    calibrate_batchnorm(backbone, data.train, cfg.eval, dist, cfg.num_workers, cfg.crops.mean, cfg.crops.std)
    return evaluate(backbone, cfg, dist, data)


def student_backbone(engine) -> nn.Module:
    """A plain fp32 copy of the trained student's backbone, whatever the ZeRO stage.

    Under ZeRO-3 every rank holds only a shard of each parameter: they are gathered for the copy
    (every rank calls this). The copy is rebuilt from ``build_kwargs``, so it carries none of
    DeepSpeed's hooks, and its BatchNorms are plain again (same state-dict keys as the synced ones).
    """
    import deepspeed

    trained = engine.module.backbone
    with deepspeed.zero.GatheredParameters(list(trained.parameters()), modifier_rank=None):
        state = {k: v.detach().float().clone() for k, v in trained.state_dict().items()}
    backbone = build_backbone(**backbone_config(trained))
    backbone.load_state_dict(state)
    return backbone.to(next(iter(state.values())).device)


def accuracy_scalars(result: dict, random_init: dict | None = None) -> dict[str, float]:
    """The accuracies of an `evaluate` result as TensorBoard tags: ``eval/knn_top1``, ...; the floor's as
    ``eval/random_init/knn_top1``, ... (None, i.e. not measured, is left out)."""
    scalars = {}
    for prefix, r in (("eval/", result), ("eval/random_init/", random_init or {})):
        scalars.update({prefix + k: v for k, v in r.items() if k.endswith(("top1", "top5")) and v is not None})
    return scalars


def pretrain(cfg: TrainConfig, dist: DistInfo, data: Data, loader, student: nn.Module, objective: nn.Module,
             encoder: Callable[[object], nn.Module], deepspeed_config: str | None = None,
             random_init: dict | None = None, late_params: Iterable[nn.Parameter] = (),
             fixed_lr_params: Iterable[nn.Parameter] = ()) -> dict:
    """Train ``student`` with ``objective``, export ``encoder(engine)``, evaluate it; every rank calls it.

    Returns `evaluate`'s result (its numbers are None for unlabelled data). ``random_init``, the
    floor from `evaluate_random_init`, is printed beside it and written into eval.json.
    """
    engine, trained = fit(cfg, dist, student, objective, loader, cfg.out, deepspeed_config, late_params=late_params,
                          fixed_lr_params=fixed_lr_params)
    backbone = encoder(engine)
    result = evaluate(backbone, cfg, dist, data)
    if dist.is_main:
        save_encoder(backbone, cfg.out, to_dict(cfg), data.train.fingerprint)
        write_json_atomic(f"{cfg.out}/eval.json", result if random_init is None else {**result, "random_init": random_init})
        if cfg.log.tensorboard:
            log_scalars(cfg.out, accuracy_scalars(result, random_init), trained.global_step)
        print(f"evaluation on {cfg.data}:")
        if random_init is not None:
            print(f"  random init  {describe(random_init)}")
        print(f"  trained      {describe(result)}")
        print(f"wrote {cfg.out}/encoder.safetensors and {cfg.out}/eval.json", flush=True)
    barrier()
    return result
