"""Gen-SIS end to end (docs/METHODS.md §1): DINO, then Gen-DINO on views from an embedding-conditioned LDM.

    deepspeed recipes/dino_gensis.py                                   # CPU-sized, builtin:shapes
    deepspeed recipes/dino_gensis.py data=/my/images out=runs/mine preset=imagenet
    deepspeed recipes/dino_gensis.py gen=off                           # the DINO baseline alone

Stages, each under ``out=`` and skipped when its output exists and matches the config (rerunning
the command resumes the pipeline; a stage that was killed resumes from its checkpoint):

  1. ``dino/``       stage-1 DINO (the baseline of equal length) → encoder + k-NN   [or encoder=]
  2. ``eldm/``       autoencoder + E-LDM conditioned on stage-1 embeddings          [or eldm=]
  3. ``views.zarr``  K synthetic + J interpolated views per image                   [or views=]
  4. ``gen_dino/``   Gen-DINO from scratch: synthetic global crops (p_gen) + L_dis on interpolated views
Then a table of k-NN and linear-probe results of the random init both start from (the floor), DINO
and Gen-DINO, also written to ``out/eval.json`` as ``{"random_init": …, "dino": …, "gen_dino": …}``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from genssl.engine.atomic import write_json_atomic
from genssl.engine.cli import run_main
from genssl.engine.config import parse_config, to_dict
from genssl.engine.distributed import DistInfo, cleanup, setup_distributed
from genssl.engine.pipeline import (print_table, real_synthetic_loader, run_stage, stage_eldm, stage_views, sub_config,
                                    supplied_encoder)
from genssl.engine.setup import Data, load_data, train_loader
from genssl.engine.trainer import compute_dtype
from genssl.models.gendino import GenDINOConfig, GenDINOObjective
from genssl.recipes import dino as dino_recipe
from genssl.recipes import eldm as eldm_recipe
from genssl.recipes import generate_views as generation_recipe

@dataclasses.dataclass
class GenSISConfig(dino_recipe.DINORecipeConfig):
    """DINO keys (shared by stage 1 and Gen-DINO, so both runs are of equal length) + the pipeline's."""

    out: str = "runs/gensis"
    gen: Literal["on", "off"] = "on"  # off: stage-1 DINO only (the baseline)
    encoder: str = ""  # supply stage 1: a DINO run directory or its encoder.safetensors
    eldm: str = ""  # supply stages 2: an E-LDM run directory (recipes/eldm.py out=)
    views: str = ""  # supply stage 3: a view store made from this data with that E-LDM
    gendino: GenDINOConfig = dataclasses.field(default_factory=GenDINOConfig)
    generator: eldm_recipe.ELDMRecipeConfig = dataclasses.field(default_factory=eldm_recipe.ELDMRecipeConfig)
    generation: generation_recipe.GenerateConfig = dataclasses.field(default_factory=generation_recipe.GenerateConfig)


def _with(preset: dict, **sections) -> dict:
    return {**preset, **sections}


PRESETS = {
    # CPU-sized (the default): 1,200 built-in 32 px images, every stage a few minutes on 2 cores.
    "smoke": _with(dino_recipe.SMOKE, generator=eldm_recipe.PRESETS["smoke"], generation=generation_recipe.PRESETS["smoke"]),
    # 32x32 photos on 2 CPU cores (bench/learning.py on CIFAR-10-sized data; docs/LEARNING.md).
    "cpu": _with(dino_recipe.CPU, generator=eldm_recipe.PRESETS["smoke"], generation=generation_recipe.PRESETS["smoke"]),
    "cifar": _with(dino_recipe.PRESETS["cifar"], generator=eldm_recipe.PRESETS["smoke"],
                   generation=generation_recipe.PRESETS["smoke"]),
    # The paper's setting: ViT-S/16, 100 epochs, 2x224 + 8x96, E-LDM at 256², DPM-Solver++ 20 steps.
    "imagenet": _with(dino_recipe.PRESETS["imagenet"], generator=eldm_recipe.PRESETS["imagenet"],
                      generation=generation_recipe.PRESETS["imagenet"]),
}


def dino_config(cfg: GenSISConfig, out: Path) -> dino_recipe.DINORecipeConfig:
    return sub_config(dino_recipe.DINORecipeConfig, cfg, out=str(out))


def stage_dino(cfg: GenSISConfig, dist: DistInfo, data: Data, ds_config: str | None) -> tuple[Path, dict | None]:
    if cfg.encoder:
        return supplied_encoder(cfg.encoder)
    scfg = dino_config(cfg, Path(cfg.out) / "dino")
    result = run_stage(scfg, dist, lambda: dino_recipe.train_dino(
        scfg, dist, data, train_loader(data.train, scfg.crops, scfg, dist), dino_recipe.dino_objective(scfg), ds_config))
    return Path(scfg.out), result


def stage_gen_dino(cfg: GenSISConfig, dist: DistInfo, data: Data, views: Path, ds_config: str | None) -> dict | None:
    scfg = dataclasses.replace(cfg, out=str(Path(cfg.out) / "gen_dino"))
    interpolation = cfg.gendino.interpolation and cfg.gendino.lambda_dis != 0
    dtype = compute_dtype(cfg.precision)

    def train() -> dict:
        loader = real_synthetic_loader(cfg, dist, data.train, views, cfg.crops, cfg.gendino.p_gen, interpolation)
        return dino_recipe.train_dino(
            scfg, dist, data, loader,
            lambda s: GenDINOObjective(s, cfg.dino, cfg.crops.n_global, cfg.epochs, dtype, cfg.gendino), ds_config)

    return run_stage(scfg, dist, train)


ROW_NAMES = {"random_init": "random init", "dino": "DINO", "gen_dino": "Gen-DINO"}


def main(argv: list[str] | None = None) -> dict:
    args = parse_config(argv, GenSISConfig, PRESETS, default_preset="smoke")
    cfg: GenSISConfig = args.config
    dist = setup_distributed(args.local_rank)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data, cfg.cache_dir, dist)

    encoder, dino_result = stage_dino(cfg, dist, data, args.deepspeed_config)
    # The floor both methods must beat: DINO and Gen-DINO start from the same seeded random init.
    results = {"random_init": dino_recipe.evaluate_random_init(cfg, dist, data), "dino": dino_result}
    if cfg.gen == "on":
        # no E-LDM is trained for a supplied view store
        views = stage_views(cfg, dist, None if cfg.views else stage_eldm(cfg, dist, encoder, args.deepspeed_config))
        results["gen_dino"] = stage_gen_dino(cfg, dist, data, views, args.deepspeed_config)
    if dist.is_main:
        write_json_atomic(Path(cfg.out) / "eval.json", {**results, "epochs": cfg.epochs, "config": to_dict(cfg)})
        print_table(results, cfg, ROW_NAMES)
        print(f"wrote {Path(cfg.out) / 'eval.json'}", flush=True)
    cleanup()
    return results


if __name__ == "__main__":
    run_main(main)
