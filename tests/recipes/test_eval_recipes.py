"""recipes/eval_knn.py and recipes/eval_linear.py on a saved encoder: one rank and two ranks agree.

The encoder is a randomly initialised ResNet-18 saved as a training run would save it (its recorded
crops.mean / crops.std are not ImageNet's, as in a run with its own normalisation).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from genssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from genssl.engine.config import parse_config
from genssl.engine.evaluate import RESULT_KEYS
from genssl.engine.export import save_encoder
from genssl.models.backbones import build_backbone
from genssl.recipes.eval_knn import EvalKNNConfig, training_normalisation
from genssl.recipes.eval_linear import EvalLinearConfig
from genssl.tests.helpers import assert_accuracies, run_recipe

TINY_DATA = "builtin:shapes?size=32&per_class=8&val_per_class=4"
ARGS = [f"data={TINY_DATA}", "eval.size=32", "eval.batch_size=32", "num_workers=1"]


def _run(cmd: list[str]) -> str:
    return run_recipe(cmd, timeout=300)


@pytest.mark.slow
def test_eval_recipes_write_knn_and_linear_and_two_ranks_agree_with_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_encoder(build_backbone("resnet18", img_size=32), tmp_path,
                 {"crops": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})

    out = _run([sys.executable, "recipes/eval_knn.py", f"encoder={tmp_path}", *ARGS])
    one = json.loads((tmp_path / "eval_knn.json").read_text())
    assert set(one) >= set(RESULT_KEYS) and "reason" not in one
    assert all(one[key] is not None for key in RESULT_KEYS), one
    assert_accuracies(one, n_test=48)
    assert (one["n_train"], one["n_test"], one["knn_k"], one["linear_epochs"]) == (96, 48, 20, 100)
    assert "k-NN (k=20, T=0.07) top-1" in out and "linear (100 epochs) top-1" in out

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    _run([torchrun, "--nproc_per_node", "2", "--master_port", "29637", "recipes/eval_knn.py", f"encoder={tmp_path}",
          *ARGS, f"out={tmp_path / 'two_ranks.json'}"])
    two = json.loads((tmp_path / "two_ranks.json").read_text())
    for key in RESULT_KEYS:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key

    _run([sys.executable, "recipes/eval_linear.py", f"encoder={tmp_path}", *ARGS])
    linear = json.loads((tmp_path / "eval_linear.json").read_text())
    assert linear["knn_top1"] is None and linear["knn_k"] is None
    assert (linear["linear_top1"], linear["linear_top5"]) == (one["linear_top1"], one["linear_top5"])


def test_the_normalisation_comes_from_the_encoders_training_config() -> None:
    meta = {"config": {"crops": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.1]}}}
    assert training_normalisation(meta) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.1))
    assert training_normalisation({"config": {}}) == (IMAGENET_MEAN, IMAGENET_STD)  # not recorded: the default


def test_bad_eval_settings_stop_before_any_work() -> None:
    with pytest.raises(ValueError, match="eval.linear_lr > 0"):
        parse_config(["encoder=runs/x", "eval.linear_lr=0"], EvalKNNConfig)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        parse_config(["encoder=runs/x", "eval.linear=false"], EvalLinearConfig)  # k-NN is off there already
