"""Synthetic views from a local diffusers image-variation pipeline: MixDiff's generator (docs/METHODS.md §4).

MixDiff (Bafghi, Harilal, Monteleoni, Raissi, *MixDiff: Mixing Natural and Synthetic Images for Robust
Self-Supervised Representations*, WACV 2025, arXiv:2406.12368) draws the synthetic partner of a real
image x with Stable Diffusion image variations: a latent-diffusion UNet conditioned, instead of on
text, on the CLIP image embedding of x, sampled with classifier-free guidance

    e = CLIP_img(resize_224(x))                                [E]   (the pipeline's image encoder)
    ε̂(z_t) = ε(z_t, 0) + w·(ε(z_t, e) − ε(z_t, 0))                   (0: the pipeline's unconditional input)
    view = VAE_dec(z_0 / scaling_factor)                      [H, W, 3] uint8

Its code (GitHub cryptonymous9/mixing-ssl, generating_images/run.py) uses
lambdalabs/sd-image-variations-diffusers with 50 steps, w = 3.0, 512² views, the source resized to
224² (no crop) and CLIP-normalised. genssl never downloads a model: ``path`` is a pipeline folder on
local disk (``StableDiffusionImageVariationPipeline.save_pretrained`` layout); the safety checker is
not used (the official code disables it).

`ImageVariationSampler` follows the sampler protocol of :func:`genssl.generators.job.run_generation`
(embeddings, seeds → uint8 views), so its views go into the same view store the E-LDM's do and the
training loader is unchanged. The "embedding" of source i is ``e`` above (`embed_sources`); each view's
initial noise depends on its seed alone, so a view is a pure function of (source, seed) and a
resumed generation writes what an uninterrupted one would (for a deterministic scheduler: DDIM, PNDM,
DPM-Solver; an ancestral one draws fresh noise at every step).

The denoising loop is the one of diffusers' ``StableDiffusionImageVariationPipeline.__call__`` (steps
3-7 there), taking the embedding instead of the image; tests/generators/test_image_variation.py checks
it against that pipeline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from genssl.data.index import DatasetIndex, read_sample_bytes
from genssl.generators.samplers import _row_generators

__all__ = ["load_image_variation_pipeline", "ImageVariationSampler", "pipeline_hash"]


def load_local_pipeline(pipeline_cls, path: str | os.PathLike, key: str, example: str,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """``pipeline_cls`` (a diffusers pipeline class) loaded from the local folder ``path`` (never downloaded),
    then cast; a folder that is not a saved pipeline is a ValueError naming ``key=`` and an ``example``
    repository to download."""
    folder = Path(path).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{key}={path}: no diffusers pipeline folder there (model_index.json missing). genssl uses "
                         f"local files only: download one yourself (e.g. `huggingface-cli download {example} "
                         f"--local-dir DIR`) and pass {key}=DIR")
    # loaded as saved, then cast: from_pretrained's dtype keyword changed name across diffusers versions
    pipe = pipeline_cls.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def load_image_variation_pipeline(path: str | os.PathLike, device: torch.device | str = "cpu",
                                  dtype: torch.dtype = torch.float32):
    """The diffusers image-variation pipeline saved at the local folder ``path`` (never downloaded)."""
    if (Path(path).expanduser() / "model_index.json").is_file() and importlib.util.find_spec("transformers") is None:
        raise ValueError("pipeline= needs the transformers package for the CLIP image encoder: pip install 'genssl[variation]' (or pip install transformers)")
    from diffusers import StableDiffusionImageVariationPipeline

    return load_local_pipeline(StableDiffusionImageVariationPipeline, path, "pipeline",
                               "lambdalabs/sd-image-variations-diffusers", device, dtype)


def pipeline_hash(path: str | os.PathLike) -> str:
    """sha256 over every file of the pipeline folder (relative path and content): the view store's
    ``generator_hash``, so a store made by another pipeline is refused."""
    from genssl.generators.training import file_sha256

    folder = Path(path).expanduser()
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts):
        h.update(f"{f.relative_to(folder).as_posix()}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()


class PipelineViewSampler:
    """What the diffusers-pipeline samplers share: per-seed initial noise and ``sample`` in calls of at
    most ``max_batch`` images. A subclass sets ``kind``, ``pipe``, ``steps``, ``guidance``, ``device``,
    ``dtype``, ``max_batch``, ``image_size``, ``latent_shape`` and ``_sample(conditions, seeds)``."""

    kind = ""  # in error messages: "image-variation", "text-to-image"

    def initial_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """``[B, C, h, w]`` unit Gaussian noise, row b a function of ``seeds[b]`` alone."""
        return torch.stack([torch.randn(self.latent_shape, generator=g) for g in _row_generators(seeds, stream=1)])

    @torch.inference_mode()
    def sample(self, embeddings, seeds: Sequence[int], noise_levels=None) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` views of conditions ``[B, ...]`` (image embeddings ``[B, E]``, caption
        embeddings ``[B, L, E]``), one per seed."""
        c = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings).float()
        seeds = [int(s) for s in np.asarray(seeds).reshape(-1)]
        if len(seeds) != c.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {c.shape[0]} embeddings")
        if noise_levels is not None and np.any(np.asarray(noise_levels) != 0):
            raise ValueError(f"condition noise levels (GenView's noise_level) are an E-LDM option; the {self.kind} "
                             "pipeline takes noise_level=0")
        out = [self._sample(c[b:b + self.max_batch], seeds[b:b + self.max_batch]) for b in range(0, len(seeds), self.max_batch)]
        return np.concatenate(out, 0) if out else np.zeros((0, *self.image_size, 3), np.uint8)

    __call__ = sample


class ImageVariationSampler(PipelineViewSampler):
    """Views of sources from their CLIP image embeddings (module docstring).

    Args:
        path: the local pipeline folder.
        steps, guidance: denoising steps and classifier-free guidance weight w (MixDiff: 50, 3.0).
        image_size: side of the views; 0 = the pipeline's own (``unet.sample_size · vae_scale_factor``).
        max_batch: images per UNet call.
    """

    kind = "image-variation"

    def __init__(self, path: str | os.PathLike, steps: int = 50, guidance: float = 3.0, image_size: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, max_batch: int = 16) -> None:
        if steps < 1 or max_batch < 1 or image_size < 0:
            raise ValueError(f"need steps >= 1, max_batch >= 1, image_size >= 0; got {steps}, {max_batch}, {image_size}")
        self.path, self.steps, self.guidance, self.max_batch = str(path), int(steps), float(guidance), int(max_batch)
        self.device, self.dtype = torch.device(device), dtype
        self.pipe = load_image_variation_pipeline(path, self.device, dtype)
        factor = self.pipe.vae_scale_factor
        side = image_size or self.pipe.unet.config.sample_size * factor
        if side % factor:
            raise ValueError(f"image_size={side} must be a multiple of the autoencoder's downsampling factor {factor}")
        self.image_size = (side, side)
        self.latent_shape = (self.pipe.unet.config.in_channels, side // factor, side // factor)
        processor = self.pipe.feature_extractor
        crop = processor.crop_size
        self.clip_size = int(crop if isinstance(crop, int) else crop["height"])  # a dict, or transformers 5's SizeDict
        self.clip_mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.clip_std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    @property
    def settings(self) -> dict:
        """Recorded in the view store; a rerun into the same store must match them."""
        return {"generator": "image_variation", "scheduler": type(self.pipe.scheduler).__name__, "steps": self.steps,
                "guidance": self.guidance, "image_size": list(self.image_size), "clip_size": self.clip_size}

    @property
    def runtime_info(self) -> dict:
        return {"backend": "diffusers", "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
                "pipeline": self.path}

    def generator_hash(self) -> str:
        return pipeline_hash(self.path)

    # -------------------------------------------------------------------------------- conditioning
    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """CLIP image embeddings ``[n, E]`` float32 of uint8 HWC images: resized to the CLIP side without
        a crop (bicubic, no antialias) and CLIP-normalised, as MixDiff's generating_images/run.py does."""
        x = torch.stack([F.interpolate(torch.from_numpy(np.require(im, np.uint8, ['C', 'W'])).permute(2, 0, 1)[None].float() / 255,
                                       size=(self.clip_size, self.clip_size), mode="bicubic", align_corners=False)[0]
                         for im in images])
        x = (x - self.clip_mean) / self.clip_std
        encoder = self.pipe.image_encoder
        return encoder(x.to(self.device, next(encoder.parameters()).dtype)).image_embeds.float().cpu()

    def embed_sources(self, index: DatasetIndex):
        """``callable(indices int64[n]) -> [n, E]``: the embeddings of ``index``'s samples (decoded with
        PIL; files or WebDataset members), for :func:`~genssl.generators.job.run_generation`."""
        from PIL import Image

        def embeddings(idx: np.ndarray) -> np.ndarray:
            images = []
            for i in np.asarray(idx).reshape(-1):
                with Image.open(io.BytesIO(read_sample_bytes(index, int(i)))) as im:
                    images.append(np.array(im.convert("RGB")))
            return self.embed(images).numpy()

        return embeddings

    def _sample(self, e: torch.Tensor, seeds: list[int]) -> np.ndarray:
        cond = e.to(self.device, self.dtype)[:, None, :]  # [B, 1, E]
        return guided_denoise(self.pipe, self.steps, self.guidance, cond, torch.zeros_like(cond),
                              self.initial_latents(seeds).to(self.device, self.dtype))


def guided_denoise(pipe, steps: int, guidance: float, cond: torch.Tensor, uncond: torch.Tensor,
                   noise: torch.Tensor) -> np.ndarray:
    """uint8 ``[B, H, W, 3]``: the diffusers pipeline's denoising loop from unit noise ``[B, C, h, w]``
    with classifier-free guidance ``w`` (w <= 1: none, as the pipelines) between the conditions
    ``cond`` and ``uncond`` (``[B, L, E]``, the UNet's ``encoder_hidden_states``), then the VAE decode.
    Shared by the image-variation and text-to-image samplers."""
    guided, scheduler = guidance > 1.0, pipe.scheduler
    context = torch.cat([uncond, cond]) if guided else cond
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        eps = pipe.unet(x, t, encoder_hidden_states=context).sample
        if guided:
            unconditional, conditional = eps.chunk(2)
            eps = unconditional + guidance * (conditional - unconditional)
        latents = scheduler.step(eps, t, latents).prev_sample
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample  # [B, 3, H, W] in [-1, 1]
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
