"""Generate the synthetic views of a dataset with a trained E-LDM into a view store (docs/METHODS.md §1.4–1.5).

    python recipes/generate_views.py eldm=runs/eldm out=runs/views.zarr            # CPU-sized defaults
    torchrun --nproc_per_node 8 recipes/generate_views.py preset=imagenet eldm=runs/eldm256 \\
        data=/data/imagenet out=runs/views256.zarr views_per_image=1 interp_per_image=1 \\
        sampler=dpmpp_2m steps=20 guidance=2 backend=compile batch_size=64 seed=0 contact_sheet=runs/views.png
    deepspeed --num_gpus 8 recipes/generate_views.py ...                            # same, DeepSpeed launcher

For source image i of ``data=`` (its train split, in index order): ``views_per_image`` = K views from
``e_i`` and ``interp_per_image`` = J interpolated views from ``slerp(e_i, e_p; α)`` (partner p and α
drawn per source), written by :func:`genssl.generators.job.run_generation`. The embeddings are the
E-LDM's own (``eldm/generator.json`` names the encoder, its file hash and preprocessing; the
embedding cache of the E-LDM run is reused when the data are the same), the autoencoder is the one
the E-LDM was trained with (hash checked).

Every rank writes its own shards (shard s belongs to rank s % world_size); a rerun — after a crash or
``kill -9`` — skips finished sources and completes the store; a finished store makes the rerun a
no-op. A store made from other data or by another generator is refused (the view store's message).
``pipeline=DIR`` instead of ``eldm=``: a local diffusers image-variation pipeline folder (e.g. Stable
Diffusion image variations, MixDiff's generator: :mod:`genssl.generators.image_variation`) makes the K
views of each source from the source image itself (``steps``, ``guidance``, ``batch_size``,
``precision`` apply; ``image_size=`` the views' side; interpolated views slerp the CLIP image
embeddings; the quality report needs ``encoder=``, an encoder to judge the views).

``verify=true`` first checks the existing store (every rank its own shards: the crc32c of every chunk,
and that every source marked done has its chunk files), prints a summary, marks the sources of each
damaged chunk not done and deletes the chunk, so this run regenerates them (byte-identical to the
undamaged store); a loader's ``STORE.damage.json`` is then superseded and removed. It reads the
whole store once. The pipelines' generation stage (engine/pipeline.py ``stage_views``) always verifies.

``backend=`` ``eager`` | ``compile`` | ``cudagraphs`` | ``tensorrt``: one that cannot run here fails at
start, naming those that can. ``contact_sheet=PATH.png`` writes a grid of random sources at the end.

At the end (``report=true``, the default) the view-quality report of the store is printed and written
to ``STORE.quality.json`` (:mod:`genssl.generators.view_quality`: cosine of ``report_sources`` sources'
views to their source, k-NN label agreement, per-α cosines of the interpolated views, random-pair
baseline); a complete store's rerun prints the saved report, so ``python recipes/generate_views.py
eldm=… out=STORE.zarr`` is also how to see it again.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from genssl.data.viewstore import ViewStoreError, open_view_store
from genssl.engine.cli import run_main
from genssl.engine.config import ConfigError, parse_config
from genssl.engine.distributed import DistInfo, barrier, broadcast_object, cleanup, gather_objects, setup_distributed
from genssl.engine.setup import load_data
from genssl.generators.autoencoder import autoencoder_hash, load_pretrained_autoencoder
from genssl.generators.eldm import load_eldm
from genssl.generators.job import DEFAULT_ALPHAS, contact_sheet, format_verification, run_generation, verify_store
from genssl.generators.conditioning import EmbeddingStats
from genssl.generators.foreground import (MAX_NOISE_LEVEL, NOISE_LEVEL_BINS, adaptive_noise_level,
                                          dataset_foreground_proportions, load_token_encoder, noise_level_histogram,
                                          token_encoder_hash)
from genssl.generators.samplers import GuidedSampler
from genssl.generators.training import EncoderInput, cached_embeddings
from genssl.generators.view_quality import format_report, store_noise_levels, store_quality_report
from genssl.recipes.eldm import GENERATOR_FILE, resolve_eldm_dir


@dataclasses.dataclass
class GenerateConfig:
    eldm: str = ""  # E-LDM run directory (recipes/eldm.py out=), its eldm/ folder or eldm.safetensors
    pipeline: str = ""  # instead of eldm=: a local diffusers image-variation pipeline folder (MixDiff)
    image_size: int = 0  # pipeline= only: side of the views; 0 = the pipeline's own
    data: str = ""  # the images to make views of (their train split); default: the E-LDM's training data
    out: str = "runs/views.zarr"  # the view store
    views_per_image: int = 1  # K
    interp_per_image: int = 1  # J
    sampler: Literal["ddim", "dpmpp_2m"] = "dpmpp_2m"
    steps: int = 20
    guidance: float = 2.0
    backend: Literal["eager", "compile", "cudagraphs", "tensorrt"] = "eager"
    attention: Literal["auto", "sdpa", "xformers"] = "auto"  # E-LDM UNet attention (generators/eldm.set_unet_attention)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # UNet step dtype; auto = bf16 on CUDA, fp32 on CPU
    batch_size: int = 16  # images per sampler call (per rank)
    seed: int = 0  # base seed: every view's noise, partner and α derive from (seed, source, view)
    noise: Literal["fixed", "adaptive"] = "fixed"  # GenView noise on the K views' condition (docs/METHODS.md §2.2)
    noise_level: int = 0  # noise=fixed: the level of every view (0 = none)
    foreground_encoder: str = ""  # noise=adaptive: the frozen encoder; "" = the E-LDM's own stage-1 encoder
    foreground_size: int = 0  # noise=adaptive: the side images are encoded at; 0 = the encoder's own
    foreground_sample: int = 10_000  # noise=adaptive: images of the PCA fit (the paper: 10,000)
    foreground_fraction: float = 0.4  # noise=adaptive: share of the sample's tokens counted foreground (paper App. A)
    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # interpolation weights on the source itself
    shard_size: int = 1024  # sources per shard: one file per array, the unit one rank owns
    view_format: Literal["jpeg", "png", "webp"] = "jpeg"  # how views are stored (png, webp: lossless)
    view_quality: int = 95  # JPEG quality of the stored views (view_format=jpeg)
    contact_sheet: str = ""  # PNG path: a grid of random finished sources at the end
    contact_n: int = 16
    tensorboard: bool = True  # the contact sheet also as a TensorBoard image in the store's parent folder
    encoder: str = ""  # override the encoder path recorded by the E-LDM (its file hash must match)
    autoencoder: str = ""  # override the autoencoder path recorded by the E-LDM (its hash must match)
    cache_dir: str = ""  # default $GENSSL_CACHE or ~/.cache/genssl
    num_workers: int = 2
    embed_batch_size: int = 64
    progress: bool = True
    report: bool = True  # the view-quality report at the end (printed; written to STORE.quality.json)
    report_sources: int = 256  # sources sampled for the report (all their views are embedded)
    verify: bool = False  # check every chunk of an existing store first and regenerate the damaged sources

    def validate(self) -> None:
        if self.views_per_image < 0 or self.interp_per_image < 0 or self.views_per_image + self.interp_per_image < 1:
            raise ConfigError("views_per_image and interp_per_image must be >= 0 and not both 0")
        if self.steps < 1 or self.batch_size < 1 or self.shard_size < 1 or self.contact_n < 1 or self.report_sources < 1:
            raise ConfigError("steps, batch_size, shard_size, contact_n and report_sources must be >= 1")
        if not all(0.0 < a < 1.0 for a in self.alphas):
            raise ConfigError(f"alphas must lie in (0, 1), got {self.alphas}")
        if self.attention == "xformers" and self.backend != "eager":
            raise ConfigError(f"attention=xformers runs with backend=eager only; backend={self.backend} compiles or "
                              "exports the UNet: use attention=sdpa or auto")
        if not 1 <= self.view_quality <= 100:
            raise ConfigError(f"view_quality is a JPEG quality in 1..100, got {self.view_quality}")
        if self.noise_level < 0:
            raise ConfigError(f"noise_level must be >= 0, got {self.noise_level}")
        if self.noise == "adaptive" and self.noise_level:
            raise ConfigError(f"noise=adaptive gives each image its own level: drop noise_level={self.noise_level} "
                              "(or use noise=fixed)")
        if self.noise == "adaptive" and self.pipeline:
            raise ConfigError("noise=adaptive noises the E-LDM's condition: it needs eldm=, not pipeline=")
        if self.foreground_sample < 1 or self.foreground_size < 0 or not 0.0 < self.foreground_fraction < 1.0:
            raise ConfigError("foreground_sample must be >= 1, foreground_size >= 0 (0: the encoder's own side) and "
                              f"foreground_fraction in (0, 1), got {self.foreground_sample}, {self.foreground_size}, "
                              f"{self.foreground_fraction}")
        if self.image_size < 0:
            raise ConfigError(f"image_size must be >= 0 (0: the pipeline's own), got {self.image_size}")


PRESETS = {
    # CPU-sized: few steps, small calls.
    "smoke": {"steps": 10, "batch_size": 16, "backend": "eager"},
    # 256² views on GPUs: DPM-Solver++ 20 steps, bf16, torch.compile'd step (tensorrt: see docs/GENERATORS.md).
    "imagenet": {"steps": 20, "batch_size": 64, "sampler": "dpmpp_2m", "backend": "compile", "precision": "bf16"},
}


class GenerationError(RuntimeError):
    """A start-up failure reported as a message (no traceback)."""


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise GenerationError("precision=fp16 needs a CUDA GPU; use precision=fp32 or bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _load_generator(cfg: GenerateConfig, dist: DistInfo):
    eldm_dir = resolve_eldm_dir(cfg.eldm)
    gen_file = eldm_dir / GENERATOR_FILE
    if not gen_file.is_file():
        raise GenerationError(f"{eldm_dir} has no {GENERATOR_FILE} (written by recipes/eldm.py: it names the encoder and "
                              "autoencoder the E-LDM was trained with)")
    gen = json.loads(gen_file.read_text())
    eldm = load_eldm(eldm_dir).to(dist.device).eval()
    eldm.set_attention(cfg.attention if cfg.backend == "eager" else "sdpa")
    ae_path = cfg.autoencoder or gen["autoencoder"]["path"]
    try:
        ae = load_pretrained_autoencoder(ae_path).to(dist.device).float().eval()
    except (FileNotFoundError, ValueError) as e:
        raise GenerationError(f"the E-LDM's autoencoder could not be loaded: {e}; pass autoencoder=PATH") from None
    h = autoencoder_hash(ae)
    if h != gen["autoencoder"]["hash"]:
        raise GenerationError(f"the autoencoder at {ae_path} has hash {h[:16]}…, but the E-LDM in {eldm_dir} was trained "
                              f"with {gen['autoencoder']['hash'][:16]}…; pass autoencoder= the one it was trained with")
    return eldm_dir, gen, eldm, ae


@dataclasses.dataclass
class _Generator:
    """What `generate` needs of a generator: the images, the sampler, and the conditions, built only
    when some source still needs views (``embeddings() -> (embeddings for run_generation, store attrs)``)."""

    index: object  # DatasetIndex
    sampler: object
    embeddings: Callable[[], tuple[object, dict]]
    report_encoder: str  # the encoder that judges the views in the quality report
    report_input: EncoderInput | None


def _eldm_generator(cfg: GenerateConfig, dist: DistInfo) -> _Generator:
    eldm_dir, gen, eldm, ae = _load_generator(cfg, dist)
    data_spec = cfg.data or gen["data"]
    index = load_data(data_spec, cfg.cache_dir, dist).train
    if dist.is_main and gen.get("data_fingerprint") not in (None, index.fingerprint):
        print(f"note: the E-LDM was trained on data {gen.get('data')} with fingerprint {str(gen.get('data_fingerprint'))[:16]}…; "
              f"generating views of {data_spec} (fingerprint {index.fingerprint[:16]}…)", flush=True)
    from genssl.data.index import default_cache_dir

    try:  # a backend that cannot run here fails now, with the library's message
        sampler = GuidedSampler(eldm, ae, scheduler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance,
                                backend=cfg.backend, device=dist.device, dtype=_dtype(cfg.precision, dist.device),
                                max_batch=cfg.batch_size, cache_dir=default_cache_dir(cfg.cache_dir or None) / "trt")
    except (RuntimeError, ValueError) as e:
        raise GenerationError(str(e)) from None

    def embeddings():
        spec = EncoderInput.from_dict(gen["encoder"]["input"])
        embeddings, enc = cached_embeddings(cfg.encoder or gen["encoder"]["path"], index, dist, batch_size=cfg.embed_batch_size,
                                            num_threads=cfg.num_workers, cache_dir=cfg.cache_dir,
                                            log=print if dist.is_main else None, input_spec=spec)
        if enc["sha256"] != gen["encoder"]["sha256"]:
            raise GenerationError(f"the encoder at {enc['path']} (sha256 {enc['sha256'][:16]}…) is not the one the E-LDM "
                                  f"was trained with ({gen['encoder']['sha256'][:16]}…); pass encoder= that file")
        # GenView's condition noise standardises with the data set's embedding statistics (METHODS §2.2)
        sampler.condition_stats = EmbeddingStats.from_embeddings(embeddings)
        return embeddings, _eldm_attrs(eldm_dir, gen, data_spec, enc)

    return _Generator(index, sampler, embeddings, cfg.encoder or gen["encoder"]["path"],
                      EncoderInput.from_dict(gen["encoder"]["input"]))


def _eldm_attrs(eldm_dir: Path, gen: dict, data_spec: str, enc: dict) -> dict:
    return {"eldm": str(eldm_dir.resolve()), "eldm_hash": gen.get("eldm_hash"), "data": data_spec,
            "encoder": {"path": enc["path"], "sha256": enc["sha256"], "input": enc["input"]}}


def _pipeline_generator(cfg: GenerateConfig, dist: DistInfo) -> _Generator:
    """A local diffusers image-variation pipeline conditioned on each source image (MixDiff, docs/METHODS.md §4)."""
    from genssl.engine.export import load_encoder
    from genssl.generators.image_variation import ImageVariationSampler
    from genssl.generators.training import encoder_input

    if not cfg.data:
        raise ConfigError("pipeline= needs data= (the images to make views of)")
    index = load_data(cfg.data, cfg.cache_dir, dist).train
    try:
        sampler = ImageVariationSampler(cfg.pipeline, steps=cfg.steps, guidance=cfg.guidance, image_size=cfg.image_size,
                                        device=dist.device, dtype=_dtype(cfg.precision, dist.device), max_batch=cfg.batch_size)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    report_input = None
    if cfg.report:  # the views are judged by an encoder of the user's: its own preprocessing
        if not cfg.encoder:
            raise ConfigError("with pipeline=, the view-quality report needs encoder= (a trained encoder to judge the "
                              "views, e.g. a recipes/ssl_methods.py run); or pass report=false")
        report_input = encoder_input(load_encoder(cfg.encoder)[1])
    attrs = {"pipeline": str(Path(cfg.pipeline).resolve()), "data": cfg.data}
    return _Generator(index, sampler, lambda: (sampler.embed_sources(index), attrs), cfg.encoder,
                      report_input)


@dataclasses.dataclass
class _Noise:
    """The K views' condition noise: ``identity`` joins the store's sampler settings (None: no noise,
    as stores made before ``noise=`` existed record it), ``levels()`` gives ``run_generation``'s
    ``noise_levels`` and is called only when some source still needs views (collective)."""

    identity: dict | None
    levels: Callable[[], object]


def _noise(cfg: GenerateConfig, source: _Generator, dist: DistInfo) -> _Noise:
    if cfg.noise == "fixed":
        return _Noise({"mode": "fixed", "level": cfg.noise_level} if cfg.noise_level else None,
                      lambda: cfg.noise_level or None)
    spec = cfg.foreground_encoder or source.report_encoder  # default: the E-LDM's own stage-1 encoder
    try:
        encoder, encoder_hash = load_token_encoder(spec, "cpu", cfg.foreground_size), token_encoder_hash(spec)
    except (ValueError, FileNotFoundError) as e:
        raise GenerationError(f"foreground_encoder={spec}: {e}") from None
    identity = {"mode": "adaptive", "encoder_sha256": encoder_hash, "size": encoder.input_size,
                "sample": cfg.foreground_sample, "fraction": cfg.foreground_fraction, "bins": NOISE_LEVEL_BINS,
                "max_level": MAX_NOISE_LEVEL}

    def levels() -> np.ndarray:  # l_i = adaptive_noise_level(p_i) of every source (docs/METHODS.md §2.1–2.2)
        try:
            p = dataset_foreground_proportions(encoder.to(dist.device), encoder_hash, source.index, dist,
                                               cfg.foreground_sample, cfg.seed, cfg.foreground_fraction,
                                               cfg.embed_batch_size, cfg.num_workers, cfg.cache_dir,
                                               log=print if dist.is_main else None)
        except ValueError as e:
            raise GenerationError(f"noise=adaptive: {e} (foreground_size= sets the side the encoder sees)") from None
        encoder.cpu()  # the generator needs the device memory now
        return adaptive_noise_level(np.asarray(p))

    return _Noise(identity, levels)


def _check_noise(store_path: Path, identity: dict | None) -> None:
    """Refuse an existing store whose views were drawn with other noise settings, before anything is touched."""
    if not (store_path / "zarr.json").is_file():
        return
    try:
        stored = open_view_store(store_path, "r").sampler_settings.get("noise")
    except ViewStoreError:
        return  # the store's own checks below name what is wrong
    if stored != json.loads(json.dumps(identity)):
        raise GenerationError(f"view store {store_path} holds views drawn with noise settings {stored or 'none (level 0)'}, "
                              f"this run asks for {identity or 'none (level 0)'}; rerun with the store's noise=, "
                              f"noise_level= and foreground_* keys, or use a new out= (or delete the store) for these")


def generate(cfg: GenerateConfig, dist: DistInfo) -> dict:
    """Run this rank's part; returns the summed report (on every rank)."""
    if bool(cfg.eldm) == bool(cfg.pipeline):
        raise ConfigError("name one generator: eldm= (the out= directory of a recipes/eldm.py run) or pipeline= (a local "
                          "diffusers image-variation pipeline folder)")
    source = _pipeline_generator(cfg, dist) if cfg.pipeline else _eldm_generator(cfg, dist)
    index, sampler = source.index, source.sampler
    generator_hash = sampler.generator_hash()
    noise = _noise(cfg, source, dist)

    store_path = Path(cfg.out)
    _check_noise(store_path, noise.identity)
    verified = _verify(cfg, dist, store_path, index.fingerprint, generator_hash) if cfg.verify else None
    complete = False
    if dist.is_main and (store_path / "zarr.json").is_file():
        try:
            store = open_view_store(store_path, "r", expect_fingerprint=index.fingerprint,
                                    expect_generator_hash=generator_hash)
            complete = not store.missing()
        except ViewStoreError as e:
            complete = e
    complete = broadcast_object(complete)
    if isinstance(complete, Exception):
        raise GenerationError(str(complete))

    if complete:  # run_generation only validates the store (layout, sampler settings) and skips every source
        def embeddings(idx):
            raise AssertionError("the store is complete: no embedding is needed")

        attrs, levels = {}, None  # a complete store keeps the attributes it was created with
    else:
        embeddings, attrs = source.embeddings()
        levels = noise.levels()
    settings = dict(getattr(sampler, "settings", {}))
    try:
        report = run_generation(
            store_path, len(index), embeddings, sampler, fingerprint=index.fingerprint, rank=dist.rank,
            world_size=dist.world_size, K=cfg.views_per_image, J=cfg.interp_per_image, base_seed=cfg.seed,
            noise_levels=levels, batch_size=cfg.batch_size, alphas=cfg.alphas, generator_hash=generator_hash,
            sampler_settings={**settings, "noise": noise.identity} if noise.identity else settings,
            shard_size=cfg.shard_size, progress=cfg.progress and dist.is_main, extra_attrs=attrs,
            view_format=cfg.view_format, view_quality=cfg.view_quality)
    except ViewStoreError as e:
        raise GenerationError(str(e)) from None

    reports = gather_objects(report)
    total = {"views": sum(r["views"] for r in reports), "written": sum(len(r["written"]) for r in reports),
             "skipped": sum(r["skipped"] for r in reports), "seconds": max(r["seconds"] for r in reports),
             "world_size": dist.world_size, "n_sources": len(index)}
    total["views_per_s"] = total["views"] / total["seconds"] if total["seconds"] > 0 else 0.0
    if verified is not None:
        total["verify"] = verified
    if dist.is_main:
        store = open_view_store(store_path, "r")
        missing = len(store.missing())
        total["missing"] = missing
        if total["written"] == 0 and missing == 0:
            print(f"{store_path}: complete ({len(index)} sources), nothing to do", flush=True)
        else:
            print(f"{store_path}: wrote {total['written']} source(s) / {total['views']} view(s) in "
                  f"{total['seconds']:.1f} s ({total['views_per_s']:.2f} views/s over {dist.world_size} rank(s)); "
                  f"{len(index) - missing}/{len(index)} sources done", flush=True)
        if noise.identity:
            print(f"noise levels of the views: {noise_level_histogram(store_noise_levels(store))}", flush=True)
        if cfg.contact_sheet:
            board = store_path.resolve().parent if cfg.tensorboard else None
            path = contact_sheet(store_path, cfg.contact_sheet, n=cfg.contact_n, seed=cfg.seed, tensorboard_dir=board)
            print(f"contact sheet: {path}" + (f" (and TensorBoard image views/contact_sheet in {board})" if board else ""),
                  flush=True)
    if cfg.report:  # every rank: the embedding cache is collective; rank 0 computes the report
        try:
            total["quality"] = store_quality_report(
                store_path, index, dist, encoder=source.report_encoder, input_spec=source.report_input,
                n_sources=cfg.report_sources, seed=cfg.seed,
                batch_size=cfg.embed_batch_size, num_threads=cfg.num_workers, cache_dir=cfg.cache_dir,
                log=print if dist.is_main else None)
        except ValueError as e:
            raise GenerationError(f"view-quality report: {e} (or pass report=false)") from None
        if dist.is_main:
            print(format_report(total["quality"]), flush=True)
    barrier()
    return total


def _verify(cfg: GenerateConfig, dist: DistInfo, store_path: Path, fingerprint: str, generator_hash: str) -> dict | None:
    """``verify=true``: each rank checks and repairs its shards; the main rank prints the summary. None
    when there is no store yet."""
    if not (store_path / "zarr.json").is_file():
        return None
    try:
        report = verify_store(store_path, dist.rank, dist.world_size, fingerprint=fingerprint,
                              generator_hash=generator_hash)
    except ViewStoreError as e:
        raise GenerationError(str(e)) from None
    reports = gather_objects(report)  # also: every rank has repaired before rank 0 reads the flags
    invalidated = sorted({i for r in reports for i in r["invalidated"]})
    if dist.is_main:
        print(format_verification(store_path, reports), flush=True)
        damage_report = Path(str(store_path) + ".damage.json")
        if damage_report.is_file():  # what training met is now either repaired or found whole
            damage_report.unlink()
            print(f"removed {damage_report} (superseded by this verification)", flush=True)
    return {"damaged": [d for r in reports for d in r["damaged"]], "invalidated": invalidated}


def main(argv: list[str] | None = None) -> dict:
    args = parse_config(argv, GenerateConfig, PRESETS, default_preset="smoke")
    dist = setup_distributed(args.local_rank)
    try:
        total = generate(args.config, dist)
    except (GenerationError, ConfigError) as e:
        if dist.is_main:
            print(f"generate_views: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    cleanup()
    return total


if __name__ == "__main__":
    run_main(main)
