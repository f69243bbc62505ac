"""Guided samplers of the E-LDM (docs/METHODS.md §1.3–1.5, §2.2).

:class:`GuidedSampler` turns embeddings into uint8 images: GenView noise on the condition →
context tokens → ``steps`` scheduler steps of the guided ε (conditional and unconditional halves in
ONE batch, ``ε = ε_u + w(ε_c − ε_u)``, through a swappable step backend) → autoencoder decode.

Schedulers (diffusers, configured with the E-LDM's training betas):

* ``"ddim"`` — ``DDIMScheduler``, η = 0 (deterministic given the initial latent);
* ``"dpmpp_2m"`` — ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``.

Reproducibility: every row ``b`` of a call carries its own seed. The initial latent noise and the
condition noise are drawn on the CPU from two generators derived from that seed alone, so a view
does not depend on the other rows of its batch nor on the device. With η = 0 nothing else is
random. (Batched float arithmetic may still round differently from a batch of one; the generation
job therefore processes sources in fixed groups, so a rerun repeats the same batches bit for bit.)
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from genssl.generators.autoencoder import decode, downsample_factor, to_uint8
from genssl.generators.conditioning import EmbeddingStats, noise_condition
from genssl.generators.eldm import guided_eps

__all__ = ["SCHEDULERS", "GuidedSampler", "guided_eps", "view_seed", "make_scheduler"]

SCHEDULERS = ("ddim", "dpmpp_2m")


def _hash_int(*parts) -> int:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def view_seed(base_seed: int, source: int, view: int, kind: str = "view") -> int:
    """The seed of one generated image: a 63-bit hash of (base seed, kind, source, view).

    ``kind`` separates the K generative views (``"view"``) from the J interpolated views
    (``"interp"``) of the same source.
    """
    return _hash_int("genssl-view", int(base_seed), kind, int(source), int(view))


def _row_generators(seeds: Sequence[int], stream: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(_hash_int("genssl-stream", int(s), stream)) for s in seeds]


def make_scheduler(name: str, eldm_config):
    """A fresh diffusers scheduler ``name`` with the E-LDM's training β schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    c = eldm_config
    common = dict(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start,
                  beta_end=c.beta_end, beta_schedule=c.beta_schedule, prediction_type="epsilon")
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                             timestep_spacing="leading")
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           lower_order_final=True, timestep_spacing="linspace")
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


class GuidedSampler:
    """``sample(embeddings [B,E], seeds [B], noise_levels [B]) -> uint8 [B,H,W,3]`` (numpy).

    Args:
        eldm: the :class:`~genssl.generators.eldm.ELDM` (used in eval mode, not modified).
        autoencoder: a diffusers ``AutoencoderKL``/``VQModel`` whose latents the E-LDM models, or
            ``None`` for a pixel-space model (latents are images in [-1, 1]).
        scheduler: ``"ddim"`` or ``"dpmpp_2m"``.
        steps: number of denoising steps.
        guidance: CFG scale w (2.0 by default, METHODS §1.3).
        backend: a step-backend name (``eager``/``compile``/``cudagraphs``/``tensorrt``, see
            :mod:`genssl.generators.backends`) or a ready callable with the
            ``(latents, t, cond_tokens, uncond_tokens, w)`` signature.
        device, dtype: where/in what the UNet step runs (the scheduler arithmetic stays float32).
        max_batch: rows per UNet call (larger calls are split; the job keeps its calls ≤ this).
        condition_stats: the data set's :class:`~genssl.generators.conditioning.EmbeddingStats` (per-dimension
            mean/std of its embeddings), which GenView's condition noise standardises with (METHODS §2.2);
            required when a noise level > 0 is asked for.
    """

    def __init__(self, eldm, autoencoder=None, scheduler: str = "ddim", steps: int = 50,
                 guidance: float = 2.0, backend="eager", device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, max_batch: int = 16,
                 condition_stats: EmbeddingStats | None = None, **backend_kw):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if int(steps) < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        self.eldm = eldm.eval()
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None
        self.scheduler_name = scheduler
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.max_batch = int(max_batch)
        self.condition_stats = condition_stats  # the data set's embedding statistics; needed for levels > 0
        self.device = torch.device(device or next(eldm.parameters()).device)
        self.dtype = dtype
        c = eldm.config
        self.latent_shape = (c.latent_channels, c.sample_size, c.sample_size)
        if autoencoder is not None:
            ae_lc = autoencoder.config.latent_channels
            if ae_lc != c.latent_channels:
                raise ValueError(f"autoencoder has {ae_lc} latent channels, the E-LDM {c.latent_channels}")
            f = downsample_factor(autoencoder)
            self.image_size = (c.sample_size * f, c.sample_size * f)
        else:
            if c.latent_channels != 3:
                raise ValueError("without an autoencoder the E-LDM must model 3-channel images")
            self.image_size = (c.sample_size, c.sample_size)
        if isinstance(backend, str):
            from genssl.generators.backends import StepShapes, make_step_backend

            shapes = StepShapes.from_eldm(eldm, max_batch=self.max_batch)
            self.step = make_step_backend(backend, eldm, shapes, self.device, dtype, **backend_kw)
            self.backend_name = backend
        else:
            self.step = backend
            self.backend_name = getattr(backend, "name", type(backend).__name__)

    # -------------------------------------------------------------------------------- metadata
    @property
    def settings(self) -> dict:
        """Sampler settings recorded in the view store; a rerun into the same store must match them."""
        return {"scheduler": self.scheduler_name, "steps": self.steps, "guidance": self.guidance,
                "eta": 0.0, "latent_shape": list(self.latent_shape), "image_size": list(self.image_size)}

    @property
    def runtime_info(self) -> dict:
        """How the step ran (recorded at store creation, not compared on resume)."""
        return {"backend": self.backend_name, "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device)}

    def generator_hash(self) -> str:
        """sha256 of the E-LDM hash and the autoencoder hash (the store's ``generator_hash``)."""
        from genssl.generators.autoencoder import autoencoder_hash

        ae = autoencoder_hash(self.autoencoder) if self.autoencoder is not None else "none"
        return hashlib.sha256(f"{self.eldm.model_hash()}\0{ae}".encode()).hexdigest()

    # -------------------------------------------------------------------------------- sampling
    def initial_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        gens = _row_generators(seeds, stream=1)
        return torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens])

    @torch.inference_mode()
    def sample_latents(self, embeddings, seeds: Sequence[int], noise_levels=None) -> torch.Tensor:
        e = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor)
                            else embeddings).float().cpu()
        seeds = [int(s) for s in np.asarray(seeds).reshape(-1)]
        B = e.shape[0]
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} embeddings")
        levels = (np.zeros(B, np.int64) if noise_levels is None
                  else np.broadcast_to(np.asarray(noise_levels, dtype=np.int64).reshape(-1), (B,)).copy())
        e = noise_condition(e, torch.from_numpy(levels), self.condition_stats,
                            generator=_row_generators(seeds, stream=0))
        p = next(self.eldm.parameters())
        cond = self.eldm.condition(e.to(p.device)).to(self.device, torch.float32)
        uncond = self.eldm.null_tokens(1).to(self.device, torch.float32)
        sched = make_scheduler(self.scheduler_name, self.eldm.config)
        sched.set_timesteps(self.steps)          # timesteps on the CPU; ε and x stay on self.device
        x = (self.initial_latents(seeds) * sched.init_noise_sigma).to(self.device, torch.float32)
        w = torch.tensor([self.guidance], device=self.device)
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t)
            tt = torch.tensor([float(t)], device=self.device)
            eps = self.step(xin, tt, cond, uncond, w).to(torch.float32)
            x = sched.step(eps, t, x, return_dict=False)[0]
        return x

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        if self.autoencoder is None:
            images = latents.float().clamp(-1, 1)
        else:
            images = decode(self.autoencoder, latents)
        return to_uint8(images).cpu().numpy()

    def sample(self, embeddings, seeds: Sequence[int], noise_levels=None) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` images for embeddings ``[B, E]``, one seed and one GenView noise
        level (0 = none) per row. Rows are processed in calls of at most ``max_batch``."""
        e = embeddings
        seeds = np.asarray(seeds).reshape(-1)
        B = len(seeds)
        lv = (np.zeros(B, np.int64) if noise_levels is None
              else np.broadcast_to(np.asarray(noise_levels, dtype=np.int64).reshape(-1), (B,)))
        out = []
        for s in range(0, B, self.max_batch):
            sl = slice(s, min(s + self.max_batch, B))
            out.append(self.decode(self.sample_latents(e[sl], seeds[sl], lv[sl])))
        return np.concatenate(out, 0) if out else np.zeros((0, *self.image_size, 3), np.uint8)

    __call__ = sample
