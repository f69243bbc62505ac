"""StableRep (Tian et al., NeurIPS 2023, arXiv:2306.00984; docs/METHODS.md §3): multi-positive contrastive
learning on m generated views per source, then k-NN and linear probe against SimCLR on the real images.

    deepspeed recipes/stablerep.py                                          # CPU-sized, builtin:shapes
    deepspeed recipes/stablerep.py data=/my/images out=runs/mine preset=imagenet
    deepspeed recipes/stablerep.py stablerep.mode=real+synthetic            # the real image as one more positive
    deepspeed recipes/stablerep.py captions=caps.txt generator.pipeline=/models/sd15 data=/labelled/images

For source i, its m views (``stablerep.m``, all in one global batch, each augmented on its own) are
positives of each other; the loss is a cross-entropy against the target spread evenly over them
(models/stablerep.py). A source is one training image and its views are drawn by the E-LDM from the image's
embedding — the self-contained stand-in for the paper's "m images per caption"; with ``captions=FILE``
(one per line, or an ``image,caption`` CSV) and ``generator.pipeline=DIR`` (a local diffusers
text-to-image pipeline) a source is a caption and its views are m images of it (guidance
``generator.guidance``, default 8). ``generator.pipeline=DIR`` without captions: a local image-variation
pipeline makes the views of each training image (as recipes/mixdiff.py).

Stages under ``out=``, each skipped when finished with these settings and resumed when killed
(engine/pipeline.py):

  1. ``base/``       SimCLR on the real images (``data=``): the baseline of equal length, and the encoder
                     whose embeddings condition the E-LDM                              [or encoder=]
  2. ``eldm/``       autoencoder + E-LDM (none with ``generator.pipeline=DIR``)        [or eldm=]
  3. ``views.zarr``  ``generation.views_per_image`` (>= m) views per source           [or views=]
  4. ``stablerep/``  StableRep from scratch on the views (data/multiview_loader.py)
Then a table random init / SimCLR / StableRep on ``data=``, also in ``out/eval.json``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal

import torch

from genssl.data.augment import MultiCropSpec
from genssl.engine import pretrain
from genssl.engine.atomic import write_json_atomic
from genssl.engine.cli import run_main
from genssl.engine.config import ConfigError, parse_config, to_dict
from genssl.engine.distributed import cleanup, setup_distributed
from genssl.engine.pipeline import (pipeline_presets, print_table, run_stage, stage_eldm, stage_views, sub_config,
                                    supplied_encoder)
from genssl.engine.setup import load_data, train_loader
from genssl.engine.trainer import compute_dtype
from genssl.generators.text_to_image import DEFAULT_GUIDANCE, captions_fingerprint, generate_caption_views, read_captions
from genssl.generators.view_quality import report_path
from genssl.models.backbones import build_backbone
from genssl.models.stablerep import StableRepConfig, StableRepObjective, build_stablerep_student
from genssl.recipes import eldm as eldm_recipe
from genssl.recipes import generate_views as generation_recipe
from genssl.recipes import ssl_methods as ssl_recipe


@dataclasses.dataclass
class StableRepSection(StableRepConfig):
    """The loss and head (models/stablerep.py) and what a batch holds."""

    m: int = 6  # views per source in a batch: the official runs sample 6 of 10 images per caption (docs/METHODS.md §3)
    mode: Literal["synthetic", "real+synthetic"] = "synthetic"  # synthetic: the paper's setting
    batch_size: int = 0  # sources per rank in the StableRep stage (each brings its views); 0 = batch_size

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 0:
            raise ConfigError(f"stablerep.batch_size must be >= 0 (0: batch_size), got {self.batch_size}")
        if self.m < 2 and self.mode == "synthetic":
            raise ConfigError(f"stablerep.m must be >= 2 in the synthetic mode (the views are each other's positives), got {self.m}")
        if self.m < 1:
            raise ConfigError(f"stablerep.m must be >= 1, got {self.m}")


@dataclasses.dataclass
class StableRepGenerator(eldm_recipe.ELDMRecipeConfig):
    """recipes/eldm.py keys (the E-LDM stage), or ``pipeline=DIR``: a local diffusers pipeline (text-to-image
    with ``captions=``, image-variation without)."""

    pipeline: str = ""
    guidance: float = DEFAULT_GUIDANCE  # text-to-image classifier-free guidance w (paper: ≈ 8 best for this training)


@dataclasses.dataclass
class StableRepRecipeConfig(ssl_recipe.SSLRecipeConfig):
    """SimCLR's keys (the base stage; ``batch_size`` = sources per rank in the StableRep stage) + StableRep's."""

    out: str = "runs/stablerep"
    stablerep: StableRepSection = dataclasses.field(default_factory=StableRepSection)
    captions: str = ""  # text-to-image mode: one caption per line, or an image,caption CSV
    encoder: str = ""  # supply stage 1: a SimCLR run directory or its encoder.safetensors
    eldm: str = ""  # supply stage 2: an E-LDM run directory (recipes/eldm.py out=)
    views: str = ""  # supply stage 3: a view store made from these data (or captions)
    generator: StableRepGenerator = dataclasses.field(default_factory=StableRepGenerator)
    generation: generation_recipe.GenerateConfig = dataclasses.field(default_factory=generation_recipe.GenerateConfig)

    def validate(self) -> None:
        super().validate()
        if self.method != "simclr":
            raise ConfigError(f"StableRep's baseline is SimCLR (StableRep generalises its loss to m positives): "
                              f"leave method=simclr, got {self.method}")
        if self.crops.n_local:
            raise ConfigError("StableRep uses one crop per view: set crops.n_local=0")
        if not self.views and self.generation.views_per_image < self.stablerep.m:
            raise ConfigError(f"generation.views_per_image ({self.generation.views_per_image}) must be >= stablerep.m "
                              f"({self.stablerep.m}): each batch holds m views of each source")
        if self.captions and not (self.generator.pipeline or self.views):
            raise ConfigError("captions= needs generator.pipeline=DIR (a local diffusers text-to-image pipeline): the "
                              "E-LDM draws from image embeddings, not text")
        if self.captions and self.stablerep.mode != "synthetic":
            raise ConfigError("captions= has no real images to add: use stablerep.mode=synthetic")
        if self.generator.pipeline and self.eldm:
            raise ConfigError("give one generator: generator.pipeline= or eldm= (an E-LDM run)")


def presets() -> dict[str, dict]:
    """SimCLR's presets with the E-LDM and generation sections: m views per source, no interpolated views;
    StableRep's per-view augmentation as the official code (blur 0.5, no solarize, all views alike)."""
    out = pipeline_presets(ssl_recipe.presets_for("simclr"), interp_per_image=0)
    for name, preset in out.items():
        if name == "imagenet":  # 171 sources x 6 views x 8 ranks ≈ the official 8192 images per step
            preset["stablerep"] = {"m": 6, "batch_size": 171}
        else:  # CPU-sized: 4 views per source, SimCLR's small head and CIFAR temperature (recipes/ssl_methods.py)
            preset["stablerep"] = {"m": 4, "hidden_dim": 512, "out_dim": 128, "temperature": 0.5}
        preset["generation"] = {**preset["generation"], "views_per_image": preset["stablerep"]["m"]}
    return out


def stablerep_crops(spec: MultiCropSpec) -> MultiCropSpec:
    """The official StableRep augmentation per view: blur with probability 0.5, no solarize (the rest as ``spec``)."""
    return dataclasses.replace(spec, blur_p_global=(0.5,), solarize_p_global=(0.0,))


def stage_base(cfg: StableRepRecipeConfig, dist, data, ds_config, random_init) -> tuple[Path, dict | None]:
    if cfg.encoder:
        return supplied_encoder(cfg.encoder)
    bcfg = sub_config(ssl_recipe.SSLRecipeConfig, cfg, out=str(Path(cfg.out) / "base"))
    return Path(bcfg.out), run_stage(bcfg, dist, lambda: ssl_recipe.train_ssl(
        bcfg, dist, data, train_loader(data.train, bcfg.crops, bcfg, dist), ds_config, random_init))


def stage_caption_views(cfg: StableRepRecipeConfig, dist) -> Path:
    """m images per caption from the text-to-image pipeline into ``out/views.zarr`` (resumable, verified)."""
    if cfg.views:
        return Path(cfg.views)
    g, out = cfg.generation, Path(cfg.out) / "views.zarr"
    done = generate_caption_views(cfg.captions, cfg.generator.pipeline, out, dist, g.views_per_image, seed=cfg.seed,
                                  steps=g.steps, guidance=cfg.generator.guidance, image_size=g.image_size,
                                  batch_size=g.batch_size, dtype=generation_recipe._dtype(g.precision, dist.device),
                                  shard_size=g.shard_size, progress=cfg.log.progress)
    if dist.is_main:
        print(f"{out}: {done['n_sources']} captions x {g.views_per_image} views; wrote {done['written']} caption(s) "
              f"in {done['seconds']:.1f} s", flush=True)
    return out


def stage_stablerep(cfg: StableRepRecipeConfig, dist, data, views: Path, ds_config, random_init) -> dict | None:
    from genssl.data.multiview_loader import MultiViewLoader

    scfg = dataclasses.replace(cfg, out=str(Path(cfg.out) / "stablerep"),  # the whole config is its identity
                               batch_size=cfg.stablerep.batch_size or cfg.batch_size)
    on_gpu = dist.device.type == "cuda"
    fingerprint = captions_fingerprint(read_captions(cfg.captions)) if cfg.captions else None

    def train():
        loader = MultiViewLoader(views, stablerep_crops(cfg.crops), scfg.batch_size, dist.rank, dist.world_size, cfg.seed,
                                 m=cfg.stablerep.m, mode=cfg.stablerep.mode, index=None if cfg.captions else data.train,
                                 expect_fingerprint=fingerprint, device_id=dist.local_rank if on_gpu else None,
                                 num_threads=max(1, cfg.num_workers))
        torch.manual_seed(cfg.seed)  # the same backbone init as the SimCLR run (recipes/ssl_methods.initial_student)
        backbone = build_backbone(cfg.model, img_size=cfg.crops.global_size, stem_stride=cfg.stem_stride, width=cfg.width,
                                  patch_size=cfg.patch_size if cfg.model.startswith("vit") else None)
        student = build_stablerep_student(backbone, cfg.stablerep)
        objective = StableRepObjective(student, cfg.stablerep, loader.n_views, cfg.epochs, compute_dtype(cfg.precision))
        return pretrain.pretrain(scfg, dist, data, loader, student, objective, pretrain.student_backbone, ds_config,
                                 random_init)

    return run_stage(scfg, dist, train)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_config(argv, StableRepRecipeConfig, presets(), default_preset="smoke")
    cfg: StableRepRecipeConfig = args.config
    dist = setup_distributed(args.local_rank)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data, cfg.cache_dir, dist)

    # The floor: SimCLR and StableRep start from the same seeded backbone.
    base_cfg = sub_config(ssl_recipe.SSLRecipeConfig, cfg, out=str(Path(cfg.out) / "base"))
    random_init = pretrain.evaluate_random_init(lambda: ssl_recipe.initial_student(base_cfg), base_cfg, dist, data)
    encoder, base = stage_base(cfg, dist, data, args.deepspeed_config, random_init)
    if cfg.captions:
        views = stage_caption_views(cfg, dist)
    elif cfg.generator.pipeline:
        views = stage_views(cfg, dist, None, pipeline=cfg.generator.pipeline, encoder=str(encoder))
    else:  # no E-LDM is trained for a supplied view store
        views = stage_views(cfg, dist, None if cfg.views else stage_eldm(cfg, dist, encoder, args.deepspeed_config))
    results = {"random_init": random_init, "base": base,
               "stablerep": stage_stablerep(cfg, dist, data, views, args.deepspeed_config, random_init)}
    quality = report_path(views) if report_path(views).is_file() else None
    if dist.is_main:
        write_json_atomic(Path(cfg.out) / "eval.json", {**results, "mode": cfg.stablerep.mode, "m": cfg.stablerep.m,
                                                        "epochs": cfg.epochs, "captions": cfg.captions or None,
                                                        "view_quality": str(quality) if quality else None,
                                                        "config": to_dict(cfg)})
        print_table(results, cfg, {"random_init": "random init", "base": "SimCLR (real)",
                                   "stablerep": f"StableRep ({cfg.stablerep.mode}, m={cfg.stablerep.m})"})
        if quality:
            print(f"view-quality report of the synthetic views: {quality}")
        print(f"wrote {Path(cfg.out) / 'eval.json'}", flush=True)
    cleanup()
    return results


if __name__ == "__main__":
    run_main(main)
