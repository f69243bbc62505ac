"""The stage machinery of the generative-view pipelines: Gen-SIS (recipes/dino_gensis.py, docs/METHODS.md §1),
MixDiff (recipes/mixdiff.py, §4) and those to come (GenView, §2).

A pipeline is a chain of stages under one ``out=`` folder: an encoder, a generator trained on it, a
view store drawn from the generator, then training on real + synthetic views. A stage writes
``stage.json`` (its ``run_identity``, result and wall time) when it finishes; a rerun skips a finished
stage of the same run, refuses one of another run, and resumes one that was killed (training from its
checkpoint, generation from its finished sources).

A pipeline config has the keys ``data out seed cache_dir num_workers log encoder eldm views`` and
the sections ``generator`` (recipes/eldm.py keys, a subclass may add its own) and ``generation``
(recipes/generate_views.py keys); `stage_eldm` and `stage_views` read nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from genssl.engine.atomic import write_json_atomic
from genssl.engine.config import ConfigError, identity_at_world_size, run_differences, run_identity
from genssl.engine.distributed import DistInfo, barrier

__all__ = ["STAGE_FILE", "finished", "mark_finished", "run_stage", "supplied_encoder", "sub_config", "stage_eldm",
           "stage_views", "pipeline_presets", "real_synthetic_loader", "print_table"]

STAGE_FILE = "stage.json"


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
    # a stage finished on other ranks counts when the global batch is the same (batch_size is per rank)
    stored = identity_at_world_size(record.get("run_identity"), cfg, record.get("world_size", dist.world_size),
                                    dist.world_size)
    differences = run_differences(stored, cfg)
    if differences:
        raise ConfigError(f"{folder} holds a finished stage made with other settings ({'; '.join(differences)}); "
                          f"rerun with those to reuse it, or use a new out= (or delete {folder}) to redo it with these")
    if dist.is_main:
        print(f"{folder}: finished earlier with these settings; skipped", flush=True)
    return record


def mark_finished(folder: Path, cfg, result, dist: DistInfo, started: float) -> None:
    """Record the finished stage: its identity, result and wall time since ``started`` (perf_counter)."""
    if dist.is_main:
        write_json_atomic(folder / STAGE_FILE, {"run_identity": run_identity(cfg), "world_size": dist.world_size, "result": result,
                                                "wall_s": round(time.perf_counter() - started, 1)})
    barrier()


def run_stage(cfg, dist: DistInfo, train: Callable[[], object]):
    """The result of the stage ``cfg`` describes (its folder is ``cfg.out``): recorded, when a finished
    stage of this run is there; else ``train()``'s, then recorded."""
    folder = Path(cfg.out)
    done = finished(folder, cfg, dist)
    if done:
        return done["result"]
    started = time.perf_counter()
    result = train()
    mark_finished(folder, cfg, result, dist, started)
    return result


def supplied_encoder(spec: str) -> tuple[Path, dict | None]:
    """``encoder=``, a run directory or its encoder.safetensors, and the eval.json beside it (None if absent)."""
    path = Path(spec)
    eval_file = (path if path.is_dir() else path.parent) / "eval.json"
    return path, json.loads(eval_file.read_text()) if eval_file.is_file() else None


def sub_config(cls, cfg, **changes):
    """A ``cls`` holding ``cfg``'s values of ``cls``'s keys, then ``changes``: a stage's own config cut
    out of the pipeline's (a pipeline config is its training recipe's plus the pipeline keys), so the
    stage's ``run_identity`` is that of the same recipe run on its own."""
    keys = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.init}
    return cls(**{**keys, **changes})


def stage_eldm(cfg, dist: DistInfo, encoder: Path, ds_config: str | None) -> Path:
    """The autoencoder + E-LDM conditioned on ``encoder``'s embeddings, under ``out/eldm`` (or ``eldm=``)."""
    from genssl.recipes import eldm as eldm_recipe

    if cfg.eldm:
        return Path(cfg.eldm)
    ecfg = sub_config(eldm_recipe.ELDMRecipeConfig, cfg.generator, data=cfg.data, out=str(Path(cfg.out) / "eldm"),
                      encoder=str(encoder), seed=cfg.seed, cache_dir=cfg.cache_dir, num_workers=cfg.num_workers,
                      log=cfg.log)
    # The stage is known by the user's encoder= ("" = stage 1 of this pipeline), not by the path
    # derived from out=, so a moved or copied pipeline folder is still the same run.
    stage = dataclasses.replace(ecfg, encoder=cfg.encoder)
    if not finished(Path(ecfg.out), stage, dist):
        started = time.perf_counter()
        eldm_recipe.train_eldm(ecfg, dist, ds_config)
        mark_finished(Path(ecfg.out), stage, None, dist, started)
    return Path(ecfg.out)


def stage_views(cfg, dist: DistInfo, eldm: Path | None, **changes) -> Path:
    """The view store ``out/views.zarr`` (or ``views=``) from the E-LDM at ``eldm``; ``changes`` are
    further generation keys (MixDiff: ``pipeline=`` and the judging ``encoder=`` instead of an E-LDM).
    A rerun verifies the store first and regenerates its damaged sources (recipes/generate_views.py
    ``verify=true``); a supplied ``views=`` is used as it is (the loader falls back to real crops for
    damaged views and reports them). The contact sheet goes to ``out/views.png`` (unless
    ``generation.contact_sheet=`` names another) and, with ``log.tensorboard``, to TensorBoard in ``out/``."""
    from genssl.recipes import generate_views as generation_recipe

    if cfg.views:
        return Path(cfg.views)
    sheet = cfg.generation.contact_sheet or str(Path(cfg.out) / "views.png")
    gcfg = dataclasses.replace(cfg.generation, eldm=str(eldm) if eldm else "", data=cfg.data,
                               out=str(Path(cfg.out) / "views.zarr"), seed=cfg.seed, cache_dir=cfg.cache_dir,
                               num_workers=cfg.num_workers, progress=cfg.log.progress, verify=True,
                               contact_sheet=sheet, tensorboard=cfg.log.tensorboard and cfg.generation.tensorboard,
                               **changes)
    generation_recipe.generate(gcfg, dist)  # skips every finished source; refuses a mismatched store
    return Path(gcfg.out)


def pipeline_presets(method_presets: dict[str, dict], **generation) -> dict[str, dict]:
    """A pipeline's presets: each of the method's (recipes/ssl_methods.py, recipes/dino.py) with the
    E-LDM section ``generator`` and the ``generation`` section of its scale (recipes/eldm.py and
    recipes/generate_views.py presets: ImageNet-sized for ``imagenet``, CPU-sized for every other),
    ``generation`` overriding keys of the latter (e.g. one view per image, no interpolated views)."""
    from genssl.recipes import eldm as eldm_recipe
    from genssl.recipes import generate_views as generation_recipe

    out = {}
    for name, preset in method_presets.items():
        scale = "imagenet" if name == "imagenet" else "smoke"
        out[name] = {**preset, "generator": eldm_recipe.PRESETS[scale],
                     "generation": {**generation_recipe.PRESETS[scale], **generation}}
    return out


def real_synthetic_loader(cfg, dist: DistInfo, index, views: Path, spec, p_gen: float, interpolation: bool = False):
    """The one real + synthetic training loader (data/gensis_loader.py) of every pipeline: per sample,
    global crop slot 1 comes from a synthetic view of the same image with probability ``p_gen``;
    ``interpolation`` adds the interpolated views and partners (Gen-DINO's L_dis)."""
    from genssl.data.gensis_loader import GenSISLoader

    on_gpu = dist.device.type == "cuda"
    return GenSISLoader(index, views, spec, cfg.batch_size, dist.rank, dist.world_size, cfg.seed, p_gen=p_gen,
                        interpolation=interpolation, device_id=dist.local_rank if on_gpu else None,
                        num_threads=max(1, cfg.num_workers), py_workers=cfg.num_workers if on_gpu else 0)


def print_table(results: dict, cfg, names: dict[str, str]) -> None:
    """One row per entry of ``results`` (named by ``names``, else by its key); columns k-NN top-1 and
    top-5, linear top-1 ("-": not measured, e.g. unlabelled data or a stage recorded by an older genssl)."""
    def cell(r: dict | None, key: str) -> str:
        value = (r or {}).get(key)
        return f"{value:14.2f}" if value is not None else f"{'-':>14s}"

    width = max([12] + [len(names.get(k, k)) + 1 for k in results])
    print(f"\nafter {cfg.epochs} epochs on {cfg.data}: k-NN k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature:g}; "
          f"linear probe {cfg.eval.linear_epochs} epochs")
    print(f"{'method':{width}s}{'k-NN top-1 %':>14s}{'k-NN top-5 %':>14s}{'linear top-1 %':>16s}")
    for name, r in results.items():
        print(f"{names.get(name, name):{width}s}{cell(r, 'knn_top1')}{cell(r, 'knn_top5')}  {cell(r, 'linear_top1')}")
