"""Config sections shared by every training recipe (the keys every recipe has)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from genssl.engine.config import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
ModelName = Literal["vit_tiny", "vit_small", "vit_base", "resnet18", "resnet50"]


@dataclasses.dataclass
class OptimConfig:
    lr: float = 5e-4  # per 256 images; the run uses lr * global_batch / 256 (DINO's linear scaling)
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # global-norm clipping through DeepSpeed; 0 disables
    betas: tuple[float, float] = (0.9, 0.999)
    freeze_last_layer_epochs: int = 1  # lr 0 for the head's last layer in the first epochs

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0:
            raise ConfigError(f"optim.lr must be > 0 and optim.min_lr >= 0 (got {self.lr}, {self.min_lr})")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0 (got {self.warmup_epochs})")
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


@dataclasses.dataclass
class EvalConfig:
    knn: bool = True
    knn_k: int = 20
    knn_temperature: float = 0.07
    size: int = 224  # eval image side (resize + centre crop)
    batch_size: int = 256
    holdout: float = 0.2  # labelled data without a val/ split: fraction held out as k-NN queries


@dataclasses.dataclass
class TrainConfig:
    """Keys every training recipe has (``key=value``), plus the shared sections."""

    data: str = "builtin:shapes"  # a folder (ImageFolder, flat, or WebDataset .tar shards) or builtin:shapes
    out: str = "runs/dino"
    epochs: int = 100
    batch_size: int = 64  # per rank
    model: ModelName = "vit_small"
    patch_size: int = 16
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
