"""DINO pretraining (Caron et al. 2021), then k-NN and linear probe of the teacher's backbone and of its random init.

    deepspeed recipes/dino.py                               # CPU-sized run on builtin:shapes
    deepspeed recipes/dino.py preset=imagenet data=/data/imagenet out=runs/dino_vits16
    deepspeed --num_gpus 8 recipes/dino.py preset=cifar data=../shared/data/cifar10 zero_stage=2

Writes into ``out=``: config.yaml, metrics.jsonl, checkpoints/, encoder.safetensors + encoder.json,
eval.json (the trained backbone's numbers, and under "random_init" the same protocol on the backbone
before training: the floor). Rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses

import torch

from genssl.data.augment import MultiCropSpec
from genssl.engine import pretrain
from genssl.engine.cli import run_main
from genssl.engine.config import parse_config
from genssl.engine.distributed import cleanup, setup_distributed
from genssl.engine.run_config import TrainConfig
from genssl.engine.setup import load_data, train_loader
from genssl.engine.trainer import compute_dtype
from genssl.models.objectives import DINOConfig, DINOObjective, build_dino_student
from genssl.models.packed_vit import set_multicrop


@dataclasses.dataclass
class DINORecipeConfig(TrainConfig):
    out: str = "runs/dino"
    crops: MultiCropSpec = dataclasses.field(default_factory=MultiCropSpec)
    dino: DINOConfig = dataclasses.field(default_factory=DINOConfig)


# The CPU-sized base: 32 px images and a half-width ResNet-18 (width 32) with the small-image stem;
# lr, teacher momentum and batch sized for a few thousand steps, where DINO's ImageNet values (lr 5e-4
# per 256 at batch 64, momentum 0.996) barely move the encoder (docs/LEARNING.md has the measurements).
_CPU_BASE = {
    "data": "builtin:shapes?size=32&per_class=100&val_per_class=50",
    "model": "resnet18", "stem_stride": 2, "width": 32, "epochs": 6, "batch_size": 32, "precision": "fp32",
    "num_workers": 2,
    "crops": {"global_size": 32, "local_size": 16, "n_local": 2, "global_scale": [0.3, 1.0], "local_scale": [0.1, 0.3]},
    "dino": {"out_dim": 1024, "hidden_dim": 256, "bottleneck_dim": 64, "drop_path_rate": 0.0},
    "optim": {"lr": 2e-3, "warmup_epochs": 1, "weight_decay_end": 0.1},
    "ema": {"momentum": 0.99}, "ckpt": {"every_steps": 50}, "log": {"every_steps": 5}, "eval": {"size": 32},
}
# The default (the main job's stage 1): 1,200 built-in 32 px textures, 600 steps, about 2.5 minutes on
# 2 CPU cores. A 5x lr, an unnormalised last layer (DINO's `norm_last_layer=False`: better results in
# its authors' runs, at some risk to stability) and a sharper teacher (temperature 0.02) are what let
# DINO beat its random init in that budget without collapsing: +12.5 k-NN (43.83 -> 56.33 %). With the
# teacher at 0.04 its head collapses to a uniform output within ~150 steps (+7.5 learned before), and
# the base settings gain nothing (docs/LEARNING.md, *A guard that learns*).
SMOKE = {**_CPU_BASE, "data": "builtin:textures?size=32&per_class=100&val_per_class=50", "epochs": 16,
         "dino": {**_CPU_BASE["dino"], "norm_last_layer": False, "teacher_temp": 0.02, "warmup_teacher_temp": 0.02},
         "optim": {**_CPU_BASE["optim"], "lr": 1e-2}}
# 32x32 photos (CIFAR-10 style) on 2 CPU cores in about 30 minutes for 10,000 images: the base
# settings for 20 epochs. Measured on CIFAR-10: random init 24.95 % -> DINO 36.50 % k-NN top-1
# (bench/learning.py, docs/LEARNING.md).
CPU = {**_CPU_BASE, "data": "builtin:shapes?size=32", "epochs": 20, "ckpt": {"every_steps": 500},
       "log": {"every_steps": 10}}
PRESETS = {
    "smoke": SMOKE,
    "cpu": CPU,
    # 32x32 images (CIFAR-10 style): ViT-Tiny/4, 2x32 + 6x16 crops.
    "cifar": {
        "model": "vit_tiny", "patch_size": 4, "epochs": 100, "batch_size": 256, "precision": "bf16",
        "crops": {"global_size": 32, "local_size": 16, "n_local": 6, "global_scale": [0.4, 1.0], "local_scale": [0.1, 0.4]},
        "dino": {"out_dim": 4096, "hidden_dim": 1024, "bottleneck_dim": 256},
        "optim": {"lr": 5e-4, "warmup_epochs": 10}, "eval": {"size": 32},
    },
    # The DINO ViT-S/16 reference settings (docs/METHODS.md §1.1).
    "imagenet": {
        "model": "vit_small", "patch_size": 16, "epochs": 100, "batch_size": 64, "precision": "bf16",
        "crops": {"global_size": 224, "local_size": 96, "n_global": 2, "n_local": 8},
        "dino": {"out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "teacher_temp": 0.04},
        "optim": {"lr": 5e-4, "min_lr": 1e-6, "warmup_epochs": 10, "weight_decay": 0.04, "weight_decay_end": 0.4,
                  "clip_grad": 3.0, "freeze_last_layer_epochs": 1},
        "ema": {"momentum": 0.996}, "eval": {"size": 224},
    },
}


def dino_objective(cfg: DINORecipeConfig):
    """``student -> DINOObjective`` for ``cfg`` (what `train_dino` calls ``make_objective``)."""
    dtype = compute_dtype(cfg.precision)
    return lambda student: DINOObjective(student, cfg.dino, cfg.crops.n_global, cfg.epochs, dtype)


def initial_student(cfg: DINORecipeConfig):
    """The randomly initialised student `train_dino` starts from (seeded: the same on every rank and run)."""
    torch.manual_seed(cfg.seed)
    student = build_dino_student(cfg.model, cfg.crops.global_size, cfg.patch_size, cfg.dino, cfg.stem_stride, cfg.width)
    return set_multicrop(student, cfg.multicrop, cfg.attention)


def evaluate_random_init(cfg: DINORecipeConfig, dist, data) -> dict:
    """The floor a trained encoder must beat (engine/pretrain.evaluate_random_init of `initial_student`)."""
    return pretrain.evaluate_random_init(lambda: initial_student(cfg), cfg, dist, data)


def train_dino(cfg: DINORecipeConfig, dist, data, loader, make_objective, deepspeed_config: str | None = None,
               random_init: dict | None = None) -> dict:
    """Pretrain with ``make_objective(student)``, export and evaluate the teacher's backbone (DINO's
    encoder); every rank calls it. Gen-DINO reuses this with its own loader and objective."""
    student = initial_student(cfg)
    objective = make_objective(student)
    return pretrain.pretrain(cfg, dist, data, loader, student, objective, lambda engine: objective.teacher.module.backbone,
                             deepspeed_config, random_init, late_params=student.head.last_layer_parameters())


def main(argv: list[str] | None = None) -> dict:
    args = parse_config(argv, DINORecipeConfig, PRESETS, default_preset="smoke")
    cfg: DINORecipeConfig = args.config
    dist = setup_distributed(args.local_rank)
    data = load_data(cfg.data, cfg.cache_dir, dist)
    loader = train_loader(data.train, cfg.crops, cfg, dist)
    random_init = evaluate_random_init(cfg, dist, data)
    result = train_dino(cfg, dist, data, loader, dino_objective(cfg), args.deepspeed_config, random_init)
    cleanup()
    return result


if __name__ == "__main__":
    run_main(main)
