"""Operations on the conditioning embedding of the E-LDM (docs/METHODS.md §1.5, §2.2).

* :func:`slerp` — spherical interpolation between two source embeddings (Gen-SIS interpolated views),
  with **α the weight on e1**.
* :func:`noise_condition` — GenView's noise on the condition, ``e_l = √ᾱ_l e + √(1−ᾱ_l) ε``.
* :func:`foreground_noise_level` — GenView's adaptive level ``l = 100·min(⌊p/0.2⌋, 4)``.

All functions are batched over the leading axis and accept torch tensors (numpy arrays are
converted).
"""

from __future__ import annotations

import math
import numpy as np
import torch

__all__ = ["slerp", "noise_condition", "foreground_noise_level"]


def _as_tensor(x, dtype=None, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device if device is not None else x.device,
                    dtype=dtype if dtype is not None else x.dtype)
    t = torch.as_tensor(np.asarray(x))
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


def noise_condition(e, level, alphas_cumprod, generator=None) -> torch.Tensor:
    """GenView noise on the conditioning embedding: ``e_l = √ᾱ_l·e + √(1−ᾱ_l)·ε``, ε ~ N(0, I).

    Args:
        e: ``[B, E]`` embeddings.
        level: an int or ``[B]`` integer levels in ``[0, len(alphas_cumprod))``; **level 0 returns
            the row unchanged** (GenView's "no noise").
        alphas_cumprod: ``[T]`` ᾱ of the training schedule (``DDPMScheduler.alphas_cumprod``).
        generator: ``None``, one ``torch.Generator`` (ε drawn for the whole batch at once), or a
            sequence of ``B`` generators (row ``b``'s ε drawn from ``generator[b]`` alone, so a row's
            result does not depend on the other rows of the batch — what the sampler uses). With
            per-row generators, ε is drawn for every row, level 0 included, so that each row's
            generator ends in the same state whatever its level.
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
    ac = _as_tensor(alphas_cumprod, dtype=torch.float64, device=e.device).reshape(-1)
    if int(lv.min()) < 0 or int(lv.max()) >= ac.numel():
        raise ValueError(f"noise_condition: levels must lie in [0, {ac.numel()}), got "
                         f"min {int(lv.min())} max {int(lv.max())}")
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"noise_condition: {len(generator)} generators for {B} rows")
        eps = torch.stack([
            torch.randn(e.shape[1:], generator=g, dtype=torch.float32,
                        device=g.device if g is not None else "cpu") for g in generator
        ]).to(e.device)
    else:
        dev = generator.device if generator is not None else e.device
        eps = torch.randn(e.shape, generator=generator, dtype=torch.float32, device=dev).to(e.device)
    a = ac[lv].to(torch.float64)[:, None]
    noisy = (a.sqrt() * e.to(torch.float64) + (1.0 - a).sqrt() * eps.to(torch.float64)).to(e.dtype)
    out = torch.where((lv == 0)[:, None], e, noisy)
    return out[0] if squeeze else out


def foreground_noise_level(p):
    """GenView adaptive noise level ``100·min(⌊p/0.2⌋, 4)`` ∈ {0, 100, 200, 300, 400}.

    ``p`` is the foreground proportion in [0, 1] (float, numpy array or tensor; the result has the
    same kind, integer dtype). A 1e-9 slack makes exact bin edges (p = 0.6 → 300) immune to
    float round-off (0.6/0.2 = 2.9999999999999996 in binary floating point).
    """
    if isinstance(p, torch.Tensor):
        q = torch.floor(p.to(torch.float64) / 0.2 + 1e-9).clamp(0, 4)
        return (100 * q).to(torch.int64)
    if isinstance(p, (np.ndarray, list, tuple)):
        q = np.clip(np.floor(np.asarray(p, dtype=np.float64) / 0.2 + 1e-9), 0, 4)
        return (100 * q).astype(np.int64)
    return int(100 * min(max(math.floor(float(p) / 0.2 + 1e-9), 0), 4))
