"""m images per caption from a local diffusers text-to-image pipeline: StableRep's data (docs/METHODS.md §3).

StableRep (Tian, Fan, Isola, Chang, Krishnan, *StableRep: Synthetic Images from Text-to-Image Models Make
Strong Visual Representation Learners*, NeurIPS 2023, arXiv:2306.00984) trains on images Stable Diffusion
v1.5 draws from the captions of a data set, several per caption from different noise, sampled with
classifier-free guidance

    c = TextEncoder(Tokenizer(caption))        [L, E]   (the pipeline's CLIP text encoder, padded to L tokens)
    u = TextEncoder(Tokenizer(""))             [L, E]   (the unconditional input, as the official code)
    ε̂(z_t) = ε(z_t, u) + w·(ε(z_t, c) − ε(z_t, u))
    view = VAE_dec(z_0 / scaling_factor)       [H, W, 3] uint8

The guidance weight w trades diversity for quality; the paper finds representation learning prefers a
lower w than image quality does: best w ≈ 8 for SimCLR-style training on synthetic images (paper §2,
the guidance-scale study; docs/METHODS.md §3), so ``guidance=8`` is genssl's default. The official
generation script (GitHub google-research/syn-rep-learn, ``StableRep/data_generation/txt2img.py``) uses
DDIM with 50 steps, η = 0; genssl samples with the pipeline's own scheduler (a saved SD 1.5 folder holds
PNDM; save it with a DDIM scheduler to match).

genssl never downloads a model: ``path`` is a folder written by ``StableDiffusionPipeline.save_pretrained``
(tokenizer, text_encoder, unet, vae, scheduler); the safety checker is not used. `TextToImageSampler`
follows the sampler protocol of :func:`genssl.generators.job.run_generation`: the "embedding" of source
(caption) i is ``c`` above, each view's initial noise a function of its seed alone, so the m views of a
caption go into the view store the E-LDM's views use, sharded over ranks and resumable after a kill
(`generate_caption_views`). The store's ``fingerprint`` is that of the captions (`captions_fingerprint`),
the data it was made from, so views of other captions are refused.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from genssl.generators.image_variation import PipelineViewSampler, guided_denoise, load_local_pipeline, pipeline_hash

__all__ = ["read_captions", "captions_fingerprint", "load_text_to_image_pipeline", "TextToImageSampler",
           "generate_caption_views", "DEFAULT_GUIDANCE"]

DEFAULT_GUIDANCE = 8.0  # paper: best for SimCLR-style training on synthetic images (module docstring)


def read_captions(path: str | os.PathLike) -> list[str]:
    """Captions of ``path``: one per line (blank lines skipped), or for a ``.csv`` an ``image,caption``
    table (a header row ``image,caption`` is skipped; the image column is not used)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"captions={path}: no such file (one caption per line, or an image,caption .csv)")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(x.strip() for x in r)]
        if rows and [x.strip().lower() for x in rows[0][:2]] == ["image", "caption"]:
            rows = rows[1:]
        bad = [n for n, r in enumerate(rows) if len(r) < 2]
        if bad:
            raise ValueError(f"captions={path}: row {bad[0] + 1} has no caption column (expected image,caption)")
        captions = [r[1].strip() for r in rows]
    else:
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"captions={path} holds no caption")
    return captions


def captions_fingerprint(captions: Sequence[str]) -> str:
    """The view store's ``fingerprint`` of a captions list (order and text)."""
    h = hashlib.sha256(b"genssl-captions\0")
    for c in captions:
        h.update(c.encode("utf-8") + b"\0")
    return "captions-" + h.hexdigest()


def load_text_to_image_pipeline(path: str | os.PathLike, device: torch.device | str = "cpu",
                                dtype: torch.dtype = torch.float32):
    """The diffusers Stable Diffusion text-to-image pipeline saved at the local folder ``path``."""
    from diffusers import StableDiffusionPipeline

    return load_local_pipeline(StableDiffusionPipeline, path, "generator.pipeline",
                               "stable-diffusion-v1-5/stable-diffusion-v1-5", device, dtype)


class TextToImageSampler(PipelineViewSampler):
    """Views of captions from their text embeddings (module docstring).

    Args:
        path: the local pipeline folder.
        steps, guidance: denoising steps and classifier-free guidance weight w (default 50, 8).
        image_size: side of the views; 0 = the pipeline's own (``unet.sample_size · vae_scale_factor``).
        max_batch: images per UNet call.
    """

    kind = "text-to-image"

    def __init__(self, path: str | os.PathLike, steps: int = 50, guidance: float = DEFAULT_GUIDANCE, image_size: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, max_batch: int = 16) -> None:
        if steps < 1 or max_batch < 1 or image_size < 0 or guidance < 0:
            raise ValueError(f"need steps >= 1, max_batch >= 1, image_size >= 0, guidance >= 0; got {steps}, {max_batch}, "
                             f"{image_size}, {guidance}")
        self.path, self.steps, self.guidance, self.max_batch = str(path), int(steps), float(guidance), int(max_batch)
        self.device, self.dtype = torch.device(device), dtype
        self.pipe = load_text_to_image_pipeline(path, self.device, dtype)
        factor = self.pipe.vae_scale_factor
        side = image_size or self.pipe.unet.config.sample_size * factor
        if side % factor:
            raise ValueError(f"image_size={side} must be a multiple of the autoencoder's downsampling factor {factor}")
        self.image_size = (side, side)
        self.latent_shape = (self.pipe.unet.config.in_channels, side // factor, side // factor)
        self._unconditional = self.encode([""])[0]  # [L, E]

    @property
    def settings(self) -> dict:
        """Recorded in the view store; a rerun into the same store must match them."""
        return {"generator": "text_to_image", "scheduler": type(self.pipe.scheduler).__name__, "steps": self.steps,
                "guidance": self.guidance, "image_size": list(self.image_size)}

    @property
    def runtime_info(self) -> dict:
        return {"backend": "diffusers", "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
                "pipeline": self.path}

    def generator_hash(self) -> str:
        return pipeline_hash(self.path)

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """``[n, L, E]`` float32: the text encoder's last hidden states of the captions, padded to the
        tokenizer's length L (as ``StableDiffusionPipeline.encode_prompt`` without ``clip_skip``)."""
        tok = self.pipe.tokenizer
        ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return self.pipe.text_encoder(ids)[0].float().cpu()

    def embed_captions(self, captions: Sequence[str]):
        """``callable(indices int64[n]) -> [n, L, E]``, for :func:`~genssl.generators.job.run_generation`."""
        return lambda idx: self.encode([captions[int(i)] for i in np.asarray(idx).reshape(-1)]).numpy()

    def _sample(self, c: torch.Tensor, seeds: list[int]) -> np.ndarray:
        cond = c.to(self.device, self.dtype)  # [B, L, E]
        uncond = self._unconditional.to(self.device, self.dtype).expand_as(cond)
        return guided_denoise(self.pipe, self.steps, self.guidance, cond, uncond,
                              self.initial_latents(seeds).to(self.device, self.dtype))


def generate_caption_views(captions_file: str | os.PathLike, pipeline: str | os.PathLike, out: str | os.PathLike, dist,
                           views_per_caption: int, seed: int = 0, steps: int = 50, guidance: float = DEFAULT_GUIDANCE,
                           image_size: int = 0, batch_size: int = 16, dtype: torch.dtype = torch.float32,
                           shard_size: int = 64, progress: bool = True) -> dict:
    """Fill the view store ``out`` with ``views_per_caption`` images per caption (this rank's shards).

    Verifies an existing store first (damaged sources are regenerated), skips finished captions (a rerun
    after a kill completes the store, byte-identical), and refuses a store of other captions or another
    pipeline. Every rank calls it; returns ``{"fingerprint", "n_sources", "written", "views", "seconds"}``
    summed over ranks.
    """
    from genssl.engine.distributed import barrier, gather_objects
    from genssl.generators.job import format_verification, run_generation, verify_store

    captions = read_captions(captions_file)
    fingerprint = captions_fingerprint(captions)
    sampler = TextToImageSampler(pipeline, steps=steps, guidance=guidance, image_size=image_size, device=dist.device,
                                 dtype=dtype, max_batch=batch_size)
    out = Path(out)
    if (out / "zarr.json").is_file():  # every rank its own shards, as recipes/generate_views.py verify=true
        checked = gather_objects(verify_store(out, dist.rank, dist.world_size, fingerprint=fingerprint,
                                              generator_hash=sampler.generator_hash()))
        if dist.is_main:
            print(format_verification(out, checked), flush=True)
    report = run_generation(out, len(captions), sampler.embed_captions(captions), sampler, fingerprint=fingerprint,
                           rank=dist.rank, world_size=dist.world_size, K=views_per_caption, J=0, base_seed=seed,
                           batch_size=batch_size, shard_size=shard_size, progress=progress and dist.is_main,
                           extra_attrs={"captions": str(Path(captions_file).resolve()),
                                        "pipeline": str(Path(pipeline).resolve())})
    reports = gather_objects(report)
    barrier()
    return {"fingerprint": fingerprint, "n_sources": len(captions), "written": sum(len(r["written"]) for r in reports),
            "views": sum(r["views"] for r in reports), "seconds": max(r["seconds"] for r in reports)}
