"""Config front door: presets, overrides, launcher flags, DeepSpeed JSON, and errors that name the key."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from genssl.engine.config import ConfigError, parse_config, to_dict, write_config
from genssl.engine.distributed import DistInfo
from genssl.engine.trainer import deepspeed_config
from genssl.recipes.dino import PRESETS, DINORecipeConfig

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def parse(*argv: str):
    return parse_config(list(argv), DINORecipeConfig, PRESETS)


def test_defaults_presets_and_overrides_in_order() -> None:
    cfg = parse().config
    assert cfg.model == "vit_small" and cfg.crops.global_size == 224 and cfg.dino.out_dim == 65536
    cfg = parse("preset=smoke", "epochs=3", "optim.lr=2e-3", "crops.global_scale=0.3,1.0", "precision=bf16").config
    assert cfg.model == "resnet18" and cfg.epochs == 3 and cfg.optim.lr == 2e-3
    assert cfg.crops.global_scale == (0.3, 1.0) and cfg.precision == "bf16"
    # A key given before the preset still wins: presets are applied first.
    assert parse("epochs=7", "preset=imagenet").config.epochs == 7


def test_imagenet_preset_holds_the_dino_vits16_reference() -> None:
    cfg = parse("preset=imagenet").config
    assert (cfg.model, cfg.patch_size, cfg.epochs) == ("vit_small", 16, 100)
    assert (cfg.crops.n_global, cfg.crops.global_size, cfg.crops.n_local, cfg.crops.local_size) == (2, 224, 8, 96)
    assert (cfg.dino.out_dim, cfg.dino.bottleneck_dim, cfg.dino.norm_last_layer) == (65536, 256, True)
    assert (cfg.dino.student_temp, cfg.dino.teacher_temp, cfg.dino.center_momentum) == (0.1, 0.04, 0.9)
    assert (cfg.ema.momentum, cfg.ema.momentum_end, cfg.optim.lr, cfg.optim.min_lr) == (0.996, 1.0, 5e-4, 1e-6)
    assert (cfg.optim.warmup_epochs, cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.clip_grad) == (10, 0.04, 0.4, 3.0)


def test_launcher_flags_are_tolerated(tmp_path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    args = parse("--local_rank=1", "epochs=2", "--deepspeed_config", str(ds), "--local_rank", "3")
    assert args.local_rank == 3 and args.deepspeed_config == str(ds) and args.config.epochs == 2


@pytest.mark.parametrize("argv, message", [
    (["epoch=3"], "unknown key 'epoch'"),
    (["epoch=3"], "Did you mean 'epochs'"),
    (["optim.lrr=1"], "section 'optim' has no key 'lrr'"),
    (["model=vit_huge"], "choose one of: vit_tiny, vit_small, vit_base, resnet18, resnet50"),
    (["precision=fp8"], "choose one of: fp32, bf16, fp16"),
    (["zero_stage=4"], "zero_stage=4 is not valid; choose one of: 0, 1, 2, 3"),
    (["epochs=ten"], "epochs='ten': expected an integer"),
    (["preset=huge"], "choose one of: cifar, imagenet, smoke"),
    (["crops.global_scale=0.5"], "expected 2 comma-separated values"),
    (["optim=3"], "'optim' is a section"),
    (["epochs"], "write settings as key=value"),
    (["--epochs=3"], "unknown option '--epochs=3'"),
    (["crops.n_global=0"], "n_global must be >= 1"),
    (["--deepspeed_config", "/nonexistent.json"], "no such file"),
])
def test_bad_input_fails_before_any_work_naming_the_key(argv, message) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        parse(*argv)
    assert message in str(err.value)


def test_resolved_config_round_trips_through_yaml(tmp_path) -> None:
    cfg = parse("preset=cifar", "seed=5").config
    write_config(cfg, str(tmp_path / "config.yaml"))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(cfg)
    again = parse(f"config={tmp_path / 'config.yaml'}").config
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_deepspeed_json_is_layered_over_our_settings(tmp_path) -> None:
    cfg = parse("preset=smoke", "zero_stage=1").config
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 3, "overlap_comm": True},
                                "bf16": {"enabled": True}}))
    ds = deepspeed_config(cfg, CPU, str(user))
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert (cfg.batch_size, cfg.zero_stage, cfg.precision) == (16, 3, "bf16")  # the run follows the file
    assert ds["gradient_clipping"] == cfg.optim.clip_grad
    user.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match="remove the 'scheduler' block"):
        deepspeed_config(cfg, CPU, str(user))


def test_fp16_on_cpu_is_refused_with_the_alternative() -> None:
    cfg = parse("preset=smoke", "precision=fp16").config
    with pytest.raises(ConfigError, match="use precision=bf16 or fp32"):
        deepspeed_config(cfg, CPU)
