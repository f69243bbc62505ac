"""Weighted k-NN evaluation (k=20, T=0.07, DINO protocol) of a trained encoder.

    python recipes/eval_knn.py encoder=runs/dino data=../shared/data/cifar10
    deepspeed --num_gpus 4 recipes/eval_knn.py encoder=runs/dino/encoder.safetensors data=/data/imagenet

Uses the data's val/ split as queries (or a seeded hold-out of its labelled images) and prints and
writes the result (default ``<encoder dir>/eval_knn.json``).
"""

from __future__ import annotations

import dataclasses
import sys

from genssl.engine.config import parse_config
from genssl.engine.distributed import cleanup, setup_distributed
from genssl.engine.atomic import write_json_atomic
from genssl.engine.evaluate import knn_eval
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


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_config(sys.argv[1:] if argv is None else argv, EvalKNNConfig)
    cfg: EvalKNNConfig = args.config
    path = resolve_encoder_path(cfg.encoder)
    dist = setup_distributed(args.local_rank)
    backbone, meta = load_encoder(path, dist.device)
    data = load_data(cfg.data, cfg.cache_dir, dist)
    result = knn_eval(backbone, data.train, data.val, cfg.eval, dist, cfg.seed, cfg.num_workers)
    if result is None:
        raise ValueError(f"data={cfg.data} has no labels (a flat folder); k-NN needs an ImageFolder with class subfolders")
    if dist.is_main:
        result = {**result, "encoder": str(path), "data": cfg.data, "data_fingerprint": data.train.fingerprint}
        out = cfg.out or str(path.with_name("eval_knn.json"))
        write_json_atomic(out, result)
        print(f"k-NN (k={result['k']}, T={cfg.eval.knn_temperature}): top-1 {result['knn_top1']:.2f} %  "
              f"top-5 {result['knn_top5']:.2f} %  -> {out}")
    cleanup()
    return result


if __name__ == "__main__":
    main()
