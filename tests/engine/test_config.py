"""Config front door: presets, config files and their precedence, overrides, launcher flags, DeepSpeed JSON,
and errors that name the key."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from genssl.engine.config import ConfigError, parse_config, presets_in_effect, to_dict, write_config
from genssl.engine.distributed import DistInfo
from genssl.engine.trainer import deepspeed_config
from genssl.recipes import autoencoder as ae_recipe
from genssl.recipes.dino import PRESETS, DINORecipeConfig
from genssl.recipes.dino_gensis import PRESETS as GENSIS_PRESETS, GenSISConfig
from genssl.recipes.eldm import PRESETS as ELDM_PRESETS, ELDMRecipeConfig
from genssl.recipes.eldm import presets as eldm_presets

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
    (["preset=huge"], "choose one of: cifar, cpu, imagenet, smoke"),
    (["crops.global_scale=0.5"], "expected 2 comma-separated values"),
    (["optim=3"], "'optim' is a section"),
    (["epochs"], "write settings as key=value"),
    (["--epochs=3"], "unknown option '--epochs=3'"),
    (["crops.n_global=0"], "n_global must be >= 1"),
    (["preset=smoke", "model=vit_tiny"], "ResNet settings are set (stem_stride=2 width=32, by the preset"),
    (["width=4"], "width (a ResNet's first-stage channels) must be >= 8"),
    (["--deepspeed_config", "/nonexistent.json"], "no such file"),
])
def test_bad_input_fails_before_any_work_naming_the_key(argv, message) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        parse(*argv)
    assert message in str(err.value)


@pytest.mark.parametrize("cls, presets", [(DINORecipeConfig, PRESETS), (GenSISConfig, GENSIS_PRESETS)],
                         ids=["dino", "dino_gensis"])
def test_a_runs_config_yaml_given_back_reproduces_it_exactly(tmp_path, cls, presets) -> None:
    cfg = parse_config(["preset=imagenet", "seed=5", "optim.lr=1e-3"], cls, presets, default_preset="smoke").config
    path = tmp_path / "config.yaml"
    write_config(cfg, str(path))
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)
    # What the recipe's main() does with `config=FILE` alone: no default preset under a resolved config.
    again = parse_config([f"config={path}"], cls, presets, default_preset="smoke").config
    assert to_dict(again) == to_dict(cfg)
    # Precedence: defaults < preset < config=FILE < command-line keys, whatever the order of the tokens.
    again = parse_config([f"config={path}", "preset=smoke"], cls, presets, default_preset="smoke").config
    assert to_dict(again) == to_dict(cfg)
    again = parse_config(["epochs=3", f"config={path}", "crops.n_local=2"], cls, presets, default_preset="smoke").config
    assert (again.epochs, again.crops.n_local) == (3, 2)
    assert to_dict(again) == {**to_dict(cfg), "epochs": 3, "crops": {**to_dict(cfg.crops), "n_local": 2}}


def test_the_default_preset_applies_only_without_preset_and_config() -> None:
    assert presets_in_effect([], "smoke") == ["smoke"]
    assert presets_in_effect(["epochs=3", "preset=cifar"], "smoke") == ["cifar"]
    assert presets_in_effect(["config=run/config.yaml", "epochs=3"], "smoke") == []
    assert presets_in_effect(["config=run/config.yaml", "preset=cifar"], "smoke") == ["cifar"]
    assert presets_in_effect([], None) == []
    assert parse_config([], DINORecipeConfig, PRESETS, default_preset="smoke").config.model == "resnet18"


def test_generator_recipes_reproduce_a_runs_config_yaml(tmp_path) -> None:
    # recipes/autoencoder.py and recipes/eldm.py apply their default preset through parse_config.
    cfg = parse_config(["preset=imagenet", "seed=3"], ELDMRecipeConfig, ELDM_PRESETS, default_preset="smoke").config
    path = tmp_path / "config.yaml"
    write_config(cfg, str(path))
    again = parse_config([f"config={path}"], ELDMRecipeConfig, ELDM_PRESETS, default_preset="smoke").config
    assert to_dict(again) == to_dict(cfg)
    assert parse_config(["epochs=2"], ELDMRecipeConfig, ELDM_PRESETS, default_preset="smoke").config.eldm.image_size == 32


def test_generator_smoke_presets_train_in_bf16_on_cuda_only() -> None:
    on_gpu = parse_config([], ELDMRecipeConfig, eldm_presets(cuda=True), default_preset="smoke").config
    assert (on_gpu.precision, on_gpu.ae.precision) == ("bf16", "bf16")
    on_cpu = parse_config([], ELDMRecipeConfig, eldm_presets(cuda=False), default_preset="smoke").config
    assert (on_cpu.precision, on_cpu.ae.precision) == ("fp32", "fp32")
    cfg = parse_config(["precision=fp32"], ELDMRecipeConfig, eldm_presets(cuda=True), default_preset="smoke").config
    assert (cfg.precision, cfg.ae.precision) == ("fp32", "bf16")  # each key its own model's
    ae = parse_config([], ae_recipe.AutoencoderRecipeConfig, ae_recipe.presets(cuda=True), default_preset="smoke").config
    assert ae.precision == "bf16" and ae_recipe.PRESETS["smoke"]["precision"] == "fp32"


def test_deepspeed_json_tunes_deepspeed_and_never_changes_the_run(tmp_path) -> None:
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e7,
                                                      "offload_optimizer": {"device": "cpu"}},
                                "fp16": {"initial_scale_power": 12}, "wall_clock_breakdown": True}))
    cfg = parse("preset=smoke", "zero_stage=1", "--deepspeed_config", str(user)).config
    before = to_dict(cfg)
    ds = deepspeed_config(cfg, CPU, str(user))
    assert to_dict(cfg) == before  # config.yaml, the loader and the lr scaling were built from these values
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 5e7,
                                       "offload_optimizer": {"device": "cpu"}}
    assert ds["train_micro_batch_size_per_gpu"] == cfg.batch_size and ds["bf16"] == {"enabled": False}
    assert ds["fp16"]["initial_scale_power"] == 12 and not ds["fp16"]["enabled"] and ds["wall_clock_breakdown"]
    assert ds["gradient_clipping"] == cfg.optim.clip_grad


@pytest.mark.parametrize("user, key, instead", [
    ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu", "batch_size="),
    ({"train_batch_size": 256}, "train_batch_size", "batch_size="),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps", "batch_size="),
    ({"zero_optimization": {"stage": 3, "overlap_comm": True}}, "zero_optimization.stage", "zero_stage="),
    ({"bf16": {"enabled": True}}, "bf16.enabled", "precision="),
    ({"fp16": {"enabled": True, "loss_scale": 0}}, "fp16.enabled", "precision="),
    ({"amp": {"enabled": True}}, "amp", "precision="),
    ({"gradient_clipping": 1.0}, "gradient_clipping", "optim.clip_grad="),
    ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, "optimizer", "optim.*"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler", "optim.*"),
])
def test_deepspeed_json_keys_that_the_config_owns_are_refused_at_parse_time(tmp_path, user, key, instead) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError) as err:
        parse("preset=smoke", "--deepspeed_config", str(path))
    assert f"remove {key!r}" in str(err.value) and f"use {instead}" in str(err.value)
    cfg = parse("preset=smoke").config
    with pytest.raises(ConfigError, match=f"remove {key!r}"):  # fit's own path refuses it too
        deepspeed_config(cfg, CPU, str(path))


def test_deepspeed_json_that_is_not_an_object_is_refused(tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text("{'zero_optimization': }")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse("--deepspeed_config", str(path))


def test_fp16_on_cpu_is_refused_with_the_alternative() -> None:
    cfg = parse("preset=smoke", "precision=fp16").config
    with pytest.raises(ConfigError, match="use precision=bf16 or fp32"):
        deepspeed_config(cfg, CPU)
