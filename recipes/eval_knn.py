"""k-NN (k=20, T=0.07, DINO protocol) and linear probe of a trained encoder (engine/evaluate.py).

    python recipes/eval_knn.py encoder=runs/dino data=../shared/data/cifar10
    deepspeed --num_gpus 4 recipes/eval_knn.py encoder=runs/dino/encoder.safetensors data=/data/imagenet
    python recipes/eval_knn.py encoder=runs/dino eval.linear=false      # k-NN only

Scores the data's val/ split (or a seeded hold-out of its labelled images) with the images normalised
as the encoder was trained (``crops.mean`` / ``crops.std`` in its encoder.json), and prints and writes
the result (default ``<encoder dir>/eval_knn.json``; the same keys as a training run's eval.json).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from genssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from genssl.engine.cli import run_main
from genssl.engine.config import parse_config
from genssl.engine.distributed import cleanup, setup_distributed
from genssl.engine.atomic import write_json_atomic
from genssl.engine.evaluate import describe, evaluate_encoder
from genssl.engine.export import load_encoder, resolve_encoder_path
from genssl.engine.run_config import EvalConfig
from genssl.engine.setup import load_data


@dataclasses.dataclass
class EvalKNNConfig:
    encoder: str = ""  # a run directory or its encoder.safetensors
    data: str = "builtin:shapes"
    out: str = ""  # result file; default <encoder dir>/eval_knn.json
    seed: int = 0
    num_workers: int = 2
    cache_dir: str = ""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> None:
        if not self.encoder:
            raise ValueError("encoder= is required: a finished run directory or its encoder.safetensors")
        if not (self.eval.knn or self.eval.linear):
            raise ValueError("eval.knn=false and eval.linear=false leave nothing to evaluate; turn one on")


def training_normalisation(meta: dict) -> tuple[Sequence[float], Sequence[float]]:
    """The (mean, std) the encoder was trained with: its recipe's ``crops.mean`` / ``crops.std`` in
    encoder.json, else ImageNet's (the `MultiCropSpec` defaults)."""
    crops = meta.get("config", {}).get("crops", {})
    return tuple(crops.get("mean", IMAGENET_MEAN)), tuple(crops.get("std", IMAGENET_STD))


def evaluate_saved_encoder(cfg: EvalKNNConfig, local_rank: int | None, default_name: str) -> dict:
    """Load ``cfg.encoder``, evaluate it on ``cfg.data``, write ``cfg.out`` (default ``<encoder dir>/default_name``)."""
    path = resolve_encoder_path(cfg.encoder)
    dist = setup_distributed(local_rank)
    backbone, meta = load_encoder(path, dist.device)
    data = load_data(cfg.data, cfg.cache_dir, dist)
    mean, std = training_normalisation(meta)
    result = evaluate_encoder(backbone, data.train, data.val, cfg.eval, dist, cfg.seed, cfg.num_workers, mean, std)
    if result.get("reason"):
        raise ValueError(f"data={cfg.data} has no labels (a flat folder); k-NN and the linear probe need an "
                         "ImageFolder with class subfolders")
    result = {**result, "encoder": str(path), "data": cfg.data, "data_fingerprint": data.train.fingerprint}
    if dist.is_main:
        out = cfg.out or str(path.with_name(default_name))
        write_json_atomic(out, result)
        print(f"{describe(result)}  -> {out}", flush=True)
    cleanup()
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_config(sys.argv[1:] if argv is None else argv, EvalKNNConfig)
    cfg: EvalKNNConfig = args.config
    return evaluate_saved_encoder(cfg, args.local_rank, "eval_knn.json")


if __name__ == "__main__":
    run_main(main)
