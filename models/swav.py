"""SwAV: swapped prediction of online cluster assignments (docs/METHODS.md §5.7).

- Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, "Unsupervised Learning of Visual Features by
  Contrasting Cluster Assignments", NeurIPS 2020, https://arxiv.org/abs/2006.09882
- official code: github.com/facebookresearch/swav, main_swav.py (`train`, `distributed_sinkhorn`),
  src/resnet50.py (`projection_head`, `prototypes`)

Student: backbone → projector (2048 → 2048 BN ReLU → 128) → ``ẑ = z/‖z‖`` → scores ``s = ẑ·c_k``
against K prototypes ``c_k`` with unit rows (K = 3000). For every global crop i the *codes* ``q_i``
come from the scores of that crop (no gradient) by Sinkhorn-Knopp, which spreads the batch
equally over the prototypes::

    Q = exp(S / ε)ᵀ  [K, N],  Q ← Q / ΣQ,  then `iterations` times:
        rows:    Q_k· ← Q_k· / (K Σ_n Q_kn)       (each prototype gets 1/K of the mass)
        columns: Q_·n ← Q_·n / (N Σ_k Q_kn)       (each sample 1/N)
    codes = N·Qᵀ  [N, K]  (rows sum to 1),        ε = 0.05, 3 iterations

and every *other* crop v (global or local) predicts them::

    L = 1/n_global Σ_{i global} 1/(V−1) Σ_{v≠i} mean_batch [ −Σ_k q_ik log softmax(s_v / τ)_k ],  τ = 0.1

Distributed: the Sinkhorn sums run over the global batch (all-reduced row sums and total, as the
official `distributed_sinkhorn`), so codes on W ranks equal the single-process codes on the
concatenated batch; the loss is each rank's local mean (the engine's convention).

Queue (``queue_length`` > 0, from epoch ``epoch_queue_starts``): the normalised projections ``ẑ`` of
the global crops of past batches, only to compute codes (their scores are prepended to the batch's
columns in Sinkhorn). Unlike the official per-rank queues, genssl keeps one global queue, identical
on every rank (all-gathered, then shifted in `step_kept`), and each rank takes its 1/W slice of it
as extra Sinkhorn columns: the columns of all ranks together are the whole queue once, as in the
official code, while the objective's state stays rank-independent (the trainer checkpoints rank 0's
objective state and broadcasts it at start). As in the official code, the queue is used only once
it is full.

Prototype rows are unit-norm: the official code renormalises the weights in place before each
step; genssl normalises them inside the forward (the weight-normalised last layer of DINO with g
fixed to 1, `genssl.models.dino.WeightNormLinear`), which stays correct under ZeRO and
mixed precision where an in-place edit of the module's weights would be lost to the optimizer's
fp32 master copy (docs/METHODS.md §5.7). Prototypes are frozen in the first epoch
(`late_parameters`, the engine's ``optim.freeze_last_layer_epochs``; official
``freeze_prototypes_niters`` 313 = one epoch at batch 4096).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from genssl.kernels.distributed import all_gather_no_grad, world_info
from genssl.models.dino import WeightNormLinear
from genssl.models.heads import SSLStudent, projection_mlp
from genssl.models.qdc import quality_weights

__all__ = ["SwAVConfig", "SwAVPrototypes", "build_swav_student", "sinkhorn_knopp", "sinkhorn_knopp_reference",
           "swav_loss", "swav_loss_reference", "SwAVObjective"]


@dataclasses.dataclass
class SwAVConfig:
    """SwAV head, codes and loss (official ImageNet ResNet-50 scripts, e.g. swav_800ep_pretrain.sh)."""

    hidden_dim: int = 2048         # `--hidden_mlp`
    out_dim: int = 128             # `--feat_dim`
    n_prototypes: int = 3000       # `--nmb_prototypes`
    temperature: float = 0.1       # τ of the predicted distribution
    epsilon: float = 0.05          # ε of the Sinkhorn codes
    sinkhorn_iterations: int = 3
    queue_length: int = 0          # 0 at batch 4096; the paper's small-batch runs use 3840 (batch 256)
    epoch_queue_starts: int = 15

    def validate(self) -> None:
        for name in ("hidden_dim", "out_dim", "n_prototypes", "sinkhorn_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"swav.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("temperature", "epsilon"):
            if getattr(self, name) <= 0:
                raise ValueError(f"swav.{name} must be > 0, got {getattr(self, name)}")
        if self.queue_length < 0 or self.epoch_queue_starts < 0:
            raise ValueError(f"swav.queue_length and swav.epoch_queue_starts must be >= 0 (queue_length=0 turns "
                             f"the queue off), got {self.queue_length}, {self.epoch_queue_starts}")


class SwAVPrototypes(nn.Module):
    """``z`` [N, D] → scores ``ẑ·c_kᵀ`` [N, K] with ẑ = z/‖z‖ and unit prototype rows c_k."""

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__()
        self.prototypes = WeightNormLinear(dim, n_prototypes, train_g=False)  # bias-free, rows normalised in forward

    def forward(self, z: Tensor) -> Tensor:
        return self.prototypes(F.normalize(z, dim=1))


def build_swav_student(backbone: nn.Module, cfg: SwAVConfig) -> SSLStudent:
    """backbone → projector → `SwAVPrototypes` (in the student's predictor slot: p = scores)."""
    cfg.validate()
    projector = projection_mlp(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=2)
    return SSLStudent(backbone, projector, SwAVPrototypes(cfg.out_dim, cfg.n_prototypes))


def _sum_over_ranks(t: Tensor) -> Tensor:
    _, world = world_info()
    if world > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Codes [n, K] (rows sum to 1) of this rank's columns ``scores`` [n, K], over the columns of all ranks.

    Scores are cosines (|s| ≤ 1), so ``exp(s/ε) ≤ e^20`` cannot overflow in fp32; the work is done
    in fp32 at least, whatever the scores' dtype.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n, K], got shape {tuple(scores.shape)}")
    q = torch.exp(scores.to(torch.promote_types(scores.dtype, torch.float32)) / epsilon).t()  # [K, n]
    k = q.shape[0]
    # Total mass and global column count in one all-reduce (ranks may hold different numbers of columns).
    total = _sum_over_ranks(torch.stack([q.sum(), q.new_tensor(float(q.shape[1]))]))
    q /= total[0]
    n_total = total[1]
    for _ in range(iterations):
        q /= _sum_over_ranks(q.sum(dim=1, keepdim=True)) * k
        q /= q.sum(dim=0, keepdim=True) * n_total  # columns are whole on every rank: no reduction
    return (q * n_total).t()


def sinkhorn_knopp_reference(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Single-process Sinkhorn as the paper writes it (tests only): Q = Diag(u) P Diag(v) with
    P = exp(Sᵀ/ε)/ΣP, alternating u (rows → 1/K) and v (columns → 1/N); codes = N·Qᵀ."""
    p = torch.exp(scores.t() / epsilon)
    p = p / p.sum()
    k, n = p.shape
    u, v = torch.ones(k, dtype=p.dtype), torch.ones(n, dtype=p.dtype)
    for _ in range(iterations):
        u = (1 / k) / (p * v[None, :]).sum(1)
        v = (1 / n) / (u[:, None] * p).sum(0)
    return n * (u[:, None] * p * v[None, :]).t()


def swav_loss(scores: Tensor, codes: Tensor, n_global: int, temperature: float = 0.1,
              weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(L, per_global)``: swapped prediction over all crops (module docstring).

    Args:
        scores: [V·B, K] scores of the V crops, crop-major (rows i·B … (i+1)·B − 1 = crop i).
        codes: [n_global·B, K] codes of the first n_global crops (no gradient taken).
        temperature: τ of the softmax over prototypes (paper 0.1).
        weights: optional [B] per-image weights (GenView's QDC weights, detached; default 1), the same
            for every crop pair of an image.

    ``per_global`` [n_global]: the term of each global crop's codes (L is their mean).
    """
    if codes.dim() != 2 or scores.dim() != 2 or codes.shape[1] != scores.shape[1]:
        raise ValueError(f"scores [V*B, K] and codes [n_global*B, K] must share K, got {tuple(scores.shape)} "
                         f"and {tuple(codes.shape)}")
    if n_global < 1 or codes.shape[0] % n_global:
        raise ValueError(f"codes has {codes.shape[0]} rows, not a multiple of n_global={n_global}")
    b, k = codes.shape[0] // n_global, codes.shape[1]
    if scores.shape[0] % b or scores.shape[0] // b < max(2, n_global):
        raise ValueError(f"scores must hold V >= max(2, n_global) crops of {b} rows, got {scores.shape[0]} rows")
    n_crops = scores.shape[0] // b
    log_p = F.log_softmax(scores / temperature, dim=1).view(n_crops, b, k)
    q = codes.detach().view(n_global, b, k)
    w = None if weights is None else weights.detach().to(log_p.dtype).view(1, b)
    terms = []
    for i in range(n_global):
        others = [v for v in range(n_crops) if v != i]
        ce = -(q[i] * log_p[others]).sum(-1)  # [V − 1, b]
        terms.append((ce if w is None else w * ce).mean())  # mean over (other crops, batch)
    per_global = torch.stack(terms)
    return per_global.mean(), per_global


def swav_loss_reference(scores: Tensor, codes: Tensor, n_global: int, temperature: float = 0.1,
                        weights: Tensor | None = None) -> Tensor:
    """Loops over global crops, other crops and samples, as the official `train`, weighted (tests only)."""
    b = codes.shape[0] // n_global
    w = torch.ones(b, dtype=scores.dtype) if weights is None else weights
    n_crops = scores.shape[0] // b
    loss = 0
    for i in range(n_global):
        sub = 0
        for v in range(n_crops):
            if v == i:
                continue
            for n in range(b):
                log_p = torch.log_softmax(scores[v * b + n] / temperature, dim=0)
                sub = sub - w[n] * (codes[i * b + n].detach() * log_p).sum() / b
        loss = loss + sub / (n_crops - 1)
    return loss / n_global


def _prototype_weights(engine) -> Tensor:
    """Unit prototype rows [K, D] of the student behind ``engine`` (gathered under ZeRO-3), detached."""
    layer = getattr(engine, "module", engine).predictor.prototypes
    v = layer.weight_v
    if hasattr(v, "ds_id"):  # a ZeRO-3 shard: every rank gathers it (collective)
        import deepspeed

        with deepspeed.zero.GatheredParameters([v], modifier_rank=None):
            return F.normalize(v.detach().float(), dim=1).clone()
    return F.normalize(v.detach().to(torch.promote_types(v.dtype, torch.float32)), dim=1)


class SwAVObjective(nn.Module):
    """SwAV over ``n_global`` global crops (codes) and any local crops; optional global queue."""

    def __init__(self, student: SSLStudent, cfg: SwAVConfig, n_global: int, epochs: int, dtype: torch.dtype):
        super().__init__()
        cfg.validate()
        if n_global < 1:
            raise ValueError(f"SwAV computes codes on the global crops: crops.n_global must be >= 1, got {n_global}")
        if not isinstance(student.predictor, SwAVPrototypes):
            raise ValueError("SwAV needs the prototypes in the student: build it with build_swav_student")
        self.teacher = None
        self.cfg, self.n_global, self.dtype = cfg, n_global, dtype
        if cfg.queue_length > 0:
            # Newest first; the count says how much of it is real (the queue is used once full).
            self.register_buffer("queue", torch.zeros(n_global, cfg.queue_length, cfg.out_dim))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._pending: Tensor | None = None  # this step's gathered ẑ [n_global, W·B, D], until kept

    def late_parameters(self, student: SSLStudent) -> list[nn.Parameter]:
        """The prototypes: frozen for the first ``optim.freeze_last_layer_epochs`` epochs (official: 1)."""
        return [student.predictor.prototypes.weight_v]

    def _queue_in_use(self) -> bool:
        return self.cfg.queue_length > 0 and int(self.queue_filled) >= self.cfg.queue_length

    def _queue_slice(self) -> Tensor:
        """This rank's 1/W of the queue [n_global, L/W, D] (the ranks' slices partition it)."""
        rank, world = world_info()
        length = self.cfg.queue_length
        if length % world:
            raise ValueError(f"swav.queue_length={length} must be a multiple of the number of ranks ({world})")
        return self.queue[:, rank * length // world:(rank + 1) * length // world]

    @torch.no_grad()
    def codes(self, scores: Tensor, engine) -> Tensor:
        """Sinkhorn codes [n_global·B, K] of the global crops' ``scores`` [n_global·B, K] (+ the queue)."""
        b = scores.shape[0] // self.n_global
        extra = None
        if self._queue_in_use():
            prototypes = _prototype_weights(engine).to(scores.dtype)                # [K, D]
            extra = self._queue_slice().to(scores.dtype) @ prototypes.t()          # [n_global, L/W, K]
        out = []
        for i in range(self.n_global):
            s = scores[i * b:(i + 1) * b]
            if extra is not None:
                s = torch.cat([extra[i], s])
            out.append(sinkhorn_knopp(s, self.cfg.epsilon, self.cfg.sinkhorn_iterations)[-b:])
        return torch.cat(out)

    def training_loss(self, engine, batch, progress) -> tuple[Tensor, dict[str, Tensor]]:
        crops, _ = batch
        if len(crops) < max(2, self.n_global):
            raise ValueError(f"SwAV needs the {self.n_global} global crops and at least 2 crops in all, "
                             f"got {len(crops)}")
        b = crops[0].shape[0]
        z, scores = engine([c.to(self.dtype) for c in crops])  # [V·B, D], [V·B, K]
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        n_codes = self.n_global * b
        codes = self.codes(scores[:n_codes].detach(), engine)
        w = quality_weights(self, crops[0], crops[1])  # GenView QDC (models/qdc.py); None: unweighted
        loss, per_global = swav_loss(scores, codes, self.n_global, self.cfg.temperature, w)
        self._pending = None
        if self.cfg.queue_length > 0 and progress.epoch >= self.cfg.epoch_queue_starts:
            emb = F.normalize(z[:n_codes].detach().to(scores.dtype), dim=1).view(self.n_global, b, -1)
            # Gathered in global batch order (rank-major), crop by crop: [n_global, W·B, D].
            self._pending = all_gather_no_grad(emb.transpose(0, 1).contiguous()).transpose(0, 1)
        terms = {f"loss_crop{i}": per_global[i].detach() for i in range(self.n_global)}
        if self.cfg.queue_length > 0:
            terms["queue_in_use"] = torch.tensor(float(self._queue_in_use()))
        return loss, terms

    @torch.no_grad()
    def step_kept(self) -> None:
        """The engine keeps this step: its global-crop projections enter the queue (same on all ranks)."""
        if self._pending is None:
            return
        new = self._pending.to(self.queue.dtype)
        self.queue.copy_(torch.cat([new, self.queue], dim=1)[:, :self.cfg.queue_length])
        self.queue_filled.add_(new.shape[1]).clamp_(max=self.cfg.queue_length)
        self._pending = None
