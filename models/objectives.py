"""Training objectives the engine runs: everything of a method except the optimised student.

An objective owns the EMA teacher, the loss modules and their state (DINO's centre), and turns a
batch into a loss through the DeepSpeed-wrapped student (``engine``). The engine stays unaware of
which method is running.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from genssl.models.backbones import build_backbone
from genssl.models.dino import DINOHead, DINOLoss, MultiCropWrapper
from genssl.models.ema import EMATeacher
from genssl.models.schedules import warmup_then_constant


@dataclasses.dataclass
class DINOConfig:
    """DINO head and loss settings (Caron et al. 2021; ViT-S/16 reference values)."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    drop_path_rate: float = 0.1

    def validate(self) -> None:
        if min(self.out_dim, self.hidden_dim, self.bottleneck_dim) < 1:
            raise ValueError("dino.out_dim, dino.hidden_dim and dino.bottleneck_dim must be >= 1")
        if min(self.student_temp, self.teacher_temp, self.warmup_teacher_temp) <= 0:
            raise ValueError("dino temperatures must be > 0")


def build_dino_student(model: str, img_size: int, patch_size: int, cfg: DINOConfig, stem_stride: int = 4,
                       width: int = 64) -> MultiCropWrapper:
    backbone = build_backbone(model, img_size=img_size, patch_size=patch_size if model.startswith("vit") else None,
                              drop_path_rate=cfg.drop_path_rate, stem_stride=stem_stride, width=width)
    head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, norm_last_layer=cfg.norm_last_layer)
    return MultiCropWrapper(backbone, head)


COLLAPSE_ENTROPY = 0.999  # student output entropy / ln(out_dim) above which the output counts as uniform
COLLAPSE_STEPS = 50


class DINOObjective(nn.Module):
    """``L_DINO``: teacher sees the global crops, the student every crop (crop-major batches).

    Batches are ``(crops, indices)`` with the ``n_global`` global crops first. The teacher runs in
    fp32 weights under autocast in the training precision; the student receives crops in the
    engine's dtype. The centre moves towards the teacher's outputs on the global crops in
    `step_kept`, which the engine calls only for steps every rank keeps: a skipped (non-finite)
    step must not leave its outputs in the centre.
    """

    def __init__(self, student: MultiCropWrapper, cfg: DINOConfig, n_global: int, epochs: int, dtype: torch.dtype):
        super().__init__()
        self.teacher = EMATeacher(student)
        self.loss = DINOLoss(cfg.out_dim, n_global=n_global, student_temp=cfg.student_temp,
                             center_momentum=cfg.center_momentum)
        self.cfg, self.n_global, self.epochs, self.dtype = cfg, n_global, epochs, dtype
        self.teacher_temps = warmup_then_constant(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                                  cfg.warmup_teacher_temp_epochs, epochs)
        self._pending_center: torch.Tensor | None = None  # teacher outputs of the last step, until it is kept
        self._uniform_steps = 0  # consecutive kept steps with a uniform student output (`count_uniform`)
        self._pending_entropy: torch.Tensor | None = None  # `head_entropy` of the last step, until it is kept

    def defer_center_update(self, teacher_out: torch.Tensor) -> None:
        self._pending_center = teacher_out.detach()

    def step_kept(self) -> None:
        """The engine keeps this step: the centre moves towards its teacher outputs (all ranks)."""
        assert self._pending_center is not None, "step_kept() without a training_loss() before it"
        self.loss.update_center(self._pending_center)
        self._pending_center = None
        if self._pending_entropy is not None:  # the step is decided, so the device is synced: no stall
            self.count_uniform(float(self._pending_entropy))
            self._pending_entropy = None

    def head_entropy(self, student_out: torch.Tensor) -> torch.Tensor:
        """The student's mean output entropy over ln(out_dim) (1 = uniform), logged as ``head_entropy``;
        stays on the device (read on the host in `step_kept`, after the trainer's own per-step sync).

        A DINO head can collapse to a uniform output: the loss then sits at ln(out_dim) whatever the
        teacher says, and the backbone stops learning, silently (docs/LEARNING.md saw it on the
        built-in data)."""
        with torch.no_grad():
            logp = F.log_softmax(student_out.float() / self.loss.student_temp, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1).mean() / math.log(student_out.shape[-1])
        self._pending_entropy = entropy
        return entropy

    def count_uniform(self, entropy: float) -> None:
        """After `COLLAPSE_STEPS` steps in a row above `COLLAPSE_ENTROPY`, warn once."""
        self._uniform_steps = self._uniform_steps + 1 if entropy > COLLAPSE_ENTROPY else 0
        if self._uniform_steps == COLLAPSE_STEPS:
            warnings.warn(f"DINO: the student's output has been uniform for {COLLAPSE_STEPS} steps (entropy "
                          f"{entropy:.4f} of ln(out_dim); the loss sits at ln(out_dim)): the head collapsed and "
                          "the encoder stops learning. Lower optim.lr, keep dino.norm_last_layer=true, or lower "
                          "dino.teacher_temp (docs/LEARNING.md)", RuntimeWarning, stacklevel=2)

    def watch_collapse(self, student_out: torch.Tensor) -> torch.Tensor:
        """`head_entropy` and `count_uniform` at once (outside the training loop)."""
        entropy = self.head_entropy(student_out)
        self._pending_entropy = None
        self.count_uniform(float(entropy))
        return entropy

    def teacher_logits(self, crops: list[torch.Tensor]) -> torch.Tensor:
        device = crops[0].device
        with torch.no_grad(), torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.teacher(crops).float()

    def training_loss(self, engine, batch, progress):
        crops, _ = batch
        teacher_out = self.teacher_logits(crops[: self.n_global])
        student_out = engine([c.to(self.dtype) for c in crops])
        temp = float(self.teacher_temps[min(progress.epoch, self.epochs - 1)])
        loss = self.loss(student_out, teacher_out, temp, update_center=False)
        self.defer_center_update(teacher_out)
        return loss, {"teacher_temp": torch.tensor(temp), "head_entropy": self.head_entropy(student_out)}
