"""Gen-DINO: DINO with generated views and the Gen-SIS disentanglement loss.

Belagali, Yellapragada, Graikos, Kapse, Li, Nath, Saltz, Prasanna, Samaras (2024/2025), "Gen-SIS:
Generative Self-augmentation Improves Self-supervised Learning". See docs/METHODS.md §1.6.

Training is DINO (`genssl.models.dino`) on batches of `genssl.data.gensis_loader.GenSISLoader`:
one global crop of a sample comes from a synthetic view of the same image with probability p_gen
(the teacher sees the global crops as they come, real or synthetic), plus the **disentanglement
loss** on interpolated views. For an interpolated view ``v_int`` generated from the embeddings of
images 1 and 2 with weight α on image 1 (slerp), with teacher g_t, student g_s, centre c and
temperatures τ_t, τ_s:

    q_ent = softmax((α·g_t(v_1) + (1 − α)·g_t(v_2) − c) / τ_t)        (no gradient)
    L_dis = −mean_b Σ_k q_ent,k · log softmax(g_s(v_int) / τ_s)_k
    L     = L_DINO + λ·L_dis

The two teachers' *raw* head logits are mixed, then centred and sharpened with DINO's centre and
teacher temperature (`DINOLoss.teacher_probs`); the student sees only ``v_int``, the teachers only
the real images (``v_1`` = the real image's first global crop, ``v_2`` = a global crop of the
partner's real image). The centre is updated once per step, from the teacher outputs of L_DINO's
global crops only (not from the partner crops or the mixed logits), after both terms are computed.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from genssl.models.dino import DINOLoss, MultiCropWrapper
from genssl.models.objectives import DINOConfig, DINOObjective

__all__ = ["GenDINOConfig", "GenDINOObjective", "disentanglement_loss", "disentanglement_loss_reference"]


@dataclasses.dataclass
class GenDINOConfig:
    """Gen-DINO settings (docs/METHODS.md §1.6 defaults)."""

    p_gen: float = 0.5          # probability that global crop slot 1 comes from a synthetic view
    lambda_dis: float = 1.0     # weight λ of the disentanglement loss
    interpolation: bool = True  # use interpolated views and L_dis at all

    def validate(self) -> None:
        if not 0.0 <= self.p_gen <= 1.0:
            raise ValueError(f"gendino.p_gen is a probability and must be in [0, 1], got {self.p_gen}")
        if not self.lambda_dis >= 0.0:
            raise ValueError(f"gendino.lambda_dis must be >= 0, got {self.lambda_dis}")


def _mix(teacher_logits_1: Tensor, teacher_logits_2: Tensor, alpha: Tensor) -> Tensor:
    if teacher_logits_1.shape != teacher_logits_2.shape or teacher_logits_1.dim() != 2:
        raise ValueError(f"teacher logits must both be [B, D], got {tuple(teacher_logits_1.shape)} and "
                         f"{tuple(teacher_logits_2.shape)}")
    alpha = torch.as_tensor(alpha)
    if alpha.shape != (teacher_logits_1.shape[0],):
        raise ValueError(f"alpha must be [B] = [{teacher_logits_1.shape[0]}], got {tuple(alpha.shape)}")
    dtype = torch.promote_types(torch.promote_types(teacher_logits_1.dtype, teacher_logits_2.dtype), torch.float32)
    a = alpha.to(device=teacher_logits_1.device, dtype=dtype).unsqueeze(1)
    return a * teacher_logits_1.detach().to(dtype) + (1 - a) * teacher_logits_2.detach().to(dtype)


def disentanglement_loss(dino_loss: DINOLoss, teacher_logits_1: Tensor, teacher_logits_2: Tensor, alpha: Tensor,
                         student_logits_interp: Tensor, teacher_temp: float) -> Tensor:
    """``L_dis`` (module docstring), a scalar. Logits are ``[B, D]`` raw head outputs, ``alpha`` ``[B]``
    the weight on image 1. Uses ``dino_loss``'s centre and student temperature; does not update the
    centre. Gradients reach only ``student_logits_interp``. Mixing and softmaxes run in float32 for
    half/bf16 inputs (float64 stays float64)."""
    q_ent = dino_loss.teacher_probs(_mix(teacher_logits_1, teacher_logits_2, alpha), teacher_temp)
    return dino_loss.cross_entropy(q_ent, student_logits_interp)


def disentanglement_loss_reference(teacher_logits_1: Tensor, teacher_logits_2: Tensor, alpha: Tensor,
                                   student_logits_interp: Tensor, center: Tensor, teacher_temp: float,
                                   student_temp: float) -> Tensor:
    """Plain per-sample loop of the formula, for tests (no centre update)."""
    total = student_logits_interp.new_zeros(())
    batch = teacher_logits_1.shape[0]
    for b in range(batch):
        mixed = alpha[b] * teacher_logits_1[b] + (1 - alpha[b]) * teacher_logits_2[b]
        q = F.softmax((mixed - center.reshape(-1)) / teacher_temp, dim=-1).detach()
        log_p = F.log_softmax(student_logits_interp[b] / student_temp, dim=-1)
        total = total - (q * log_p).sum()
    return total / batch


def _batch_fields(batch) -> tuple[list[Tensor], Tensor | None, Tensor | None, Tensor | None]:
    """(crops, interp, partner, alpha) of a `GenSISBatch`, a dict with those keys, or a plain
    ``(crops, indices)`` DINO batch (no interpolation parts)."""
    if isinstance(batch, dict):
        return batch["crops"], batch.get("interp"), batch.get("partner"), batch.get("alpha")
    if hasattr(batch, "crops"):
        return batch.crops, getattr(batch, "interp", None), getattr(batch, "partner", None), getattr(batch, "alpha", None)
    crops, _ = batch
    return crops, None, None, None


class GenDINOObjective(DINOObjective):
    """``L = L_DINO + λ·L_dis`` (module docstring) for the engine (`genssl.engine.trainer.fit`).

    Per step: one teacher forward over the global crops followed by the partner crops (same
    resolution, one backbone call); one student (engine) forward over ``crops[:G] + [interp] +
    crops[G:]`` — the interpolated crops next to the global crops of the same size, so the backbone
    runs once per resolution — whose output rows are split back into L_DINO's crop-major rows and the
    interpolated rows. Both terms use the centre as it was before the step; the centre is updated
    once from the teacher outputs of the ``G`` global crops, when the engine keeps the step
    (`step_kept`). Terms: ``loss_dino``,
    ``loss_dis`` (when computed), ``teacher_temp``.

    With ``gen.interpolation`` off or ``gen.lambda_dis == 0`` it is `DINOObjective` exactly (same
    forward passes, same loss, same centre update); it also accepts plain ``(crops, indices)``
    batches then.
    """

    def __init__(self, student: MultiCropWrapper, cfg: DINOConfig, n_global: int, epochs: int, dtype: torch.dtype,
                 gen: GenDINOConfig | None = None):
        super().__init__(student, cfg, n_global, epochs, dtype)
        self.gen = gen if gen is not None else GenDINOConfig()
        self.gen.validate()

    @property
    def uses_dis(self) -> bool:
        return self.gen.interpolation and self.gen.lambda_dis != 0

    def training_loss(self, engine, batch, progress):
        crops, interp, partner, alpha = _batch_fields(batch)
        if not self.uses_dis:
            loss, terms = super().training_loss(engine, (crops, None), progress)
            return loss, {"loss_dino": loss.detach(), **terms}
        if interp is None or partner is None or alpha is None:
            raise ValueError("GenDINOObjective with interpolation on needs batches with interp, partner and alpha "
                             "(GenSISLoader(..., interpolation=True)); or set gendino.interpolation=false / "
                             "gendino.lambda_dis=0")
        G, B = self.n_global, crops[0].shape[0]
        teacher_all = self.teacher_logits(list(crops[:G]) + [partner])        # [(G+1)·B, D]
        teacher_dino, teacher_partner = teacher_all[:G * B], teacher_all[G * B:]
        student_all = engine([c.to(self.dtype) for c in list(crops[:G]) + [interp] + list(crops[G:])])
        student_dino = torch.cat([student_all[:G * B], student_all[(G + 1) * B:]])
        student_interp = student_all[G * B:(G + 1) * B]
        temp = float(self.teacher_temps[min(progress.epoch, self.epochs - 1)])
        loss_dino = self.loss(student_dino, teacher_dino, temp, update_center=False)
        loss_dis = disentanglement_loss(self.loss, teacher_dino[:B], teacher_partner, alpha, student_interp, temp)
        self.defer_center_update(teacher_dino)
        loss = loss_dino + self.gen.lambda_dis * loss_dis
        return loss, {"loss_dino": loss_dino.detach(), "loss_dis": loss_dis.detach(), "teacher_temp": torch.tensor(temp),
                      "head_entropy": self.head_entropy(student_dino)}
