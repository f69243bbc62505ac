"""MoCo v2 as a genssl objective: InfoNCE of a query against its momentum key and a queue of keys.

- He, Fan, Wu, Xie, Girshick, *Momentum Contrast for Unsupervised Visual Representation Learning*,
  CVPR 2020, https://arxiv.org/abs/1911.05722 (MoCo, shuffling BN §3.3)
- Chen, Fan, Girshick, He, *Improved Baselines with Momentum Contrastive Learning*, 2020,
  https://arxiv.org/abs/2003.04297 (MoCo v2: MLP head, blur, cosine lr) — docs/METHODS.md §5.2

Query ``q = normalize(g(f(x_1)))`` from the student (backbone + 2-layer MLP head), key
``k = normalize(g_m(f_m(x_2)))`` from its EMA (``θ_m ← m·θ_m + (1−m)·θ``, m = 0.999, set by the
recipe through ``cfg.ema``), queue ``Q`` [K, D] of the keys of earlier steps (K = 65536)::

    ℓ_i = −q_i·k_i/τ + log( Σ_j exp(q_i·k_j/τ) + Σ_l exp(q_i·Q_l/τ) ),   L = (1/B) Σ_i ℓ_i

(``MoCoV2Loss`` on the fused kernel; the sum over j, the other keys of this rank's batch, is genssl's
addition: the paper's logits hold the positive and the queue only). One direction, x_1 → x_2, as
the paper. After a kept step the keys of *all* ranks, gathered in rank order, replace the oldest
queue rows (ring buffer, any queue size), so the queue is the same on every rank; a skipped step
enqueues nothing. The queue is a buffer of the objective: checkpoints and resume carry it.

BatchNorm (MoCo §3.3, "shuffling BN"): if a query and its positive key are normalised with the
statistics of the same images, those statistics tell the positive apart from the queue's keys
(computed on other batches) and the model "cheats". Synchronised BN, which genssl applies on > 1
rank, does not prevent this (the positive shares the whole global batch with its query; K. He,
facebookresearch/moco issue #46). genssl therefore splits the global batch into
``mocov2.shuffle_bn_groups`` = G BatchNorm groups: queries in G contiguous chunks of every rank's
batch, keys in G chunks of a random permutation of it, one forward call per chunk (SyncBN joins the
same chunk of every rank). A query and its key then see statistics of two different random subsets
of ~global_batch/G images, as the paper's G = 8 GPUs — on any number of ranks, one included.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from genssl.kernels.distributed import all_gather_no_grad
from genssl.models.contrastive import MoCoV2Loss
from genssl.models.ema import EMATeacher
from genssl.models.heads import SSLStudent, projection_mlp
from genssl.models.qdc import quality_weights
from genssl.models.simclr import two_view_crops

__all__ = ["MoCoV2Config", "build_mocov2_student", "MoCoV2Objective", "mocov2_loss_reference"]


@dataclasses.dataclass
class MoCoV2Config:
    """Head, queue and loss settings; defaults = MoCo v2, ImageNet, ResNet-50, batch 256 on 8 GPUs."""

    hidden_dim: int = 2048         # MLP head 2048 → 2048 → 128, ReLU, no BN (official `--mlp`)
    out_dim: int = 128             # `--moco-dim 128`
    queue_size: int = 65536        # K (`--moco-k`)
    temperature: float = 0.2       # τ (`--moco-t 0.2` for MoCo v2)
    shuffle_bn_groups: int = 8     # the paper's 8 GPUs x 32 images; 1 = plain (Sync)BN, which leaks

    def validate(self) -> None:
        if self.hidden_dim < 1 or self.out_dim < 1:
            raise ValueError(f"mocov2.hidden_dim and mocov2.out_dim must be >= 1, got {self.hidden_dim} and {self.out_dim}")
        if self.queue_size < 1:
            raise ValueError(f"mocov2.queue_size must be >= 1 (paper: 65536), got {self.queue_size}")
        if not self.temperature > 0:
            raise ValueError(f"mocov2.temperature must be > 0 (paper: 0.2), got {self.temperature}")
        if self.shuffle_bn_groups < 1:
            raise ValueError(f"mocov2.shuffle_bn_groups must be >= 1 (paper: 8; 1 disables shuffling BN), "
                             f"got {self.shuffle_bn_groups}")


def build_mocov2_student(backbone: nn.Module, cfg: MoCoV2Config) -> SSLStudent:
    cfg.validate()
    projector = projection_mlp(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=2, hidden_bn=False)
    return SSLStudent(backbone, projector)


class MoCoV2Objective(nn.Module):
    """Query (student) vs. key (EMA teacher) and the queue; the queue moves only in `step_kept`."""

    def __init__(self, student: SSLStudent, cfg: MoCoV2Config, n_global: int, epochs: int, dtype: torch.dtype):
        super().__init__()
        cfg.validate()
        if n_global != 2:
            raise ValueError(f"mocov2 needs n_global=2 global crops, got {n_global}; set crops.n_global=2")
        self.teacher = EMATeacher(student)
        self.loss = MoCoV2Loss(cfg.out_dim, queue_size=cfg.queue_size, temperature=cfg.temperature)
        self.cfg, self.dtype = cfg, dtype
        self._pending_keys: torch.Tensor | None = None  # all ranks' keys of the last step, until it is kept

    def _groups(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        G = self.cfg.shuffle_bn_groups
        if x.shape[0] < G:
            raise ValueError(f"mocov2.shuffle_bn_groups={G} needs at least {G} images per rank, got a batch of "
                             f"{x.shape[0]}; lower mocov2.shuffle_bn_groups or raise batch_size")
        return x.tensor_split(G)

    def queries(self, engine, x: torch.Tensor) -> torch.Tensor:
        """Student projections ``[B, D]``, one forward call (one BN group) per contiguous chunk."""
        return torch.cat([engine(chunk.to(self.dtype))[0] for chunk in self._groups(x)])

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher projections ``[B, D]`` (fp32) in the input order, BN groups drawn at random."""
        perm = torch.randperm(x.shape[0], device=x.device)
        half = self.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=half):
            k_perm = torch.cat([self.teacher(chunk)[0].float() for chunk in self._groups(x[perm])])
        k = torch.empty_like(k_perm)
        k[perm] = k_perm  # undo the shuffle
        return k

    def training_loss(self, engine, batch, progress):
        crops, _ = batch
        x_q, x_k = two_view_crops(crops, "mocov2")
        k = self.keys(x_k)
        q = self.queries(engine, x_q)
        loss = self.loss(q, k, weights=quality_weights(self, x_q, x_k), update_queue=False)  # GenView QDC (models/qdc.py)
        self._pending_keys = all_gather_no_grad(F.normalize(k, dim=1))  # [W*B, D], rank order
        return loss, {"loss_contrastive": loss.detach()}

    def step_kept(self) -> None:
        """The engine keeps this step: every rank enqueues the same gathered keys."""
        assert self._pending_keys is not None, "step_kept() without a training_loss() before it"
        self.loss.enqueue(self._pending_keys)
        self._pending_keys = None

    def late_parameters(self, student: SSLStudent) -> list[nn.Parameter]:
        return []


def mocov2_loss_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain-torch MoCo v2 loss as genssl computes it, one query at a time.

    q, k: [B, D] queries and keys (normalised here); queue: [K, D] (already normalised). Row i's
    columns are all B keys (positive k_i) and the queue."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    columns = torch.cat([k, queue])  # [B + K, D]
    losses = [torch.logsumexp(columns @ q[i] / temperature, dim=0) - k[i] @ q[i] / temperature
              for i in range(q.shape[0])]
    return torch.stack(losses).mean()
