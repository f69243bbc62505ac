"""The KL autoencoder's training objective for the engine's ``fit`` (docs/METHODS.md §1.3), and its
fp32 weights after training.

- Rombach et al., *High-Resolution Image Synthesis with Latent Diffusion Models*, 2021,
  https://arxiv.org/abs/2112.10752 (the KL-regularised autoencoder of latent diffusion)

Loss (``generators.autoencoder.autoencoder_loss``; images ``x`` [B, 3, H, W] in [-1, 1], posterior
``q(z|x)``, one sample ``z ~ q(z|x)``, ``x̂ = decode(z)``)::

    L = rec(x̂, x) + kl_weight · KL(q(z|x) ‖ N(0, I))          rec = L1 (default) or L2, mean over pixels

* :class:`AutoencoderLossModule` — the student DeepSpeed optimises: ``forward(images, generator)``
  runs the whole loss, so every parameter access happens inside the engine's forward (ZeRO-3's
  parameter gathering hooks rely on that; the loss calls ``ae.encode``/``ae.decode``, not
  ``ae.forward``).
* :class:`AutoencoderObjective` — ``training_loss(engine, batch, progress)``; no teacher. The
  posterior sample of step k on rank r comes from :func:`~genssl.generators.training.step_generator`,
  so a resumed run repeats it.
* :func:`full_fp32_state_dict` — the trained weights out of the engine, from the optimizer's fp32
  master copy (what the recipe exports).
"""

from __future__ import annotations

import torch
from torch import nn

from genssl.generators.autoencoder import autoencoder_loss, from_uint8
from genssl.generators.training import step_generator

__all__ = ["AutoencoderLossModule", "AutoencoderObjective", "full_fp32_state_dict"]


class AutoencoderLossModule(nn.Module):
    """``forward(images [B,3,H,W] in [-1, 1], generator) -> (loss, rec, kl)`` (0-d tensors) with
    :func:`autoencoder_loss` on the wrapped diffusers model ``self.ae``."""

    def __init__(self, ae: nn.Module, kl_weight: float = 1e-6, rec: str = "l1"):
        super().__init__()
        self.ae = ae
        self.kl_weight, self.rec = float(kl_weight), rec

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        loss, parts = autoencoder_loss(self.ae, images, kl_weight=self.kl_weight, rec=self.rec,
                                       generator=generator, return_parts=True)
        return loss, torch.tensor(parts["rec"]), torch.tensor(parts["kl"])


def _images_of(batch) -> torch.Tensor:
    """Images in [-1, 1] from a DALI multi-crop batch ``(crops, indices)`` (normalised with mean = std
    = 0.5: the first crop) or a :class:`~genssl.generators.training.TensorBatchLoader` batch
    (``images``: uint8 ``[B,H,W,3]`` or float ``[B,3,H,W]`` in [-1, 1])."""
    if isinstance(batch, dict):
        x = batch["images"]
        return from_uint8(x) if x.dtype == torch.uint8 else x
    crops, _ = batch
    return crops[0]


class AutoencoderObjective(nn.Module):
    """KL autoencoder training through ``fit``: ``loss = rec + kl_weight·KL`` (the weights live in the
    student, an :class:`AutoencoderLossModule`); no EMA teacher. Logs ``rec`` and ``kl``."""

    teacher = None

    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0, rank: int = 0):
        super().__init__()
        self.dtype, self.seed, self.rank = dtype, int(seed), int(rank)

    def training_loss(self, engine, batch, progress):
        images = _images_of(batch).to(engine.device, self.dtype, non_blocking=True)
        gen = step_generator(self.seed, progress.global_step, self.rank)
        loss, rec, kl = engine(images, gen)
        return loss.float(), {"rec": rec, "kl": kl}


def _unfused_masters(optimizer) -> dict[int, torch.Tensor]:
    """fp32 master copies kept by DeepSpeed's fp16/bf16 optimizers without ZeRO, by id of the
    low-precision parameter.

    DeepSpeed has no public getter for these (``safe_get_full_fp32_param`` covers ZeRO 1–3 and
    ``BF16_Optimizer`` only), and bf16 at ``zero_stage=0`` runs ``FP16_Optimizer`` /
    ``FP16_UnfusedOptimizer`` (DeepSpeed 0.19: ``DDP_BFLOAT16``), so their undocumented (though not
    underscored) groups are read here: ``fp16_groups`` with ``fp32_groups`` (unfused) or
    ``fp32_groups_flat`` (fused). Any other optimizer yields ``{}`` and the parameters themselves are used.
    """
    masters: dict[int, torch.Tensor] = {}
    low = getattr(optimizer, "fp16_groups", None)
    if not low:
        return masters
    high = getattr(optimizer, "fp32_groups", None)
    if high and len(high) == len(low) and all(isinstance(h, (list, tuple)) for h in high):
        for lg, hg in zip(low, high):
            masters.update({id(lp): hp for lp, hp in zip(lg, hg)})
        return masters
    flat = getattr(optimizer, "fp32_groups_flat", None)
    if flat and len(flat) == len(low):
        from torch._utils import _unflatten_dense_tensors

        for lg, f in zip(low, flat):
            masters.update({id(lp): hp for lp, hp in zip(lg, _unflatten_dense_tensors(f, lg))})
    return masters


@torch.no_grad()
def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """The fp32 weights of the module a DeepSpeed ``engine`` trains, on every rank (collective under ZeRO-3).

    Takes the optimizer's fp32 master copy wherever there is one — ZeRO 1–3 and the BF16 optimizer
    (``safe_get_full_fp32_param``), DeepSpeed's fp16/bf16 optimizers without ZeRO (their fp32 groups) —
    and the parameter itself otherwise (fp32 training). Every rank must call it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    masters = _unfused_masters(getattr(engine, "optimizer", None))
    state = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:
            full = masters.get(id(p), p.detach())
        state[name] = full.float().cpu().clone()
    for name, b in module.named_buffers():
        state[name] = b.detach().cpu().clone()
    return state
