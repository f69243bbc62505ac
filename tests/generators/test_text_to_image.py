"""The text-to-image generator (generators/text_to_image.py, docs/METHODS.md §3) on a tiny, randomly
initialised Stable Diffusion pipeline built here: its loop equals diffusers' own pipeline, a view depends
on (caption, seed) alone, captions files parse, and m views per caption fill a resumable view store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from genssl.generators.text_to_image import (DEFAULT_GUIDANCE, TextToImageSampler, captions_fingerprint,  # noqa: E402
                                             generate_caption_views, load_text_to_image_pipeline, read_captions)

CAPTIONS = ["a red square", "a blue circle on grass", "two dogs", "an empty street at night", "a yellow boat"]


def build_tiny_pipeline(folder: Path, sample_size: int = 8) -> Path:
    """A randomly initialised Stable Diffusion text-to-image pipeline (views of ``2·sample_size`` px)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    # a byte-level vocabulary of its own (no download): every printable ASCII character and its word-end form
    chars = [chr(c) for c in range(33, 127)]
    vocab = {t: n for n, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    (folder / "tok").mkdir(parents=True, exist_ok=True)
    (folder / "tok" / "vocab.json").write_text(__import__("json").dumps(vocab))
    (folder / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"), model_max_length=12)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder / "pipeline"))
    return folder / "pipeline"


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("text_to_image"))


def test_the_loop_is_diffusers_own_pipeline(tiny_pipeline: Path) -> None:
    sampler = TextToImageSampler(tiny_pipeline, steps=3, guidance=8.0)
    c = sampler.encode(CAPTIONS[:2])
    ours = sampler(c, seeds=[5, 6])
    pipe = load_text_to_image_pipeline(tiny_pipeline)
    ref = pipe(prompt=CAPTIONS[:2], latents=sampler.initial_latents([5, 6]) * pipe.scheduler.init_noise_sigma,
               num_inference_steps=3, guidance_scale=8.0, negative_prompt=["", ""], output_type="np").images
    assert ours.dtype == np.uint8 and ours.shape == (2, 16, 16, 3)
    assert np.abs(ours.astype(np.int64) - np.round(ref * 255).astype(np.int64)).max() <= 1


def test_a_view_depends_on_its_caption_and_seed_alone(tiny_pipeline: Path) -> None:
    sampler = TextToImageSampler(tiny_pipeline, steps=2, max_batch=2)
    assert sampler.guidance == DEFAULT_GUIDANCE == 8.0 and sampler.settings["guidance"] == 8.0
    c = sampler.embed_captions(CAPTIONS)(np.array([0, 1, 2]))
    assert c.shape[0] == 3 and c.ndim == 3
    batch = sampler(c, seeds=[1, 2, 3])
    for b in range(3):  # batched (UNet calls of 2 + 1) or alone: the same view, up to float rounding
        assert np.abs(sampler(c[b:b + 1], seeds=[b + 1]).astype(int) - batch[b:b + 1].astype(int)).max() <= 1
    assert not np.array_equal(sampler(c[:1], seeds=[1]), sampler(c[:1], seeds=[9]))
    assert not np.array_equal(sampler(c[1:2], seeds=[1]), batch[:1])  # the caption matters (w = 8)
    with pytest.raises(ValueError, match="noise_level=0"):
        sampler(c[:1], seeds=[0], noise_levels=[3])


def test_captions_files(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("a cat\n\n  a dog  \n")
    assert read_captions(tmp_path / "c.txt") == ["a cat", "a dog"]
    (tmp_path / "c.csv").write_text('image,caption\nx/1.jpg,"a cat, sleeping"\nx/2.jpg,a dog\n')
    assert read_captions(tmp_path / "c.csv") == ["a cat, sleeping", "a dog"]
    (tmp_path / "bad.csv").write_text("x/1.jpg\n")
    with pytest.raises(ValueError, match="no caption column"):
        read_captions(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="no such file"):
        read_captions(tmp_path / "missing.txt")
    assert captions_fingerprint(["a", "b"]) != captions_fingerprint(["b", "a"])


def test_a_folder_without_a_pipeline_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="local files only.*generator.pipeline=DIR"):
        TextToImageSampler(tmp_path)


def test_m_views_per_caption_fill_a_store_and_a_rerun_skips_them(tiny_pipeline: Path, tmp_path: Path) -> None:
    from genssl.data.viewstore import open_view_store
    from genssl.engine.distributed import DistInfo

    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS))
    kw = dict(views_per_caption=3, steps=2, batch_size=6, shard_size=2, progress=False)
    first = generate_caption_views(tmp_path / "captions.txt", tiny_pipeline, tmp_path / "views.zarr", cpu, **kw)
    store = open_view_store(tmp_path / "views.zarr")
    assert first["written"] == len(CAPTIONS) and first["views"] == 3 * len(CAPTIONS) and not store.missing()
    assert store.fingerprint == captions_fingerprint(CAPTIONS) and store.views_per_image == 3
    views = store.views(1)
    assert views.shape == (3, 16, 16, 3) and not np.array_equal(views[0], views[1])  # m different images
    assert generate_caption_views(tmp_path / "captions.txt", tiny_pipeline, tmp_path / "views.zarr", cpu, **kw)["written"] == 0
    (tmp_path / "other.txt").write_text("\n".join(CAPTIONS[::-1]))
    with pytest.raises(ValueError, match="fingerprint"):
        generate_caption_views(tmp_path / "other.txt", tiny_pipeline, tmp_path / "views.zarr", cpu, **kw)
