"""Operations on the conditioning embedding of the E-LDM (docs/METHODS.md §1.5, §2.2).

* :func:`slerp` — spherical interpolation between two source embeddings (Gen-SIS interpolated views),
  with **α the weight on e1**.
* :func:`noise_condition` — GenView's noise on the condition, done as unCLIP does it: standardise
  the embedding per dimension with the data set's statistics, noise it at timestep ``l`` of a
  ``squaredcos_cap_v2`` schedule, unstandardise::

      ê = (e − μ)/σ,   ê_l = √ᾱ_l·ê + √(1 − ᾱ_l)·ε,   e_l = σ·ê_l + μ

  so ``cos(ê, ê_l) ≈ √ᾱ_l`` (≈ 0.80 at l = 400). Adding ε to the unit-norm ``e`` directly (genssl's
  earlier form) left cos ≈ 0.15 at l = 100 in 384 dimensions: every noised view was unconditional.

Papers: GenView, Li et al., ECCV 2024, https://arxiv.org/abs/2403.12003 (§3.3, App. A: Stable unCLIP's
noise augmentation of the CLIP image embedding); unCLIP, Ramesh et al. 2022,
https://arxiv.org/abs/2204.06125. The schedule and the standardisation are those of diffusers'
``StableUnCLIPImg2ImgPipeline.noise_image_embeddings`` (``StableUnCLIPImageNormalizer.scale`` →
``DDPMScheduler(beta_schedule="squaredcos_cap_v2").add_noise`` → ``unscale``); the cosine schedule is
Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672.

All functions are batched over the leading axis and accept torch tensors (numpy arrays are
converted).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

__all__ = ["slerp", "EmbeddingStats", "squaredcos_alphas_cumprod", "noise_condition", "UNCLIP_TIMESTEPS"]

UNCLIP_TIMESTEPS = 1000  # Stable unCLIP's image-noising scheduler: 1000 steps, levels 0 … 999


def _as_tensor(x, dtype=None, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device if device is not None else x.device,
                    dtype=dtype if dtype is not None else x.dtype)
    t = torch.as_tensor(np.array(x))  # a copy: x may be a read-only memmap (the embedding cache)
    return t.to(device=device, dtype=dtype if dtype is not None else (
        t.dtype if t.is_floating_point() else torch.float32))


def slerp(e1, e2, alpha, eps: float = 1e-4) -> torch.Tensor:
    """Spherical interpolation with α the weight on ``e1``.

    ``slerp(e1, e2, α) = [sin(αθ)·ê1 + sin((1−α)θ)·ê2] / sin θ``, ``θ = arccos(ê1·ê2)``, where ``ê``
    are the inputs L2-normalised (the result is therefore a unit vector). α=1 gives ê1, α=0 gives ê2.

    Args:
        e1, e2: ``[..., E]`` (same shape; typically ``[B, E]`` or ``[E]``).
        alpha: a float or a tensor broadcastable to ``e1.shape[:-1]`` (e.g. ``[B]``).
        eps: when ``sin θ < eps`` (nearly parallel vectors) the normalised lerp
            ``normalize(α ê1 + (1−α) ê2)`` is used instead, which is the limit of slerp as θ→0.
            Near-antipodal inputs (θ→π) have no unique geodesic; the same fallback is used there.

    Computed in float64 internally, returned in the dtype of ``e1``.
    """
    e1 = _as_tensor(e1)
    out_dtype = e1.dtype if e1.is_floating_point() else torch.float32
    a = e1.to(torch.float64)
    b = _as_tensor(e2, dtype=torch.float64, device=a.device)
    if a.shape != b.shape:
        raise ValueError(f"slerp: e1 and e2 must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    al = _as_tensor(alpha, dtype=torch.float64, device=a.device)
    if al.dim() < a.dim():
        al = al.reshape(al.shape + (1,) * (a.dim() - al.dim()))
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    cos = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    safe = sin >= eps
    sin_safe = torch.where(safe, sin, torch.ones_like(sin))
    s = (torch.sin(al * theta) * a + torch.sin((1.0 - al) * theta) * b) / sin_safe
    lerp = torch.nn.functional.normalize(al * a + (1.0 - al) * b, dim=-1)
    return torch.where(safe, s, lerp).to(out_dtype)


@dataclasses.dataclass(frozen=True)
class EmbeddingStats:
    """Per-dimension mean ``μ`` and std ``σ`` (``[E]``, float64) of a data set's embeddings.

    unCLIP standardises with fixed statistics of its CLIP embedder (``StableUnCLIPImageNormalizer``);
    genssl computes them from the embeddings it conditions on: :meth:`from_embeddings` over the cached
    ``e`` of every training image (docs/METHODS.md §1.2, ``generators/training.cached_embeddings``).
    """

    mean: torch.Tensor  # [E]
    std: torch.Tensor   # [E]

    def __post_init__(self):
        if self.mean.dim() != 1 or self.mean.shape != self.std.shape:
            raise ValueError(f"EmbeddingStats: mean and std must both be [E], got {tuple(self.mean.shape)} and "
                             f"{tuple(self.std.shape)}")
        if not bool((self.std > 0).all()):
            raise ValueError("EmbeddingStats: every std must be > 0 (a constant embedding dimension cannot be "
                             "standardised); build the statistics with EmbeddingStats.from_embeddings")

    @classmethod
    def from_embeddings(cls, embeddings, eps: float = 1e-6) -> "EmbeddingStats":
        """Statistics of ``embeddings`` ``[N, E]`` (N ≥ 2), accumulated in float64 in chunks (an ``[N, E]``
        memmap is read once, never copied whole). ``eps`` floors σ for dimensions that barely vary."""
        n = len(embeddings)
        if n < 2:
            raise ValueError(f"EmbeddingStats.from_embeddings needs at least 2 embeddings, got {n}")
        total = sq = None
        for s in range(0, n, 65536):
            chunk = _as_tensor(embeddings[s:s + 65536], dtype=torch.float64, device="cpu")
            if chunk.dim() != 2:
                raise ValueError(f"embeddings must be [N, E], got a chunk of shape {tuple(chunk.shape)}")
            total = chunk.sum(0) if total is None else total + chunk.sum(0)
            sq = (chunk * chunk).sum(0) if sq is None else sq + (chunk * chunk).sum(0)
        mean = total / n
        var = ((sq - n * mean * mean) / (n - 1)).clamp_min(0.0)  # unbiased, as torch.std
        return cls(mean, var.sqrt().clamp_min(eps))

    def standardise(self, e: torch.Tensor) -> torch.Tensor:
        return (e - self.mean.to(e)) / self.std.to(e)

    def unstandardise(self, e_hat: torch.Tensor) -> torch.Tensor:
        return e_hat * self.std.to(e_hat) + self.mean.to(e_hat)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_state_dict(cls, state: dict) -> "EmbeddingStats":
        return cls(_as_tensor(state["mean"], dtype=torch.float64, device="cpu"),
                   _as_tensor(state["std"], dtype=torch.float64, device="cpu"))


def squaredcos_alphas_cumprod(num_steps: int = UNCLIP_TIMESTEPS, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ ``[num_steps]`` (float64) of the ``squaredcos_cap_v2`` schedule, as diffusers' DDPMScheduler builds it:
    ``f(t) = cos²((t + 0.008)/1.008 · π/2)``, ``β_i = min(1 − f((i+1)/T)/f(i/T), max_beta)``,
    ``ᾱ_l = Π_{i≤l} (1 − β_i)``."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)],
                         dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


def noise_condition(e, level, stats: EmbeddingStats | None, generator=None, alphas_cumprod=None) -> torch.Tensor:
    """GenView/unCLIP condition noise: ``e_l = σ·(√ᾱ_l·(e − μ)/σ + √(1−ᾱ_l)·ε) + μ``, ε ~ N(0, I).

    Args:
        e: ``[B, E]`` (or ``[E]``) embeddings.
        level: an int or ``[B]`` integer levels in ``[0, T)``; **level 0 returns the row unchanged**
            (GenView's "no noise"; diffusers would still add ``√(1−ᾱ_0) ≈ 0.006`` of noise there).
        stats: the data set's :class:`EmbeddingStats`; read only when some level is > 0 (``None`` is fine
            when every level is 0).
        generator: ``None``, one ``torch.Generator`` (ε drawn for the whole batch at once), or a
            sequence of ``B`` generators (row ``b``'s ε drawn from ``generator[b]`` alone, so a row's
            result does not depend on the other rows of the batch — what the sampler uses). With
            per-row generators, ε is drawn for every row, level 0 included, so that each row's
            generator ends in the same state whatever its level.
        alphas_cumprod: ``[T]`` ᾱ; default :func:`squaredcos_alphas_cumprod` (T = 1000), Stable unCLIP's
            image-noising schedule — not the E-LDM's own denoising schedule.

    Computed in float64, returned in the dtype of ``e``.
    """
    e = _as_tensor(e)
    if not e.is_floating_point():
        e = e.float()
    squeeze = e.dim() == 1
    if squeeze:
        e = e[None]
    B = e.shape[0]
    lv = _as_tensor(level, device=e.device).to(torch.long).reshape(-1)
    if lv.numel() == 1 and B != 1:
        lv = lv.expand(B)
    if lv.numel() != B:
        raise ValueError(f"noise_condition: {lv.numel()} levels for {B} embeddings")
    ac = (squaredcos_alphas_cumprod() if alphas_cumprod is None
          else _as_tensor(alphas_cumprod, dtype=torch.float64, device="cpu").reshape(-1)).to(e.device)
    if B and (int(lv.min()) < 0 or int(lv.max()) >= ac.numel()):
        raise ValueError(f"noise_condition: levels must lie in [0, {ac.numel()}), got "
                         f"min {int(lv.min())} max {int(lv.max())}")
    noised = bool((lv > 0).any())  # stats are read only when a row is noised
    if noised and stats is None:
        raise ValueError("noise_condition: levels > 0 need the data set's EmbeddingStats (stats=None is only valid "
                         "when no row is noised); build them with EmbeddingStats.from_embeddings(embeddings)")
    if noised and not isinstance(stats, EmbeddingStats):
        raise ValueError(f"noise_condition: stats must be the data set's EmbeddingStats (per-dimension mean/std of "
                         f"its embeddings, EmbeddingStats.from_embeddings), got {type(stats).__name__}")
    if noised and stats.mean.numel() != e.shape[1]:
        raise ValueError(f"noise_condition: stats are for {stats.mean.numel()}-d embeddings, e is {e.shape[1]}-d")
    eps = _draw_noise(e.shape, generator, e.device)
    if not noised:
        return e[0] if squeeze else e
    a = ac[lv][:, None]                                          # [B, 1]
    e_hat = stats.standardise(e.to(torch.float64))
    noisy = stats.unstandardise(a.sqrt() * e_hat + (1.0 - a).sqrt() * eps.to(torch.float64)).to(e.dtype)
    out = torch.where((lv == 0)[:, None], e, noisy)
    return out[0] if squeeze else out


def _draw_noise(shape, generator, device) -> torch.Tensor:
    """ε ``[B, E]`` float32 on ``device``; per-row generators draw their own row (see noise_condition)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"noise_condition: {len(generator)} generators for {shape[0]} rows")
        rows = [torch.randn(shape[1:], generator=g, dtype=torch.float32,
                            device=g.device if g is not None else "cpu") for g in generator]
        return (torch.stack(rows) if rows else torch.zeros(shape)).to(device)
    dev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=dev).to(device)
