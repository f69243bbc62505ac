"""The base self-supervised methods (docs/METHODS.md §5), then k-NN and linear probe of the encoder and of its random init.

    deepspeed recipes/ssl_methods.py method=simclr                        # CPU-sized run on builtin:shapes
    deepspeed recipes/ssl_methods.py method=byol preset=imagenet data=/data/imagenet out=runs/byol_r50
    deepspeed --num_gpus 8 recipes/ssl_methods.py method=swav zero_stage=2 data=/my/images

``method=simclr|mocov2|mocov3|byol|simsiam|barlow|swav``; each method's head and loss settings are
the section of its name (``simclr.temperature=0.2``, ``mocov2.queue_size=4096``). Presets are per
method: ``preset=smoke`` (the default, a few minutes on 2 CPU cores), ``preset=cpu`` (the same for
10,000 32 px photos, bench/learning.py) and ``preset=imagenet`` (the paper's setting, cited beside each). DINO keeps recipes/dino.py.

Writes into ``out=`` what recipes/dino.py writes: config.yaml, metrics.jsonl, checkpoints/,
encoder.safetensors + encoder.json (the student's backbone), eval.json (with the random-init floor
under "random_init"). Rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal

import torch
import yaml

from genssl.data.augment import MultiCropSpec
from genssl.engine import pretrain
from genssl.engine.cli import run_main
from genssl.engine.config import ConfigError, parse_config
from genssl.engine.distributed import cleanup, setup_distributed
from genssl.engine.run_config import TrainConfig
from genssl.engine.setup import load_data, train_loader
from genssl.engine.trainer import compute_dtype
from genssl.models import barlow, byol, mocov2, mocov3, simclr, simsiam, swav
from genssl.models.backbones import build_backbone
from genssl.models.packed_vit import set_multicrop
from genssl.models.qdc import set_quality_scorer

# method -> (its student builder, its objective class): docs/METHODS.md §5
METHODS = {
    "simclr": (simclr.build_simclr_student, simclr.SimCLRObjective),
    "mocov2": (mocov2.build_mocov2_student, mocov2.MoCoV2Objective),
    "mocov3": (mocov3.build_mocov3_student, mocov3.MoCoV3Objective),
    "byol": (byol.build_byol_student, byol.BYOLObjective),
    "simsiam": (simsiam.build_simsiam_student, simsiam.SimSiamObjective),
    "barlow": (barlow.build_barlow_student, barlow.BarlowObjective),
    "swav": (swav.build_swav_student, swav.SwAVObjective),
}
Method = Literal["simclr", "mocov2", "mocov3", "byol", "simsiam", "barlow", "swav"]
NAMES = {"simclr": "SimCLR", "mocov2": "MoCo v2", "mocov3": "MoCo v3", "byol": "BYOL", "simsiam": "SimSiam",
         "barlow": "Barlow Twins", "swav": "SwAV"}  # how tables print them


@dataclasses.dataclass
class SSLRecipeConfig(TrainConfig):
    out: str = "runs/ssl"
    method: Method = "simclr"
    crops: MultiCropSpec = dataclasses.field(default_factory=lambda: MultiCropSpec(n_local=0))
    simclr: simclr.SimCLRConfig = dataclasses.field(default_factory=simclr.SimCLRConfig)
    mocov2: mocov2.MoCoV2Config = dataclasses.field(default_factory=mocov2.MoCoV2Config)
    mocov3: mocov3.MoCoV3Config = dataclasses.field(default_factory=mocov3.MoCoV3Config)
    byol: byol.BYOLConfig = dataclasses.field(default_factory=byol.BYOLConfig)
    simsiam: simsiam.SimSiamConfig = dataclasses.field(default_factory=simsiam.SimSiamConfig)
    barlow: barlow.BarlowConfig = dataclasses.field(default_factory=barlow.BarlowConfig)
    swav: swav.SwAVConfig = dataclasses.field(default_factory=swav.SwAVConfig)


def initial_student(cfg: SSLRecipeConfig):
    """The randomly initialised student (seeded: the same on every rank and run)."""
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.model, img_size=cfg.crops.global_size,
                              patch_size=cfg.patch_size if cfg.model.startswith("vit") else None,
                              stem_stride=cfg.stem_stride, width=cfg.width)
    build_student, _ = METHODS[cfg.method]
    return set_multicrop(build_student(backbone, getattr(cfg, cfg.method)), cfg.multicrop, cfg.attention)


def method_objective(cfg: SSLRecipeConfig, student):
    _, objective = METHODS[cfg.method]
    return objective(student, getattr(cfg, cfg.method), cfg.crops.n_global, cfg.epochs, compute_dtype(cfg.precision))


# ---------------------------------------------------------------------------------------------
# presets: per method, CPU-sized ("smoke") and the paper's ImageNet ResNet-50 setting ("imagenet")

# Shared by every method's CPU-sized preset: the DINO smoke setting's data, backbone and crops
# (recipes/dino.py, docs/LEARNING.md), two 32 px views, AdamW.
_SMOKE = {
    "data": "builtin:shapes?size=32&per_class=100&val_per_class=50",
    "model": "resnet18", "stem_stride": 2, "width": 32, "epochs": 6, "batch_size": 32, "precision": "fp32",
    "num_workers": 2,
    "crops": {"global_size": 32, "local_size": 16, "n_local": 0, "global_scale": [0.2, 1.0]},
    "optim": {"lr": 2e-3, "warmup_epochs": 1, "weight_decay": 1e-4, "weight_decay_end": 1e-4,
              "freeze_last_layer_epochs": 0},
    "ckpt": {"every_steps": 50}, "log": {"every_steps": 5}, "eval": {"size": 32},
}
_SMALL_HEADS = {
    "simclr": {"hidden_dim": 512, "out_dim": 128, "temperature": 0.5},  # 0.5: the paper's CIFAR-10 value
    # the queue stays well below the data set (1,200 images): older keys of the same image are no negatives
    "mocov2": {"hidden_dim": 512, "out_dim": 128, "queue_size": 512, "shuffle_bn_groups": 4},
    "mocov3": {"hidden_dim": 512, "out_dim": 128},
    "byol": {"hidden_dim": 512, "out_dim": 128, "predictor_hidden_dim": 512},
    "simsiam": {"hidden_dim": 512, "out_dim": 512, "predictor_hidden_dim": 128},
    "barlow": {"hidden_dim": 512, "out_dim": 512},
    "swav": {"hidden_dim": 512, "out_dim": 128, "n_prototypes": 100},
}
# EMA momentum of the momentum encoder over a few hundred steps (the papers' 0.99-0.999 are for 100k+ steps).
_SMOKE_EMA = {"mocov2": {"momentum": 0.99, "momentum_end": 0.99}, "mocov3": {"momentum": 0.99, "momentum_end": 1.0},
              "byol": {"momentum": 0.99, "momentum_end": 1.0}}


def smoke_preset(method: str) -> dict:
    preset = {**_SMOKE, method: _SMALL_HEADS[method]}
    if method in _SMOKE_EMA:
        preset["ema"] = _SMOKE_EMA[method]
    if method == "swav":  # SwAV is multi-crop: 2 global + local crops (docs/METHODS.md §5.7)
        preset["crops"] = {**_SMOKE["crops"], "n_local": 2, "local_scale": [0.1, 0.3]}
    return preset


# The papers' ImageNet settings: epochs, batch (per rank, for 8 GPUs: the paper's global batch / 8),
# optimizer, lr per 256 images (the engine scales it by global batch / 256, cosine), weight decay, EMA
# momentum, crops. Sources per method in docs/METHODS.md §5. ResNet-50 for all but MoCo v3 (ViT-S/16).
_R50 = {"model": "resnet50", "stem_stride": 4, "precision": "bf16", "eval": {"size": 224},
        "crops": {"global_size": 224, "n_local": 0, "global_scale": [0.08, 1.0]}}


def _sgd(lr: float, wd: float, warmup: float = 0, name: str = "sgd") -> dict:
    return {"name": name, "lr": lr, "min_lr": 0.0, "weight_decay": wd, "weight_decay_end": wd, "warmup_epochs": warmup,
            "clip_grad": 0.0, "freeze_last_layer_epochs": 0}


def _lars(lr: float, wd: float, warmup: float = 0) -> dict:
    return _sgd(lr, wd, warmup, name="lars")


_IMAGENET = {
    "simclr": {**_R50, "epochs": 100, "batch_size": 512, "optim": _lars(0.3, 1e-6, 10)},
    "mocov2": {**_R50, "epochs": 200, "batch_size": 32, "optim": _sgd(0.03, 1e-4),
               "crops": {**_R50["crops"], "global_scale": [0.2, 1.0]}, "ema": {"momentum": 0.999, "momentum_end": 0.999}},
    "mocov3": {"model": "vit_small", "patch_size": 16, "precision": "bf16", "epochs": 300, "batch_size": 512,
               "crops": {"global_size": 224, "n_local": 0, "global_scale": [0.08, 1.0]}, "eval": {"size": 224},
               "optim": {"name": "adamw", "lr": 1.5e-4, "min_lr": 0.0, "weight_decay": 0.1, "weight_decay_end": 0.1,
                         "warmup_epochs": 40, "clip_grad": 0.0, "freeze_last_layer_epochs": 0},
               "ema": {"momentum": 0.99, "momentum_end": 1.0},
               "mocov3": {"proj_layers": 3, "pred_last_bn": True, "temperature": 0.2}},  # the ViT head (official CONFIG.md)
    "byol": {**_R50, "epochs": 300, "batch_size": 512, "optim": _lars(0.2, 1.5e-6, 10),
             "ema": {"momentum": 0.99, "momentum_end": 1.0}},  # 0.99 at 300 epochs, 0.996 at 1000 (official configs)
    "simsiam": {**_R50, "epochs": 100, "batch_size": 64, "optim": _sgd(0.05, 1e-4), "crops": {**_R50["crops"], "global_scale": [0.2, 1.0]}},
    "barlow": {**_R50, "epochs": 300, "batch_size": 256, "optim": _lars(0.2, 1.5e-6, 10)},
    "swav": {**_R50, "epochs": 100, "batch_size": 512, "optim": _lars(0.3, 1e-6),
             "crops": {"global_size": 224, "local_size": 96, "n_global": 2, "n_local": 6, "global_scale": [0.14, 1.0],
                       "local_scale": [0.05, 0.14]}},
}


def presets_for(method: str) -> dict[str, dict]:
    # cpu: the smoke settings for 10,000 32x32 photos on 2 CPU cores, as recipes/dino.py's (bench/learning.py)
    cpu = {**smoke_preset(method), "data": "builtin:shapes?size=32", "epochs": 20,
           "ckpt": {"every_steps": 500}, "log": {"every_steps": 10}}
    return {"smoke": smoke_preset(method), "cpu": cpu, "imagenet": _IMAGENET[method]}


def method_of(argv: list[str], default: str = SSLRecipeConfig.method, choices=tuple(METHODS)) -> str:
    """``method=`` of the command line (the last one wins), else of ``config=FILE``, else ``default``.

    The presets depend on the method, so it is read before the full parse.
    """
    method = default
    for key, _, value in (token.partition("=") for token in argv):
        if key.strip() == "config" and Path(value.strip()).is_file():
            method = (yaml.safe_load(Path(value.strip()).read_text()) or {}).get("method", method)
    for key, _, value in (token.partition("=") for token in argv):
        method = value.strip() if key.strip() == "method" else method
    if method not in choices:
        raise ConfigError(f"method={method!r} is not valid; choose one of: {', '.join(choices)}")
    return method


def train_ssl(cfg: SSLRecipeConfig, dist, data, loader, deepspeed_config: str | None = None,
              random_init: dict | None = None, quality_scorer=None) -> dict:
    """Pretrain ``cfg.method`` on ``loader``, export and evaluate the student's backbone (every rank);
    ``quality_scorer`` weights the pairs (GenView's QDC, models/qdc.py; None: unweighted)."""
    student = initial_student(cfg)
    objective = method_objective(cfg, student)
    set_quality_scorer(objective, quality_scorer)
    fixed_lr = objective.fixed_lr_parameters(student) if hasattr(objective, "fixed_lr_parameters") else []
    return pretrain.pretrain(cfg, dist, data, loader, student, objective, pretrain.student_backbone, deepspeed_config,
                             random_init, late_params=objective.late_parameters(student), fixed_lr_params=fixed_lr)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_config(argv, SSLRecipeConfig, presets_for(method_of(argv)), default_preset="smoke")
    cfg: SSLRecipeConfig = args.config
    dist = setup_distributed(args.local_rank)
    data = load_data(cfg.data, cfg.cache_dir, dist)
    loader = train_loader(data.train, cfg.crops, cfg, dist)
    random_init = pretrain.evaluate_random_init(lambda: initial_student(cfg), cfg, dist, data)
    result = train_ssl(cfg, dist, data, loader, args.deepspeed_config, random_init)
    cleanup()
    return result


if __name__ == "__main__":
    run_main(main)
