"""MixDiff (Bafghi et al., WACV 2025, arXiv:2406.12368; docs/METHODS.md §4): a base method where one view of
each image is a synthetic view of it, then k-NN and linear probe against the base method alone.

    deepspeed recipes/mixdiff.py method=simclr                     # CPU-sized, builtin:shapes
    deepspeed recipes/mixdiff.py method=dino data=/my/images out=runs/mine preset=imagenet
    deepspeed recipes/mixdiff.py method=barlow generator.pipeline=/models/sd-image-variations  # SD image variations
    deepspeed recipes/mixdiff.py mix=off                           # the base method alone

For image x, augmentations t, t' and a synthetic view x̃ of x: per sample with probability ``mixdiff.p``
the pair (t(x), t'(x)) becomes (t(x), t'(x̃)) — for DINO the second global crop, local crops stay real.
``method=simclr|mocov2|mocov3|byol|simsiam|barlow|swav|dino`` (the paper: SimCLR, Barlow Twins, DINO).
``mixdiff.augment=false``: both views only resized (MixDiff reports real + synthetic works without augmentations).

Stages under ``out=``, each skipped when finished with these settings and resumed when killed
(engine/pipeline.py):

  1. ``base/``       the method on real views: the baseline of equal length, and the encoder whose
                     embeddings condition the E-LDM                                   [or encoder=]
  2. ``eldm/``       autoencoder + E-LDM (none with ``generator.pipeline=DIR``)       [or eldm=]
  3. ``views.zarr``  synthetic views (``generation.views_per_image`` per image)       [or views=]
  4. ``mixdiff/``    the method from scratch on real + synthetic pairs
Then a table random init / base / MixDiff, also in ``out/eval.json`` as ``{"random_init", "base", "mixdiff"}``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal

from genssl.data.augment import MultiCropSpec
from genssl.engine import pretrain
from genssl.engine.atomic import write_json_atomic
from genssl.engine.cli import run_main
from genssl.engine.config import ConfigError, parse_config, to_dict
from genssl.engine.distributed import cleanup, setup_distributed
from genssl.engine.pipeline import (pipeline_presets, print_table, real_synthetic_loader, run_stage, stage_eldm,
                                    stage_views, sub_config, supplied_encoder)
from genssl.engine.setup import load_data, train_loader
from genssl.generators.view_quality import report_path
from genssl.models.objectives import DINOConfig
from genssl.recipes import dino as dino_recipe
from genssl.recipes import eldm as eldm_recipe
from genssl.recipes import generate_views as generation_recipe
from genssl.recipes import ssl_methods as ssl_recipe

NAMES = {**ssl_recipe.NAMES, "dino": "DINO"}
Method = Literal["simclr", "mocov2", "mocov3", "byol", "simsiam", "barlow", "swav", "dino"]


@dataclasses.dataclass
class MixDiffSettings:
    p: float = 1.0  # per sample, probability that view 2 is synthetic; 1.0 = the official code (docs/METHODS.md §4)
    augment: bool = True  # false: the MixDiff stage's views are only resized (`resize_only`)

    def validate(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"mixdiff.p is a probability and must be in [0, 1], got {self.p}")


@dataclasses.dataclass
class MixDiffGenerator(eldm_recipe.ELDMRecipeConfig):
    """recipes/eldm.py keys (the E-LDM stage), or ``pipeline=DIR``: a local diffusers image-variation pipeline."""

    pipeline: str = ""


@dataclasses.dataclass
class MixDiffConfig(ssl_recipe.SSLRecipeConfig):
    """The method's keys (shared by base/ and mixdiff/, so both runs are of equal length) + the pipeline's."""

    out: str = "runs/mixdiff"
    method: Method = "simclr"
    dino: DINOConfig = dataclasses.field(default_factory=DINOConfig)
    mix: Literal["on", "off"] = "on"  # off: base/ only (the baseline)
    mixdiff: MixDiffSettings = dataclasses.field(default_factory=MixDiffSettings)
    encoder: str = ""  # supply stage 1: a run directory of this method or its encoder.safetensors
    eldm: str = ""  # supply stage 2: an E-LDM run directory (recipes/eldm.py out=)
    views: str = ""  # supply stage 3: a view store made from this data
    generator: MixDiffGenerator = dataclasses.field(default_factory=MixDiffGenerator)
    generation: generation_recipe.GenerateConfig = dataclasses.field(default_factory=generation_recipe.GenerateConfig)

    def validate(self) -> None:
        super().validate()
        if self.mixdiff.p > 0 and self.crops.n_global < 2:
            raise ConfigError(f"MixDiff replaces view 2 (global crop 1) by a synthetic one: set crops.n_global=2, "
                              f"got {self.crops.n_global}")
        if not self.mixdiff.augment and self.crops.n_local:
            raise ConfigError("mixdiff.augment=false resizes whole images: there are no local crops; set crops.n_local=0")
        if self.generator.pipeline and self.eldm:
            raise ConfigError("give one generator: generator.pipeline= (an image-variation pipeline) or eldm= (an E-LDM run)")


def resize_only(spec: MultiCropSpec) -> MultiCropSpec:
    """``spec`` without augmentation: the whole image resized (scale 1, aspect 1: a non-square image
    gives its centre square), no flip, colour jitter, grayscale, blur or solarize."""
    return dataclasses.replace(spec, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                               blur_p_global=(0.0,), solarize_p_global=(0.0,), blur_p_local=0.0, solarize_p_local=0.0)


def presets_for(method: str) -> dict[str, dict]:
    """The method's presets (recipes/dino.py, recipes/ssl_methods.py) with the E-LDM and generation sections;
    one synthetic view per image and no interpolated views (MixDiff uses none)."""
    base = dino_recipe.PRESETS if method == "dino" else ssl_recipe.presets_for(method)
    return pipeline_presets(base, views_per_image=1, interp_per_image=0)


def method_config(cfg: MixDiffConfig, out: Path):
    """The base stage's config: exactly a recipes/dino.py or recipes/ssl_methods.py run of these settings."""
    if cfg.method == "dino":
        return sub_config(dino_recipe.DINORecipeConfig, cfg, out=str(out))
    return sub_config(ssl_recipe.SSLRecipeConfig, cfg, out=str(out))


def initial_student(method: str, cfg):
    return dino_recipe.initial_student(cfg) if method == "dino" else ssl_recipe.initial_student(cfg)


def train_method(method: str, cfg, dist, data, loader, ds_config: str | None, random_init: dict | None) -> dict:
    """Pretrain ``method`` with ``cfg`` on ``loader``, export and evaluate its encoder (every rank)."""
    if method == "dino":
        return dino_recipe.train_dino(cfg, dist, data, loader, dino_recipe.dino_objective(cfg), ds_config, random_init)
    return ssl_recipe.train_ssl(cfg, dist, data, loader, ds_config, random_init)


def stage_base(cfg: MixDiffConfig, dist, data, ds_config, random_init) -> tuple[Path, dict | None]:
    if cfg.encoder:
        return supplied_encoder(cfg.encoder)
    bcfg = method_config(cfg, Path(cfg.out) / "base")
    return Path(bcfg.out), run_stage(bcfg, dist, lambda: train_method(
        cfg.method, bcfg, dist, data, train_loader(data.train, bcfg.crops, bcfg, dist), ds_config, random_init))


def stage_mixdiff(cfg: MixDiffConfig, dist, data, views: Path, ds_config, random_init) -> dict | None:
    # The whole config is the stage's identity (and its checkpoints'): p, augment and the generator count.
    mcfg = dataclasses.replace(cfg, out=str(Path(cfg.out) / "mixdiff"))
    spec = cfg.crops if cfg.mixdiff.augment else resize_only(cfg.crops)
    return run_stage(mcfg, dist, lambda: train_method(
        cfg.method, mcfg, dist, data, real_synthetic_loader(cfg, dist, data.train, views, spec, cfg.mixdiff.p),
        ds_config, random_init))


def method_of(argv: list[str]) -> str:
    """``method=`` of the command line or ``config=FILE`` (recipes/ssl_methods.py's rule, DINO added)."""
    return ssl_recipe.method_of(argv, MixDiffConfig.method, tuple(NAMES))


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_config(argv, MixDiffConfig, presets_for(method_of(argv)), default_preset="smoke")
    cfg: MixDiffConfig = args.config
    dist = setup_distributed(args.local_rank)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data, cfg.cache_dir, dist)

    # The floor: the base method and MixDiff start from the same seeded random init.
    base_cfg = method_config(cfg, Path(cfg.out) / "base")
    random_init = pretrain.evaluate_random_init(lambda: initial_student(cfg.method, base_cfg), base_cfg, dist, data)
    encoder, base = stage_base(cfg, dist, data, args.deepspeed_config, random_init)
    results, quality = {"random_init": random_init, "base": base}, None
    if cfg.mix == "on":
        if cfg.generator.pipeline:
            views = stage_views(cfg, dist, None, pipeline=cfg.generator.pipeline, encoder=str(encoder))
        else:  # no E-LDM is trained for a supplied view store
            views = stage_views(cfg, dist, None if cfg.views else stage_eldm(cfg, dist, encoder, args.deepspeed_config))
        results["mixdiff"] = stage_mixdiff(cfg, dist, data, views, args.deepspeed_config, random_init)
        quality = report_path(views) if report_path(views).is_file() else None
    if dist.is_main:
        write_json_atomic(Path(cfg.out) / "eval.json", {**results, "method": cfg.method, "epochs": cfg.epochs,
                                                        "view_quality": str(quality) if quality else None,
                                                        "config": to_dict(cfg)})
        name = NAMES[cfg.method]
        print_table(results, cfg, {"random_init": "random init", "base": name, "mixdiff": f"MixDiff ({name})"})
        if quality:
            print(f"view-quality report of the synthetic views: {quality}")
        print(f"wrote {Path(cfg.out) / 'eval.json'}", flush=True)
    cleanup()
    return results


if __name__ == "__main__":
    run_main(main)
