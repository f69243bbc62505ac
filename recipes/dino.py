"""DINO pretraining (Caron et al. 2021), then a k-NN evaluation of the teacher's backbone.

    deepspeed recipes/dino.py                               # CPU-sized run on builtin:shapes
    deepspeed recipes/dino.py preset=imagenet data=/data/imagenet out=runs/dino_vits16
    deepspeed --num_gpus 8 recipes/dino.py preset=cifar data=../shared/data/cifar10 zero_stage=2

Writes into ``out=``: config.yaml, metrics.jsonl, checkpoints/, encoder.safetensors + encoder.json,
eval.json. Rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from genssl.data.augment import MultiCropSpec
from genssl.engine.config import parse_config, to_dict
from genssl.engine.distributed import barrier, cleanup, setup_distributed
from genssl.engine.atomic import write_json_atomic
from genssl.engine.evaluate import knn_eval
from genssl.engine.export import save_encoder
from genssl.engine.run_config import TrainConfig
from genssl.engine.setup import load_data, train_loader
from genssl.engine.trainer import compute_dtype, fit
from genssl.models.objectives import DINOConfig, DINOObjective, build_dino_student


@dataclasses.dataclass
class DINORecipeConfig(TrainConfig):
    out: str = "runs/dino"
    crops: MultiCropSpec = dataclasses.field(default_factory=MultiCropSpec)
    dino: DINOConfig = dataclasses.field(default_factory=DINOConfig)


# CPU-sized: a few minutes on 2 cores, k-NN well above chance on builtin:shapes. The default preset.
# ResNet-18: over a few hundred CPU steps it gives clearly better k-NN than a ViT (docs/ENGINE.md).
SMOKE = {
    "model": "resnet18", "epochs": 6, "batch_size": 64, "precision": "fp32", "num_workers": 2,
    "crops": {"global_size": 48, "local_size": 24, "n_local": 4, "global_scale": [0.5, 1.0], "local_scale": [0.2, 0.5]},
    "dino": {"out_dim": 4096, "hidden_dim": 256, "bottleneck_dim": 64, "drop_path_rate": 0.0},
    "optim": {"lr": 5e-4, "warmup_epochs": 1, "weight_decay_end": 0.1},
    "ema": {"momentum": 0.996}, "ckpt": {"every_steps": 50}, "log": {"every_steps": 5}, "eval": {"size": 48},
}
PRESETS = {
    "smoke": SMOKE,
    # 32x32 images (CIFAR-10 style): ViT-Tiny/4, 2x32 + 6x16 crops.
    "cifar": {
        "model": "vit_tiny", "patch_size": 4, "epochs": 100, "batch_size": 256, "precision": "bf16",
        "crops": {"global_size": 32, "local_size": 16, "n_local": 6, "global_scale": [0.4, 1.0], "local_scale": [0.1, 0.4]},
        "dino": {"out_dim": 4096, "hidden_dim": 1024, "bottleneck_dim": 256},
        "optim": {"lr": 5e-4, "warmup_epochs": 10}, "eval": {"size": 32},
    },
    # The DINO ViT-S/16 reference settings (METHODS.md §1.1).
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


def train_dino(cfg: DINORecipeConfig, dist, data, loader, make_objective, deepspeed_config: str | None = None) -> dict | None:
    """Pretrain with ``make_objective(student)``, export the teacher backbone, run k-NN; every rank calls it.

    Returns the k-NN result (None for unlabelled data). Gen-DINO reuses it with its own loader and objective.
    """
    torch.manual_seed(cfg.seed)
    student = build_dino_student(cfg.model, cfg.crops.global_size, cfg.patch_size, cfg.dino)
    objective = make_objective(student)
    fit(cfg, dist, student, objective, loader, cfg.out, deepspeed_config, late_params=student.head.last_layer_parameters())

    teacher_backbone = objective.teacher.module.backbone
    result = knn_eval(teacher_backbone, data.train, data.val, cfg.eval, dist, cfg.seed, cfg.num_workers) if cfg.eval.knn else None
    if dist.is_main:
        save_encoder(teacher_backbone, cfg.out, to_dict(cfg), data.train.fingerprint)
        write_json_atomic(f"{cfg.out}/eval.json", result or {"knn": None, "reason": "no labels in the data"})
        print(f"k-NN (k={cfg.eval.knn_k}) on {cfg.data}: " + (
            f"top-1 {result['knn_top1']:.2f} %  top-5 {result['knn_top5']:.2f} %" if result else "skipped (unlabelled data)"))
        print(f"wrote {cfg.out}/encoder.safetensors and {cfg.out}/eval.json", flush=True)
    barrier()
    return result


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if not any(a.startswith("preset=") for a in argv):
        argv = ["preset=smoke", *argv]
    args = parse_config(argv, DINORecipeConfig, PRESETS)
    cfg: DINORecipeConfig = args.config
    dist = setup_distributed(args.local_rank)
    data = load_data(cfg.data, cfg.cache_dir, dist)
    loader = train_loader(data.train, cfg.crops, cfg, dist)
    result = train_dino(cfg, dist, data, loader, dino_objective(cfg), args.deepspeed_config)
    cleanup()
    return result


if __name__ == "__main__":
    main()
