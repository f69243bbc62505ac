"""GenView (Li et al., "GenView: Enhancing View Quality with Pretrained Generative Model for Self-Supervised
Learning", ECCV 2024, arXiv:2403.12003; docs/METHODS.md §2): a base method whose second view of each image is
a generated view drawn at the image's adaptive noise level, with pairs weighted by their quality (QDC).

    deepspeed recipes/genview.py method=mocov3                      # CPU-sized, builtin:shapes
    deepspeed recipes/genview.py method=mocov2 data=/my/images out=runs/mine preset=imagenet
    deepspeed recipes/genview.py genview.qdc=false                  # adaptive views only (ablation)
    deepspeed recipes/genview.py gen=off                            # the base method alone

For image x, augmentations t, t' and its generated view x̃ (condition noised at level
l(x) = 100·min(⌊p(x)/0.2⌋, 4), p the foreground proportion): per sample with probability ``genview.p``
(paper: 1.0) the pair is (t(x), t'(x̃)), and the loss is ``(1/B) Σ w_i ℓ_i`` with ``w = B·softmax(q)``
the QDC weights of a frozen scorer (models/qdc.py). ``method=mocov2|mocov3|byol|simsiam|swav|simclr``.

Stages under ``out=``, each skipped when finished with these settings and resumed when killed
(engine/pipeline.py):

  1. ``base/``       the method on real views: the baseline of equal length, and the frozen encoder
                     that conditions the E-LDM, estimates the foreground and scores the pairs [or encoder=]
  2. ``eldm/``       autoencoder + E-LDM                                               [or eldm=]
  3. ``views.zarr``  one view per image at its adaptive noise level (``generation.noise=adaptive``) [or views=]
  4. ``genview/``    the method from scratch on (real, generated) pairs with QDC weights
Then a table random init / base / GenView, also in ``out/eval.json`` as ``{"random_init", "base", "genview"}``
(``genview.qdc``: the scorer's weight statistics; ``noise_levels``: the store's level histogram).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal

import torch

from genssl.data.viewstore import open_view_store
from genssl.engine import pretrain
from genssl.engine.atomic import write_json_atomic
from genssl.engine.cli import run_main
from genssl.engine.config import ConfigError, parse_config, to_dict
from genssl.engine.distributed import broadcast_object, cleanup, setup_distributed
from genssl.engine.pipeline import (pipeline_presets, print_table, real_synthetic_loader, run_stage, stage_eldm,
                                    stage_views)
from genssl.engine.setup import load_data
from genssl.generators.foreground import ForegroundPCA, fit_dataset_pca, load_token_encoder, noise_level_histogram
from genssl.generators.view_quality import report_path, store_noise_levels
from genssl.models.qdc import QDCScorer
from genssl.recipes import eldm as eldm_recipe
from genssl.recipes import generate_views as generation_recipe
from genssl.recipes import ssl_methods as ssl_recipe
from genssl.recipes.mixdiff import method_config, stage_base

METHODS = ("mocov2", "mocov3", "byol", "simsiam", "swav", "simclr")  # the paper's five, and SimCLR


@dataclasses.dataclass
class GenViewSettings:
    p: float = 1.0  # per sample, probability that view 2 is the generated view (paper: 1.0, its Tab. 8)
    qdc: bool = True  # false: unweighted pairs (the ablation without the quality-driven loss)
    scorer: str = ""  # the frozen QDC scorer: "" = the stage-1 encoder; or a local timm / open_clip folder
    scorer_size: int = 0  # side the scorer sees the crops at (resized); 0 = as they come
    scorer_sample: int = 10_000  # images of the scorer's PCA fit (paper: 10,000)

    def validate(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"genview.p is a probability and must be in [0, 1], got {self.p}")
        if self.scorer_size < 0 or self.scorer_sample < 1:
            raise ConfigError(f"genview.scorer_size must be >= 0 and genview.scorer_sample >= 1, got "
                              f"{self.scorer_size}, {self.scorer_sample}")


@dataclasses.dataclass
class GenViewConfig(ssl_recipe.SSLRecipeConfig):
    """The method's keys (shared by base/ and genview/, so both runs are of equal length) + the pipeline's."""

    out: str = "runs/genview"
    method: Literal["mocov2", "mocov3", "byol", "simsiam", "swav", "simclr"] = "mocov3"
    gen: Literal["on", "off"] = "on"  # off: base/ only (the baseline)
    genview: GenViewSettings = dataclasses.field(default_factory=GenViewSettings)
    encoder: str = ""  # supply stage 1: a run directory of this method or its encoder.safetensors
    eldm: str = ""  # supply stage 2: an E-LDM run directory (recipes/eldm.py out=)
    views: str = ""  # supply stage 3: a view store made from this data
    generator: eldm_recipe.ELDMRecipeConfig = dataclasses.field(default_factory=eldm_recipe.ELDMRecipeConfig)
    generation: generation_recipe.GenerateConfig = dataclasses.field(default_factory=generation_recipe.GenerateConfig)

    def validate(self) -> None:
        super().validate()
        if self.genview.p > 0 and self.crops.n_global < 2:
            raise ConfigError(f"GenView replaces view 2 (global crop 1) by the generated one: set crops.n_global=2, "
                              f"got {self.crops.n_global}")


def presets_for(method: str) -> dict[str, dict]:
    """The method's presets with the E-LDM and generation sections: one view per image at its adaptive
    level, no interpolated views. At 32 px (every preset but imagenet) the encoders see 64 px images, so
    a ResNet's last feature map is 4×4 tokens, enough for a foreground map (2×2 at 32 px is not)."""
    out = pipeline_presets(ssl_recipe.presets_for(method), views_per_image=1, interp_per_image=0, noise="adaptive")
    for name, preset in out.items():
        if name != "imagenet":
            preset["generation"]["foreground_size"] = 64
            preset["genview"] = {"scorer_size": 64}
    return out


class RecordingScorer(QDCScorer):
    """A :class:`QDCScorer` that also keeps the statistics of the weights it gave (this process, rank 0's
    in ``eval.json``): pairs weighted, mean per-batch std of ``w``, smallest and largest ``w``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs, self.batches = 0, 0
        self._stats = None  # device tensor [std sum, min, max]: no host sync inside the training loop

    @torch.no_grad()
    def weights(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        w = super().weights(view1, view2)
        std, lo, hi = w.std(correction=0), w.min(), w.max()
        if self._stats is None:
            self._stats = torch.stack([std, lo, hi])
        else:
            self._stats = torch.stack([self._stats[0] + std, torch.minimum(self._stats[1], lo),
                                       torch.maximum(self._stats[2], hi)])
        self.pairs, self.batches = self.pairs + w.numel(), self.batches + 1
        return w

    forward = weights

    def summary(self) -> dict:
        if self._stats is None:
            return {"pairs": 0, "weight_std": 0.0, "weight_min": None, "weight_max": None}
        std_sum, lo, hi = self._stats.tolist()
        return {"pairs": self.pairs, "weight_std": std_sum / self.batches, "weight_min": lo, "weight_max": hi}


def quality_scorer(cfg: GenViewConfig, dist, data, encoder: Path) -> RecordingScorer:
    """The frozen scorer (``genview.scorer``, default the stage-1 encoder) with its PCA, fit by rank 0 on
    ``genview.scorer_sample`` training images; it sees the views as the objective does (normalised
    with ``crops.mean/std``, re-normalised to the scorer's own)."""
    g = cfg.genview
    tokens = load_token_encoder(g.scorer or encoder, dist.device, g.scorer_size)
    state = None
    if dist.is_main:
        try:
            state = fit_dataset_pca(tokens, data.train, dist.device, g.scorer_sample, cfg.seed,
                                    num_threads=max(1, cfg.num_workers)).state_dict()
        except ValueError as e:  # raised on every rank below
            state = ConfigError(f"the QDC scorer's PCA: {e} (genview.scorer_size= sets the side the scorer sees)")
    state = broadcast_object(state)
    if isinstance(state, Exception):
        raise state
    return RecordingScorer(tokens, ForegroundPCA.from_state_dict(state), cfg.crops.mean, cfg.crops.std).to(dist.device)


def stage_genview(cfg: GenViewConfig, dist, data, views: Path, encoder: Path, ds_config, random_init) -> dict | None:
    # The whole config is the stage's identity (and its checkpoints'): p, qdc, scorer and generation keys.
    gcfg = dataclasses.replace(cfg, out=str(Path(cfg.out) / "genview"))

    def train() -> dict:
        scorer = quality_scorer(cfg, dist, data, encoder) if cfg.genview.qdc else None
        loader = real_synthetic_loader(cfg, dist, data.train, views, cfg.crops, cfg.genview.p)
        result = ssl_recipe.train_ssl(gcfg, dist, data, loader, ds_config, random_init, quality_scorer=scorer)
        return {**result, "qdc": scorer.summary() if scorer else None}

    return run_stage(gcfg, dist, train)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    method = ssl_recipe.method_of(argv, GenViewConfig.method, METHODS)
    args = parse_config(argv, GenViewConfig, presets_for(method), default_preset="smoke")
    cfg: GenViewConfig = args.config
    dist = setup_distributed(args.local_rank)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data, cfg.cache_dir, dist)

    # The floor: the base method and GenView start from the same seeded random init.
    base_cfg = method_config(cfg, Path(cfg.out) / "base")
    random_init = pretrain.evaluate_random_init(lambda: ssl_recipe.initial_student(base_cfg), base_cfg, dist, data)
    encoder, base = stage_base(cfg, dist, data, args.deepspeed_config, random_init)
    results, quality, levels = {"random_init": random_init, "base": base}, None, None
    if cfg.gen == "on":  # no E-LDM is trained for a supplied view store
        views = stage_views(cfg, dist, None if cfg.views else stage_eldm(cfg, dist, encoder, args.deepspeed_config))
        results["genview"] = stage_genview(cfg, dist, data, views, encoder, args.deepspeed_config, random_init)
        quality = report_path(views) if report_path(views).is_file() else None
        levels = noise_level_histogram(store_noise_levels(open_view_store(views, "r"))) if dist.is_main else None
    if dist.is_main:
        write_json_atomic(Path(cfg.out) / "eval.json", {**results, "method": cfg.method, "epochs": cfg.epochs,
                                                        "noise_levels": levels,
                                                        "view_quality": str(quality) if quality else None,
                                                        "config": to_dict(cfg)})
        name = ssl_recipe.NAMES[cfg.method]
        print_table(results, cfg, {"random_init": "random init", "base": name, "genview": f"GenView ({name})"})
        if levels:
            print(f"noise levels of the generated views: {levels}")
        if quality:
            print(f"view-quality report of the generated views: {quality}")
        print(f"wrote {Path(cfg.out) / 'eval.json'}", flush=True)
    cleanup()
    return results


if __name__ == "__main__":
    run_main(main)
