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
import json
import time
from pathlib import Path
from typing import Literal

from genssl.engine.config import ConfigError, parse_config, run_differences, run_identity, to_dict
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
    keys = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(dino_recipe.DINORecipeConfig)}
    return dino_recipe.DINORecipeConfig(**{**keys, "out": str(out)})


def finished(folder: Path, cfg, dist: DistInfo) -> dict | None:
    """The stage's recorded result when ``folder`` holds a finished stage of this run, else None.

    "This run" is ``run_identity`` (engine/config.py): keys that cannot change results (out=,
    logging, workers, checkpoint cadence) do not count, so a moved folder is still recognised.
    A finished stage of a *different* run is refused: the user chooses a new out= or removes it.
    """
    marker = folder / STAGE_FILE
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    differences = run_differences(record.get("run_identity"), cfg)
    if differences:
        raise ConfigError(f"{folder} holds a finished stage made with other settings ({'; '.join(differences)}); "
                          f"rerun with those to reuse it, or use a new out= (or delete {folder}) to redo it with these")
    if dist.is_main:
        print(f"{folder}: finished earlier with these settings; skipped", flush=True)
    return record


def mark_finished(folder: Path, cfg, result, dist: DistInfo, started: float) -> None:
    """Record the finished stage: its identity, result and wall time since ``started`` (perf_counter)."""
    if dist.is_main:
        write_json_atomic(folder / STAGE_FILE, {"run_identity": run_identity(cfg), "result": result,
                                                "wall_s": round(time.perf_counter() - started, 1)})
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
    started = time.perf_counter()
    result = dino_recipe.train_dino(scfg, dist, data, train_loader(data.train, scfg.crops, scfg, dist),
                                    dino_recipe.dino_objective(scfg), ds_config)
    mark_finished(Path(scfg.out), scfg, result, dist, started)
    return Path(scfg.out), result


def stage_eldm(cfg: GenSISConfig, dist: DistInfo, encoder: Path, ds_config: str | None) -> Path:
    if cfg.eldm:
        return Path(cfg.eldm)
    ecfg = dataclasses.replace(cfg.generator, data=cfg.data, out=str(Path(cfg.out) / "eldm"), encoder=str(encoder),
                        seed=cfg.seed, cache_dir=cfg.cache_dir, num_workers=cfg.num_workers, log=cfg.log)
    # The stage is known by the user's encoder= ("" = stage 1 of this pipeline), not by the path
    # derived from out=, so a moved or copied pipeline folder is still the same run.
    stage = dataclasses.replace(ecfg, encoder=cfg.encoder)
    if not finished(Path(ecfg.out), stage, dist):
        started = time.perf_counter()
        eldm_recipe.train_eldm(ecfg, dist, ds_config)
        mark_finished(Path(ecfg.out), stage, None, dist, started)
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
    started = time.perf_counter()
    interpolation = cfg.gendino.interpolation and cfg.gendino.lambda_dis != 0
    loader = GenSISLoader(data.train, views, cfg.crops, cfg.batch_size, dist.rank, dist.world_size, cfg.seed,
                          p_gen=cfg.gendino.p_gen, interpolation=interpolation,
                          device_id=dist.local_rank if dist.device.type == "cuda" else None,
                          num_threads=max(1, cfg.num_workers), py_workers=cfg.num_workers if dist.device.type == "cuda" else 0)
    dtype = compute_dtype(cfg.precision)
    result = dino_recipe.train_dino(scfg, dist, data, loader,
                                    lambda s: GenDINOObjective(s, cfg.dino, cfg.crops.n_global, cfg.epochs, dtype, cfg.gendino),
                                    ds_config)
    mark_finished(Path(scfg.out), scfg, result, dist, started)
    return result


ROW_NAMES = {"random_init": "random init", "dino": "DINO", "gen_dino": "Gen-DINO"}


def print_table(results: dict, cfg: GenSISConfig) -> None:
    """Rows random init / DINO / Gen-DINO; columns k-NN top-1 and top-5, linear top-1 ("-": not measured)."""
    def cell(r: dict | None, key: str) -> str:
        value = (r or {}).get(key)  # a stage recorded by an older genssl may lack a key, or be None
        return f"{value:14.2f}" if value is not None else f"{'-':>14s}"

    print(f"\nafter {cfg.epochs} epochs on {cfg.data}: k-NN k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature:g}; "
          f"linear probe {cfg.eval.linear_epochs} epochs")
    print(f"{'method':12s}{'k-NN top-1 %':>14s}{'k-NN top-5 %':>14s}{'linear top-1 %':>16s}")
    for name, r in results.items():
        print(f"{ROW_NAMES.get(name, name):12s}{cell(r, 'knn_top1')}{cell(r, 'knn_top5')}  {cell(r, 'linear_top1')}")


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
        eldm = stage_eldm(cfg, dist, encoder, args.deepspeed_config)
        views = stage_views(cfg, dist, eldm)
        results["gen_dino"] = stage_gen_dino(cfg, dist, data, views, args.deepspeed_config)
    if dist.is_main:
        write_json_atomic(Path(cfg.out) / "eval.json", {**results, "epochs": cfg.epochs, "config": to_dict(cfg)})
        print_table(results, cfg)
        print(f"wrote {Path(cfg.out) / 'eval.json'}", flush=True)
    cleanup()
    return results


if __name__ == "__main__":
    main()
