"""Recipe plumbing shared by every training recipe: data splits and the per-rank train loader."""

from __future__ import annotations

import dataclasses

from genssl.data.augment import MultiCropSpec
from genssl.data.builtin import resolve_data
from genssl.data.index import DatasetIndex, build_index
from genssl.engine.distributed import DistInfo, barrier
from genssl.engine.run_config import TrainConfig


@dataclasses.dataclass
class Data:
    train: DatasetIndex
    val: DatasetIndex | None


def load_data(spec: str, cache_dir: str, dist: DistInfo) -> Data:
    """Resolve ``data=`` and index it; rank 0 first (it writes built-in data and caches), then the rest."""
    cache = cache_dir or None

    def build() -> Data:
        splits = resolve_data(spec, cache)
        root = splits.train.parent if splits.val is not None else None  # links from val/ into train/ stay inside
        train = build_index(splits.train, cache, data_root=root)
        # val is labelled by class name with train's classes: a val/ lacking a class must not shift the rest
        val = (build_index(splits.val, cache, classes=train.classes or None, data_root=root)
               if splits.val is not None else None)
        return Data(train, val)

    if dist.is_main:
        data = build()
        if data.train.quarantine:
            print(f"data: {len(data.train.quarantine)} unreadable file(s) skipped; reasons in {data.train.report}", flush=True)
    barrier()
    if not dist.is_main:
        data = build()
    return data


def train_loader(index: DatasetIndex, spec: MultiCropSpec, cfg: TrainConfig, dist: DistInfo):
    """The rank's DALI multi-crop loader (GPU decode on CUDA, CPU pipeline otherwise)."""
    from genssl.data.dali_loader import DaliMultiCropLoader  # DALI is imported only when data is read

    device_id = dist.local_rank if dist.device.type == "cuda" else None
    return DaliMultiCropLoader(index, spec, cfg.batch_size, dist.rank, dist.world_size, cfg.seed,
                               device_id=device_id, num_threads=max(1, cfg.num_workers))
