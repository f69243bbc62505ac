"""Linear probe (DINO's eval_linear.py protocol on cached features, engine/linear.py) of a trained encoder.

    python recipes/eval_linear.py encoder=runs/dino data=../shared/data/cifar10
    python recipes/eval_linear.py encoder=runs/dino eval.linear_epochs=200 eval.linear_lr=0.03
    deepspeed --num_gpus 4 recipes/eval_linear.py encoder=runs/dino/encoder.safetensors data=/data/imagenet

recipes/eval_knn.py with k-NN off by default (``eval.knn=true`` adds it; the features are extracted
once either way). Writes ``<encoder dir>/eval_linear.json`` unless ``out=`` says otherwise.
"""

from __future__ import annotations

import dataclasses

from genssl.engine.cli import run_main
from genssl.engine.config import parse_config
from genssl.engine.run_config import EvalConfig
from genssl.recipes.eval_knn import EvalKNNConfig, evaluate_saved_encoder


@dataclasses.dataclass
class EvalLinearConfig(EvalKNNConfig):
    out: str = ""  # result file; default <encoder dir>/eval_linear.json
    eval: EvalConfig = dataclasses.field(default_factory=lambda: EvalConfig(knn=False))


def main(argv: list[str] | None = None) -> dict:
    args = parse_config(argv, EvalLinearConfig)
    return evaluate_saved_encoder(args.config, args.local_rank, "eval_linear.json")


if __name__ == "__main__":
    run_main(main)
