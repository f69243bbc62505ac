"""Config sections shared by every training recipe (the keys every recipe has)."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Literal

from genssl.engine.config import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
ModelName = Literal["vit_tiny", "vit_small", "vit_base", "resnet18", "resnet50"]


@dataclasses.dataclass
class OptimConfig:
    # adamw: DINO, MoCo v3 ViT; sgd (with momentum): MoCo v2, SimSiam; lars: SimCLR, BYOL, Barlow Twins, SwAV
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = 5e-4  # per 256 images; the run uses lr * global_batch / 256 (DINO's linear scaling)
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # global-norm clipping through DeepSpeed; 0 disables
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    momentum: float = 0.9  # sgd, lars
    lars_eta: float = 0.001  # LARS trust coefficient (engine/lars.py)
    freeze_last_layer_epochs: int = 1  # lr 0 for the head's last layer in the first epochs

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0:
            raise ConfigError(f"optim.lr must be > 0 and optim.min_lr >= 0 (got {self.lr}, {self.min_lr})")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0 (got {self.warmup_epochs})")
        if self.lars_eta <= 0:
            raise ConfigError(f"optim.lars_eta must be > 0 (got {self.lars_eta})")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum must be in [0, 1) (got {self.momentum})")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad must be >= 0 (got {self.clip_grad}); 0 disables clipping")


@dataclasses.dataclass
class EMAConfig:
    momentum: float = 0.996  # teacher momentum, cosine schedule to momentum_end
    momentum_end: float = 1.0

    def validate(self) -> None:
        if not (0.0 <= self.momentum <= 1.0 and 0.0 <= self.momentum_end <= 1.0):
            raise ConfigError(f"ema.momentum and ema.momentum_end must lie in [0, 1] (got {self.momentum}, {self.momentum_end})")


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 500  # also at the end of training; 0 = only at the end
    keep_last: int = 2
    resume: bool = True  # resume from out/checkpoints when present

    def validate(self) -> None:
        if self.every_steps < 0 or self.keep_last < 1:
            raise ConfigError(f"ckpt.every_steps must be >= 0 and ckpt.keep_last >= 1 (got {self.every_steps}, {self.keep_last})")


@dataclasses.dataclass
class LogConfig:
    every_steps: int = 10
    progress: bool = True  # rank-0 progress bar
    # rank 0 also writes TensorBoard event files into the run folder: metrics.jsonl's numbers, eval results,
    # previews (engine/metrics.py); false writes none
    tensorboard: bool = True


@dataclasses.dataclass
class EvalConfig:
    """Frozen-encoder evaluation (engine/evaluate.py): weighted k-NN and a linear probe on the same features."""

    knn: bool = True
    knn_k: int = 20  # DINO's k and T
    knn_temperature: float = 0.07
    linear: bool = True
    linear_epochs: int = 100  # DINO's; the features are cached, so an epoch is one pass over an [N, D] matrix
    # SGD lr at batch linear_batch_size (not rescaled). Features are standardised, so it does not depend on
    # their scale; top-1 moved <= 5 points over lr 0.01-1 on the smoke data (docs/ENGINE.md), 0.1 is mid-range.
    linear_lr: float = 0.1
    linear_batch_size: int = 256  # DINO's reference batch
    linear_weight_decay: float = 0.0  # DINO's
    size: int = 224  # eval image side (resize + centre crop)
    batch_size: int = 256  # feature extraction, per rank
    holdout: float = 0.2  # labelled data without a val/ split: fraction held out as the test rows

    def validate(self) -> None:
        if self.knn_k < 1 or self.knn_temperature <= 0:
            raise ConfigError(f"eval.knn_k must be >= 1 and eval.knn_temperature > 0 (got {self.knn_k}, {self.knn_temperature})")
        if self.linear_epochs < 1 or self.linear_batch_size < 1 or self.linear_lr <= 0 or self.linear_weight_decay < 0:
            raise ConfigError(f"eval.linear_epochs and eval.linear_batch_size must be >= 1, eval.linear_lr > 0, "
                              f"eval.linear_weight_decay >= 0 (got {self.linear_epochs}, {self.linear_batch_size}, "
                              f"{self.linear_lr}, {self.linear_weight_decay})")
        if self.size < 1 or self.batch_size < 1 or not 0 < self.holdout < 1:
            raise ConfigError(f"eval.size and eval.batch_size must be >= 1 and 0 < eval.holdout < 1 "
                              f"(got {self.size}, {self.batch_size}, {self.holdout})")


@dataclasses.dataclass
class TrainConfig:
    """Keys every training recipe has (``key=value``), plus the shared sections."""

    data: str = "builtin:shapes"  # a folder (ImageFolder, flat, or WebDataset .tar shards) or builtin:shapes
    out: str = "runs/dino"
    epochs: int = 100
    batch_size: int = 64  # per rank
    model: ModelName = "vit_small"
    patch_size: int = 16
    stem_stride: int = 4  # ResNets: 4 = ImageNet stem; 1 or 2 = a 3x3 conv stem for small images (models/backbones.py)
    width: int = 64  # ResNets: first-stage channels (stages: width, 2x, 4x, 8x; 64 = timm's); ViTs: leave 64
    # ViTs: "packed" runs all crops of a batch (every resolution) as one token sequence with block-diagonal
    # attention, one backbone pass instead of one per resolution (models/packed_vit.py); ResNets: per_resolution
    multicrop: Literal["per_resolution", "packed"] = "per_resolution"
    # the packed pass's attention kernel: sdpa = torch SDPA with a block mask; xformers = its BlockDiagonalMask
    # (CUDA); auto = xformers when importable and on CUDA, else sdpa
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    zero_stage: int = 0
    precision: Precision = "bf16"
    seed: int = 0
    num_workers: int = 4  # data-loading threads per rank
    on_nonfinite: Literal["skip", "stop"] = "skip"  # a non-finite loss/gradient on any rank
    max_skipped_steps: int = 20  # consecutive skipped steps before stopping anyway
    cache_dir: str = ""  # index / built-in data cache; default $GENSSL_CACHE or ~/.cache/genssl
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    ckpt: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage={self.zero_stage} is not valid; choose one of: 0, 1, 2, 3")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1 (got epochs={self.epochs}, batch_size={self.batch_size})")
        if self.patch_size < 1:
            raise ConfigError(f"patch_size must be >= 1 (got {self.patch_size})")
        if self.width < 8:
            raise ConfigError(f"width (a ResNet's first-stage channels) must be >= 8, got {self.width}")
        resnet_keys = [f"{k}={v}" for k, v, default in (("stem_stride", self.stem_stride, 4), ("width", self.width, 64))
                       if v != default]
        if self.model.startswith("vit_") and resnet_keys:
            raise ConfigError(f"model={self.model} is a ViT, but ResNet settings are set ({' '.join(resnet_keys)}, by the "
                              "preset or the command line); add stem_stride=4 width=64, or choose a ResNet")
        if self.multicrop == "packed" and not self.model.startswith("vit_"):
            raise ConfigError(f"multicrop=packed packs ViT tokens, but model={self.model}; use multicrop=per_resolution "
                              "with a ResNet, or a vit_* model")
        if self.attention == "xformers" and self.multicrop != "packed":
            raise ConfigError("attention=xformers is the kernel of the packed multi-crop pass; set multicrop=packed too "
                              "(the per-resolution ViT uses timm's SDPA)")
        if self.attention == "xformers" and importlib.util.find_spec("xformers") is None:
            raise ConfigError("attention=xformers but xformers is not installed; pip install --no-deps xformers "
                              "(it must not replace torch), or use attention=auto / attention=sdpa")
