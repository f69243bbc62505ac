"""The image-variation generator (generators/image_variation.py, docs/METHODS.md §4) on a tiny, randomly
initialised Stable-Diffusion image-variation pipeline built here: its denoising loop equals diffusers'
own pipeline, views depend on (embedding, seed) alone, and a folder that is not a pipeline is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from genssl.generators.image_variation import ImageVariationSampler, load_image_variation_pipeline  # noqa: E402


def build_tiny_pipeline(folder: Path, sample_size: int = 8) -> Path:
    """A randomly initialised image-variation pipeline (views of ``2·sample_size`` px) saved to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, projection_dim=16, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=32, image_size=32,
                                                             patch_size=8))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False)
    pipe = StableDiffusionImageVariationPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                                 safety_checker=None, feature_extractor=processor,
                                                 requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("image_variation"))


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(24 + 4 * i, 40 - 2 * i, 3), dtype=np.uint8) for i in range(n)]


def test_the_loop_is_diffusers_own_pipeline(tiny_pipeline: Path) -> None:
    sampler = ImageVariationSampler(tiny_pipeline, steps=3, guidance=3.0)
    images = _images(2)
    e = sampler.embed(images)
    ours = sampler([*e], seeds=[5, 6])
    # The reference: the library's pipeline, fed the same preprocessed images and initial noise.
    clip = torch.stack([torch.nn.functional.interpolate(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255,
                                                        size=(32, 32), mode="bicubic", align_corners=False)[0]
                        for im in images])
    clip = (clip - sampler.clip_mean) / sampler.clip_std
    pipe = load_image_variation_pipeline(tiny_pipeline)
    ref = pipe(clip, latents=sampler.initial_latents([5, 6]) * pipe.scheduler.init_noise_sigma, num_inference_steps=3,
               guidance_scale=3.0, output_type="np").images  # [B, H, W, 3] float in [0, 1]
    assert ours.dtype == np.uint8 and ours.shape == (2, 16, 16, 3)
    assert np.abs(ours.astype(np.int64) - np.round(ref * 255).astype(np.int64)).max() <= 1


def test_a_view_depends_on_its_embedding_and_seed_alone(tiny_pipeline: Path) -> None:
    sampler = ImageVariationSampler(tiny_pipeline, steps=2, guidance=3.0, max_batch=2)
    e = sampler.embed(_images(3))
    batch = sampler(e, seeds=[1, 2, 3])
    for b in range(3):  # batched (two UNet calls of 2 + 1) or alone: the same view, up to float rounding
        alone = sampler(e[b:b + 1], seeds=[b + 1])
        assert np.abs(alone.astype(int) - batch[b:b + 1].astype(int)).max() <= 1
    assert np.array_equal(sampler(e[:1], seeds=[1]), sampler(e[:1], seeds=[1]))
    assert not np.array_equal(sampler(e[:1], seeds=[1]), sampler(e[:1], seeds=[9]))
    assert not np.array_equal(sampler(e[1:2], seeds=[1]), batch[:1])  # the condition matters (w = 3)


def test_image_size_and_settings(tiny_pipeline: Path) -> None:
    sampler = ImageVariationSampler(tiny_pipeline, steps=1, guidance=1.0, image_size=24)
    assert sampler(sampler.embed(_images(1)), seeds=[0]).shape == (1, 24, 24, 3)
    assert sampler.settings["steps"] == 1 and sampler.settings["scheduler"] == "DDIMScheduler"
    assert len(sampler.generator_hash()) == 64
    with pytest.raises(ValueError, match="multiple of"):
        ImageVariationSampler(tiny_pipeline, image_size=23)
    with pytest.raises(ValueError, match="noise_level=0"):
        sampler(sampler.embed(_images(1)), seeds=[0], noise_levels=[3])


def test_a_folder_without_a_pipeline_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="local files only.*pipeline=DIR"):
        ImageVariationSampler(tmp_path)


def test_generate_views_with_a_pipeline_fills_a_store_the_training_loader_reads(tiny_pipeline: Path, tmp_path: Path,
                                                                                capsys) -> None:
    """recipes/generate_views.py pipeline=…: one view per source into the view store; the rerun is a no-op;
    GenSISLoader serves crops of the synthetic views (p_gen=1)."""
    from genssl.data.augment import MultiCropSpec
    from genssl.data.gensis_loader import GenSISLoader
    from genssl.data.viewstore import open_view_store
    from genssl.engine.distributed import DistInfo
    from genssl.engine.setup import load_data
    from genssl.recipes.generate_views import GenerateConfig, generate

    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    data = "builtin:shapes?size=32&per_class=1&val_per_class=1"
    cfg = GenerateConfig(pipeline=str(tiny_pipeline), data=data, out=str(tmp_path / "views.zarr"), interp_per_image=0,
                         steps=2, guidance=3.0, batch_size=8, report=False, progress=False, num_workers=1)
    first = generate(cfg, cpu)
    index = load_data(data, "", cpu).train
    store = open_view_store(tmp_path / "views.zarr", "r")
    assert first["written"] == len(index) and not store.missing()
    assert store.views_per_image == 1 and (store.height, store.width) == (16, 16)
    assert store.attrs["pipeline"] == str(tiny_pipeline.resolve())
    assert generate(cfg, cpu)["written"] == 0 and "nothing to do" in capsys.readouterr().out

    spec = MultiCropSpec(global_size=16, n_local=0)
    loader = GenSISLoader(index, tmp_path / "views.zarr", spec, 4, 0, 1, seed=0, p_gen=1.0, interpolation=False,
                          py_workers=0)
    batch = next(iter(loader.iter_from(0)))
    assert batch.from_gen.all() and [tuple(c.shape) for c in batch.crops] == [(4, 3, 16, 16)] * 2


def test_generate_views_names_one_generator(tmp_path: Path) -> None:
    from genssl.engine.config import ConfigError
    from genssl.engine.distributed import DistInfo
    from genssl.recipes.generate_views import GenerateConfig, generate

    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for cfg in (GenerateConfig(), GenerateConfig(eldm="a", pipeline="b")):
        with pytest.raises(ConfigError, match="name one generator"):
            generate(cfg, cpu)
