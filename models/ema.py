"""EMA teacher that follows a DeepSpeed student exactly under every ZeRO stage.

The teacher is a full fp32 replica on every rank (it never takes gradients, so ZeRO has nothing to
partition for it). Under ZeRO-3 the student's parameters live in shards; the update gathers them
a bucket at a time with ``deepspeed.zero.GatheredParameters`` so peak extra memory is one bucket,
not a second full model. Under bf16/fp16 the student's module weights are low-precision copies of
the fp32 master weights; the EMA is taken in fp32 from those copies (their rounding error averages
out in the EMA; an EMA kept in bf16 would not move at momentum 0.996).

The teacher is deterministic given its weights and input: its copy of the student has no
stochastic depth and no dropout (DINO builds its teacher with ``drop_path_rate=0``), so targets do
not change from call to call nor differ by rank. BatchNorm stays in training mode (batch
statistics, synchronised across ranks by ``convert_sync_batchnorm``), as in DINO.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _without_stochastic_layers(module: nn.Module) -> nn.Module:
    """``module`` with every dropout, stochastic-depth and DropBlock probability set to 0 (in place).

    The layers stay (timm reads ``attn_drop.p``); only their probability goes. DropPath and
    DropBlock are matched by class name and their ``drop_prob`` so any library's count.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        elif type(m).__name__ in ("DropPath", "DropBlock2d"):
            assert hasattr(m, "drop_prob"), f"{type(m).__name__} without drop_prob: cannot switch it off"
            m.drop_prob = 0.0
    return module


class EMATeacher(nn.Module):
    """``teacher ← m·teacher + (1−m)·student`` over parameters (buffers are copied)."""

    def __init__(self, student: nn.Module, bucket_numel: int = 50_000_000):
        super().__init__()
        # Built from the student *before* deepspeed.initialize: afterwards ZeRO-3 shards are empty.
        assert not any(_is_zero3_param(p) for p in student.parameters()), "build the teacher before deepspeed.initialize"
        self.module = _without_stochastic_layers(copy.deepcopy(student).float())
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.bucket_numel = bucket_numel

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _buckets(self, pairs):
        bucket, size = [], 0
        for pair in pairs:
            numel = pair[1].ds_numel if _is_zero3_param(pair[1]) else pair[1].numel()
            bucket.append(pair)
            size += numel
            if size >= self.bucket_numel:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """EMA step; every rank must call it (ZeRO-3 gathers are collective)."""
        teacher_params = dict(self.module.named_parameters())
        pairs = [(teacher_params[name], p) for name, p in student.named_parameters()]
        assert len(pairs) == len(teacher_params), "student and teacher parameter sets differ"
        for bucket in self._buckets(pairs):
            students = [s for _, s in bucket]
            if any(_is_zero3_param(s) for s in students):
                import deepspeed

                with deepspeed.zero.GatheredParameters(students, modifier_rank=None):
                    self._lerp(bucket, momentum)
            else:
                self._lerp(bucket, momentum)
        for (name, tb), (_, sb) in zip(self.module.named_buffers(), student.named_buffers()):
            tb.copy_(sb)
        self._average_buffers_over_ranks()

    def _average_buffers_over_ranks(self) -> None:
        """Running statistics (BatchNorm) differ by rank, each seeing its own batches; the teacher
        takes their mean, so every rank holds the same teacher (one all-reduce of the small buffers)."""
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1).float() for b in buffers])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

    @staticmethod
    def _lerp(bucket, momentum: float) -> None:
        teachers = [t for t, _ in bucket]
        students = [s.detach().to(device=t.device, dtype=t.dtype) for t, s in bucket]
        torch._foreach_lerp_(teachers, students, 1.0 - momentum)
