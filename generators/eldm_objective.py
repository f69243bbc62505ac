"""The E-LDM's training objective for the engine's ``fit`` (docs/METHODS.md §1.3) and its sample previews.

- Belagali et al., *Gen-SIS: Generative Self-augmentation Improves Self-supervised Learning*, 2024,
  https://arxiv.org/abs/2412.01672 (the embedding-conditioned latent diffusion model, E-LDM)
- Ho et al., *Denoising Diffusion Probabilistic Models*, 2020, https://arxiv.org/abs/2006.11239 (ε-prediction)
- Ho & Salimans, *Classifier-Free Diffusion Guidance*, 2022, https://arxiv.org/abs/2207.12598 (condition dropout)

Loss (:meth:`~genssl.generators.eldm.ELDM.training_loss`; latents ``x_0`` [B, C, h, w], embeddings
``e`` [B, E], ``t ~ U{0..T−1}``, ``ε ~ N(0, I)``, ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε``, ``d_i ~ Bernoulli(p)``
with ``p = cfg_dropout``)::

    L = ‖ ε_θ(x_t, t, d ? 0 : e) − ε ‖²                        (mean over elements)

* :class:`ELDMObjective` — that loss run through the DeepSpeed engine, with an
  :class:`~genssl.models.ema.EMATeacher`: ``objective.teacher.module`` is the EMA E-LDM (fp32,
  checkpointed with the objective, updated by ``fit``). t, ε and the drop mask of step k on rank r come
  from :func:`~genssl.generators.training.step_generator`, so a resumed run repeats them.
* :class:`SamplePreview` — the ``preview`` callback of the recipe: a PNG grid of real images, their
  autoencoder reconstructions and samples of the EMA model, every N steps on rank 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from genssl.generators.autoencoder import decode, to_uint8
from genssl.generators.eldm import ELDM
from genssl.generators.training import step_generator
from genssl.models.ema import EMATeacher

__all__ = ["ELDMObjective", "SamplePreview"]


class _EngineAsELDM:
    """Lets :meth:`ELDM.training_loss` run unchanged with the DeepSpeed engine as ``self``: the
    forward goes through ``engine(...)`` (ZeRO hooks, mixed precision); config and noise schedule come
    from the wrapped model. (``engine.config`` is DeepSpeed's own config, hence this adapter.)"""

    def __init__(self, engine):
        self._engine = engine
        self.config = engine.module.config
        self.noise_scheduler = engine.module.noise_scheduler

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)


class ELDMObjective(nn.Module):
    """E-LDM training through ``fit`` on batches ``{"latents": [B,C,h,w], "embeddings": [B,E]}``, with an
    EMA teacher (``ema=True``).

    ``preview(objective, global_step)``, when given, is called on every rank at the start of each step
    (the recipe's :class:`SamplePreview` draws a grid from the EMA model on rank 0 every N steps).
    """

    def __init__(self, eldm: ELDM, dtype: torch.dtype = torch.float32, seed: int = 0, rank: int = 0,
                 ema: bool = True, preview: Callable | None = None):
        super().__init__()
        self.teacher = EMATeacher(eldm) if ema else None
        self.dtype, self.seed, self.rank = dtype, int(seed), int(rank)
        self.preview = preview

    def training_loss(self, engine, batch, progress):
        if self.preview is not None:
            self.preview(self, progress.global_step)
        latents = batch["latents"].to(engine.device, self.dtype, non_blocking=True)
        emb = batch["embeddings"].to(engine.device, torch.float32, non_blocking=True)
        gen = step_generator(self.seed, progress.global_step, self.rank)
        loss = ELDM.training_loss(_EngineAsELDM(engine), latents, emb, generator=gen)
        return loss, {}


class SamplePreview:
    """A PNG grid of real images, their autoencoder reconstructions and EMA samples (rank 0 only),
    also logged as the image ``eldm/samples`` into ``tensorboard_dir``'s event files when given.

    ``real`` uint8 [n, H, W, 3], ``latents`` [n, C, h, w] and ``embeddings`` [n, E] of the same n images;
    the samples use fixed seeds, so grids of different steps differ by the model only.
    """

    def __init__(self, out_dir: Path, every: int, ae, real: np.ndarray, latents: np.ndarray, embeddings: np.ndarray,
                 steps: int, guidance: float, device: torch.device, enabled: bool, seed: int = 0,
                 tensorboard_dir: Path | None = None):
        self.out_dir, self.every, self.ae, self.real = Path(out_dir), int(every), ae, real
        self.tensorboard_dir = tensorboard_dir
        self.latents, self.embeddings = latents, embeddings
        self.steps, self.guidance, self.device, self.enabled = steps, guidance, device, enabled
        self.seeds = np.arange(len(real), dtype=np.int64) + 1000 * seed

    def __call__(self, objective, step: int) -> None:
        if self.enabled and self.every > 0 and step > 0 and step % self.every == 0:
            self.write(objective.teacher.module, f"step{step:08d}", step)

    @torch.no_grad()
    def write(self, eldm: ELDM, name: str, step: int) -> Path | None:
        if not self.enabled:
            return None
        from PIL import Image

        from genssl.engine.metrics import log_image
        from genssl.generators.samplers import GuidedSampler

        was_training = eldm.training
        sampler = GuidedSampler(eldm, self.ae, scheduler="ddim", steps=self.steps, guidance=self.guidance,
                                backend="eager", device=self.device, dtype=torch.float32, max_batch=len(self.real))
        generated = sampler.sample(torch.from_numpy(self.embeddings), self.seeds)
        recon = to_uint8(decode(self.ae, torch.from_numpy(self.latents).float().to(self.device))).cpu().numpy()
        eldm.train(was_training)
        zoom = max(1, -(-64 // generated.shape[1]))  # tiles at least 64 px, nearest-neighbour
        rows = [np.concatenate(list(r), axis=1).repeat(zoom, 0).repeat(zoom, 1) for r in (self.real, recon, generated)]
        pad = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
        grid = np.concatenate([rows[0], pad, rows[1], pad, rows[2]], axis=0)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.png"
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
        Image.fromarray(grid).save(tmp)
        os.replace(tmp, path)
        if self.tensorboard_dir is not None:
            log_image(self.tensorboard_dir, "eldm/samples", grid, step)
        return path
