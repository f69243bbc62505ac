"""Gen-SIS end to end (METHODS.md §1): DINO, then Gen-DINO on views from an embedding-conditioned LDM.

    deepspeed recipes/dino_gensis.py                                   # CPU-sized, builtin:shapes
    deepspeed recipes/dino_gensis.py data=/my/images out=runs/mine preset=imagenet
    deepspeed recipes/dino_gensis.py gen=off                           # the DINO baseline alone

Stages, each under ``out=`` and skipped when its output exists and matches the config (rerunning
the command resumes the pipeline; a stage that was killed resumes from its checkpoint):

  1. ``dino/``       stage-1 DINO (the baseline of equal length) → encoder + k-NN   [or encoder=]
  2. ``eldm/``       autoencoder + E-LDM conditioned on stage-1 embeddings          [or eldm=]
  3. ``views.zarr``  K synthetic + J interpolated views per image                   [or views=]
  4. ``gen_dino/``   Gen-DINO from scratch: synthetic global crops (p_gen) + L_dis on interpolated views
Then a table of both k-NN results, also written to ``out/eval.json`` as ``{"dino": …, "gen_dino": …}``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Literal

from genssl.engine.config import ConfigError, config_hash, parse_config, to_dict
from genssl.engine.distributed import DistInfo, barrier, cleanup, setup_distributed
from genssl.engine.atomic import write_json_atomic
from genssl.engine.setup import Data, load_data, train_loader
from genssl.engine.trainer import compute_dtype
from genssl.models.gendino import GenDINOConfig, GenDINOObjective
from genssl.recipes import dino as dino_recipe
from genssl.recipes import eldm as eldm_recipe
from genssl.recipes import generate_views as generation_recipe

STAGE_FILE = "stage.json"


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
    # CPU-sized (the default): 1,200 built-in images, every stage a few minutes on 2 cores.
    "smoke": _with(dino_recipe.SMOKE, data="builtin:shapes?per_class=100&val_per_class=50", epochs=6,
                   generator=eldm_recipe.PRESETS["smoke"], generation=generation_recipe.PRESETS["smoke"]),
    "cifar": _with(dino_recipe.PRESETS["cifar"], generator=eldm_recipe.PRESETS["smoke"],
                   generation=generation_recipe.PRESETS["smoke"]),
    # The paper's setting: ViT-S/16, 100 epochs, 2x224 + 8x96, E-LDM at 256², DPM-Solver++ 20 steps.
    "imagenet": _with(dino_recipe.PRESETS["imagenet"], generator=eldm_recipe.PRESETS["imagenet"],
                      generation=generation_recipe.PRESETS["imagenet"]),
}


def dino_config(cfg: GenSISConfig, out: Path) -> dino_recipe.DINORecipeConfig:
    keys = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(dino_recipe.DINORecipeConfig)}
    return dino_recipe.DINORecipeConfig(**{**keys, "out": str(out)})


def finished(folder: Path, cfg, dist: DistInfo) -> dict | None:
    """The stage's recorded result when ``folder`` holds a finished stage of this config, else None.

    A finished stage of a *different* config is refused: the user chooses a new out= or removes it.
    """
    marker = folder / STAGE_FILE
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    if record["config_hash"] != config_hash(cfg):
        raise ConfigError(f"{folder} holds a finished stage made with other settings; use a new out= "
                          f"(or delete {folder}) to redo it with these")
    if dist.is_main:
        print(f"{folder}: finished earlier with these settings; skipped", flush=True)
    return record


def mark_finished(folder: Path, cfg, result, dist: DistInfo) -> None:
    if dist.is_main:
        write_json_atomic(folder / STAGE_FILE, {"config_hash": config_hash(cfg), "result": result})
    barrier()


def stage_dino(cfg: GenSISConfig, dist: DistInfo, data: Data, ds_config: str | None) -> tuple[Path, dict | None]:
    if cfg.encoder:
        path = Path(cfg.encoder)
        eval_file = (path if path.is_dir() else path.parent) / "eval.json"
        return path, json.loads(eval_file.read_text()) if eval_file.is_file() else None
    scfg = dino_config(cfg, Path(cfg.out) / "dino")
    done = finished(Path(scfg.out), scfg, dist)
    if done:
        return Path(scfg.out), done["result"]
    result = dino_recipe.train_dino(scfg, dist, data, train_loader(data.train, scfg.crops, scfg, dist),
                                    dino_recipe.dino_objective(scfg), ds_config)
    mark_finished(Path(scfg.out), scfg, result, dist)
    return Path(scfg.out), result


def stage_eldm(cfg: GenSISConfig, dist: DistInfo, encoder: Path) -> Path:
    if cfg.eldm:
        return Path(cfg.eldm)
    ecfg = dataclasses.replace(cfg.generator, data=cfg.data, out=str(Path(cfg.out) / "eldm"), encoder=str(encoder),
                        seed=cfg.seed, cache_dir=cfg.cache_dir, num_workers=cfg.num_workers, log=cfg.log)
    if not finished(Path(ecfg.out), ecfg, dist):
        eldm_recipe.train_eldm(ecfg, dist)
        mark_finished(Path(ecfg.out), ecfg, None, dist)
    return Path(ecfg.out)


def stage_views(cfg: GenSISConfig, dist: DistInfo, eldm: Path) -> Path:
    if cfg.views:
        return Path(cfg.views)
    gcfg = dataclasses.replace(cfg.generation, eldm=str(eldm), data=cfg.data, out=str(Path(cfg.out) / "views.zarr"),
                        seed=cfg.seed, cache_dir=cfg.cache_dir, num_workers=cfg.num_workers, progress=cfg.log.progress)
    generation_recipe.generate(gcfg, dist)  # skips every finished source; refuses a mismatched store
    return Path(gcfg.out)


def stage_gen_dino(cfg: GenSISConfig, dist: DistInfo, data: Data, views: Path, ds_config: str | None) -> dict | None:
    from genssl.data.gensis_loader import GenSISLoader

    scfg = dataclasses.replace(cfg, out=str(Path(cfg.out) / "gen_dino"))
    done = finished(Path(scfg.out), scfg, dist)
    if done:
        return done["result"]
    interpolation = cfg.gendino.interpolation and cfg.gendino.lambda_dis != 0
    loader = GenSISLoader(data.train, views, cfg.crops, cfg.batch_size, dist.rank, dist.world_size, cfg.seed,
                          p_gen=cfg.gendino.p_gen, interpolation=interpolation,
                          device_id=dist.local_rank if dist.device.type == "cuda" else None,
                          num_threads=max(1, cfg.num_workers), py_workers=cfg.num_workers if dist.device.type == "cuda" else 0)
    dtype = compute_dtype(cfg.precision)
    result = dino_recipe.train_dino(scfg, dist, data, loader,
                                    lambda s: GenDINOObjective(s, cfg.dino, cfg.crops.n_global, cfg.epochs, dtype, cfg.gendino),
                                    ds_config)
    mark_finished(Path(scfg.out), scfg, result, dist)
    return result


def print_table(results: dict, epochs: int) -> None:
    print(f"\nk-NN after {epochs} epochs (k=20, T=0.07)\n{'method':10s} {'top-1 %':>8s} {'top-5 %':>8s}")
    for name, r in results.items():
        if r:
            print(f"{name:10s} {r['knn_top1']:8.2f} {r['knn_top5']:8.2f}")
        else:
            print(f"{name:10s} {'-':>8s} {'-':>8s}")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("preset=") for a in argv):
        argv = ["preset=smoke", *argv]
    args = parse_config(argv, GenSISConfig, PRESETS)
    cfg: GenSISConfig = args.config
    dist = setup_distributed(args.local_rank)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data, cfg.cache_dir, dist)

    encoder, dino_result = stage_dino(cfg, dist, data, args.deepspeed_config)
    results = {"dino": dino_result}
    if cfg.gen == "on":
        eldm = stage_eldm(cfg, dist, encoder)
        views = stage_views(cfg, dist, eldm)
        results["gen_dino"] = stage_gen_dino(cfg, dist, data, views, args.deepspeed_config)
    if dist.is_main:
        write_json_atomic(Path(cfg.out) / "eval.json", {**results, "epochs": cfg.epochs, "config": to_dict(cfg)})
        print_table(results, cfg.epochs)
        print(f"wrote {Path(cfg.out) / 'eval.json'}", flush=True)
    cleanup()
    return results


if __name__ == "__main__":
    main()
