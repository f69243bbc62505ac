"""Recipe plumbing shared by every training recipe: data splits and the per-rank train loader."""

from __future__ import annotations

import dataclasses
import uuid

from genssl.data.augment import MultiCropSpec
from genssl.data.builtin import resolve_data
from genssl.data.index import DatasetIndex, build_index
from genssl.engine.distributed import DistInfo, broadcast_object
from genssl.engine.run_config import TrainConfig


@dataclasses.dataclass
class Data:
    train: DatasetIndex
    val: DatasetIndex | None


def load_data(spec: str, cache_dir: str, dist: DistInfo) -> Data:
    """Resolve ``data=`` and index it on every rank together: rank 0 writes built-in data first,
    then finds the files, every rank validates a slice of those that changed, rank 0 publishes the
    index and each rank maps it (data/index.py; coordinated through files in the cache, no flock)."""
    cache = cache_dir or None
    splits = resolve_data(spec, cache) if dist.is_main else None
    # one id for this run's index markers; the broadcast also holds the other ranks until built-in data exist
    run_id = broadcast_object(uuid.uuid4().hex if dist.is_main else None)
    if splits is None:
        splits = resolve_data(spec, cache)
    together = {"rank": dist.rank, "world_size": dist.world_size, "run_id": run_id}
    root = splits.train.parent if splits.val is not None else None  # links from val/ into train/ stay inside
    train = build_index(splits.train, cache, data_root=root, **together)
    # val is labelled by class name with train's classes: a val/ lacking a class must not shift the rest
    val = (build_index(splits.val, cache, classes=train.classes or None, data_root=root, **together)
           if splits.val is not None else None)
    if dist.is_main and train.quarantine:
        print(f"data: {len(train.quarantine)} unreadable file(s) skipped; reasons in {train.report}", flush=True)
    return Data(train, val)


def train_loader(index: DatasetIndex, spec: MultiCropSpec, cfg: TrainConfig, dist: DistInfo):
    """The rank's DALI multi-crop loader (GPU decode on CUDA, CPU pipeline otherwise)."""
    from genssl.data.dali_loader import DaliMultiCropLoader  # DALI is imported only when data is read

    device_id = dist.local_rank if dist.device.type == "cuda" else None
    return DaliMultiCropLoader(index, spec, cfg.batch_size, dist.rank, dist.world_size, cfg.seed,
                               device_id=device_id, num_threads=max(1, cfg.num_workers))
