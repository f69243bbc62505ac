"""k-NN evaluation of a frozen encoder on the labelled split(s) of a dataset (DINO protocol)."""

from __future__ import annotations

import dataclasses

import numpy as np
from torch import nn

from genssl.data.index import DatasetIndex
from genssl.engine.distributed import DistInfo
from genssl.engine.knn import extract_features, knn_classify
from genssl.engine.run_config import EvalConfig


def subset(index: DatasetIndex, rows: np.ndarray) -> DatasetIndex:
    return dataclasses.replace(index, paths=[index.paths[i] for i in rows], source_paths=[index.source_paths[i] for i in rows],
                               sizes=index.sizes[rows], labels=index.labels[rows])


def knn_splits(train: DatasetIndex, val: DatasetIndex | None, holdout: float, seed: int) -> tuple[DatasetIndex, DatasetIndex] | None:
    """(memory bank, queries): the val split when there is one, else a seeded hold-out of train.

    None when the data has no labels (a flat folder): k-NN needs classes.
    """
    labelled = np.flatnonzero(train.labels >= 0)
    if len(labelled) == 0:
        return None
    if val is not None and (val.labels >= 0).any():
        return subset(train, labelled), subset(val, np.flatnonzero(val.labels >= 0))
    order = np.random.default_rng(seed).permutation(labelled)
    n_query = max(1, int(round(holdout * len(order))))
    if n_query >= len(order):
        return None
    return subset(train, np.sort(order[n_query:])), subset(train, np.sort(order[:n_query]))


def knn_eval(backbone: nn.Module, train: DatasetIndex, val: DatasetIndex | None, cfg: EvalConfig, dist: DistInfo,
             seed: int = 0, num_threads: int = 2) -> dict | None:
    """Weighted k-NN top-1/top-5 of ``backbone`` features; every rank calls it, all get the result."""
    from genssl.data.dali_loader import DaliEvalLoader  # DALI is imported only when data is read

    splits = knn_splits(train, val, cfg.holdout, seed)
    if splits is None:
        return None
    device_id = dist.local_rank if dist.device.type == "cuda" else None
    backbone.eval()
    feats = []
    for part in splits:
        loader = DaliEvalLoader(part, cfg.size, cfg.batch_size, dist.rank, dist.world_size, device_id=device_id,
                                num_threads=num_threads)
        feats.append(extract_features(backbone, loader, dist.device))
    (bank, bank_labels), (query, query_labels) = feats
    return knn_classify(bank, bank_labels, query, query_labels, k=cfg.knn_k, temperature=cfg.knn_temperature,
                        num_classes=len(train.classes))


__all__ = ["knn_eval", "knn_splits", "subset"]
