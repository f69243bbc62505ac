"""Evaluation of a frozen encoder on the labelled split(s) of a dataset: k-NN and linear probe (DINO protocols).

`evaluate_encoder` is the one entry point (recipes/dino.py, recipes/eval_knn.py, recipes/eval_linear.py):
it extracts the backbone's features of the train and val images once, with the training run's
normalisation, and feeds both the weighted k-NN (engine/knn.py) and the linear probe (engine/linear.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from genssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from genssl.data.index import DatasetIndex
from genssl.engine.distributed import DistInfo, broadcast_object
from genssl.engine.knn import extract_features, knn_classify
from genssl.engine.linear import linear_probe
from genssl.engine.run_config import EvalConfig

RESULT_KEYS = ("knn_top1", "knn_top5", "knn_k", "knn_temperature", "linear_top1", "linear_top5", "linear_train_top1",
               "linear_epochs", "linear_lr", "linear_batch_size", "linear_weight_decay", "n_train", "n_test")


def eval_splits(train: DatasetIndex, val: DatasetIndex | None, holdout: float, seed: int) -> tuple[DatasetIndex, DatasetIndex] | None:
    """(train rows, test rows): the val split when there is one, else a seeded hold-out of train.

    The train rows are the k-NN memory bank and the linear probe's training set; the test rows are
    what both are scored on. None when the data has no labels (a flat folder): both need classes.
    """
    labelled = np.flatnonzero(train.labels >= 0)
    if len(labelled) == 0:
        return None
    if val is not None and (val.labels >= 0).any():
        return train.subset(labelled), val.subset(np.flatnonzero(val.labels >= 0))
    order = np.random.default_rng(seed).permutation(labelled)
    n_query = max(1, int(round(holdout * len(order))))
    if n_query >= len(order):
        return None
    return train.subset(np.sort(order[n_query:])), train.subset(np.sort(order[:n_query]))


@torch.no_grad()
def calibrate_batchnorm(backbone: nn.Module, train: DatasetIndex, cfg: EvalConfig, dist: DistInfo, num_threads: int,
                        mean: Sequence[float], std: Sequence[float], max_batches: int = 20) -> nn.Module:
    """Set every BatchNorm's running statistics to the data's (a plain average over up to
    ``max_batches`` eval batches of ``train``, all ranks), weights untouched; returns ``backbone``.

    Why: a randomly initialised BatchNorm network evaluates with running mean 0 / variance 1, which
    does not normalise at all. Any training — even one whose weights never move — replaces them by
    the data's statistics, and that alone lifts k-NN by several points. The random-init floor gets
    the same statistics, so a trained encoder is credited only for what its weights learned.
    """
    from genssl.data.dali_loader import DaliEvalLoader  # DALI is imported only when data is read

    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return backbone
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    was_training = backbone.training
    backbone.train()
    device_id = dist.local_rank if dist.device.type == "cuda" else None
    loader = DaliEvalLoader(train, cfg.size, cfg.batch_size, dist.rank, dist.world_size, device_id=device_id,
                            num_threads=num_threads, mean=mean, std=std)
    for i, (images, _, _) in enumerate(loader):
        if i == max_batches:
            break
        backbone(images.to(dist.device))
    backbone.train(was_training)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for buffer in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(buffer)
                buffer /= torch.distributed.get_world_size()
    return backbone


def eval_features(backbone: nn.Module, parts: Sequence[DatasetIndex], cfg: EvalConfig, dist: DistInfo, num_threads: int,
                  mean: Sequence[float], std: Sequence[float]) -> list[tuple[Tensor, Tensor]]:
    """Raw (not L2-normalised) features [N, D] and labels [N] of each index in ``parts``, on every rank.

    Images are resized and centre-cropped to ``cfg.size`` and normalised with ``mean`` / ``std``
    (the training normalisation); each rank encodes its shard, `extract_features` gathers them.
    """
    from genssl.data.dali_loader import DaliEvalLoader  # DALI is imported only when data is read

    device_id = dist.local_rank if dist.device.type == "cuda" else None
    feats = []
    for part in parts:
        loader = DaliEvalLoader(part, cfg.size, cfg.batch_size, dist.rank, dist.world_size, device_id=device_id,
                                num_threads=num_threads, mean=mean, std=std)
        feats.append(extract_features(backbone, loader, dist.device, normalize=False))
    return feats


def evaluate_encoder(backbone: nn.Module, train: DatasetIndex, val: DatasetIndex | None, cfg: EvalConfig, dist: DistInfo,
                     seed: int = 0, num_threads: int = 2, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> dict:
    """k-NN and linear-probe accuracy of ``backbone``'s features; every rank calls it, all get the same dict.

    The features of the `eval_splits` are extracted once and feed both (k-NN L2-normalises them,
    the linear probe standardises them). ``mean`` / ``std`` are the normalisation the encoder was
    trained with (``crops.mean`` / ``crops.std``; the defaults are `MultiCropSpec`'s). The dict has
    every key of `RESULT_KEYS`; a metric that did not run is None (``eval.knn=false`` /
    ``eval.linear=false``), and when nothing ran ``"reason"`` says why. The linear probe is trained
    on rank 0 and its result broadcast, so all ranks return the same numbers whatever their
    device's arithmetic.
    """
    result: dict = dict.fromkeys(RESULT_KEYS)
    if not (cfg.knn or cfg.linear):
        return {**result, "reason": "eval.knn and eval.linear are off"}
    splits = eval_splits(train, val, cfg.holdout, seed)
    if splits is None:
        return {**result, "reason": "no labels in the data"}
    (bank, bank_labels), (query, query_labels) = eval_features(backbone, splits, cfg, dist, num_threads, mean, std)
    num_classes = len(train.classes)

    if cfg.knn:
        knn = knn_classify(bank, bank_labels, query, query_labels, k=cfg.knn_k, temperature=cfg.knn_temperature,
                           num_classes=num_classes)
        result.update(knn_top1=knn["knn_top1"], knn_top5=knn["knn_top5"], knn_k=knn["k"],
                      knn_temperature=knn["temperature"])
    if cfg.linear:
        linear = None
        if dist.is_main:
            linear = linear_probe(bank, bank_labels, query, query_labels, num_classes=num_classes,
                                  epochs=cfg.linear_epochs, lr=cfg.linear_lr, batch_size=cfg.linear_batch_size,
                                  weight_decay=cfg.linear_weight_decay, seed=seed)
        linear = broadcast_object(linear)
        result.update(linear_top1=linear["linear_top1"], linear_top5=linear["linear_top5"],
                      linear_train_top1=linear["linear_train_top1"], linear_epochs=cfg.linear_epochs,
                      linear_lr=cfg.linear_lr, linear_batch_size=cfg.linear_batch_size,
                      linear_weight_decay=cfg.linear_weight_decay)
    result.update(n_train=int(bank.shape[0]), n_test=int(query.shape[0]))
    return result


def describe(result: dict) -> str:
    """One line of ``evaluate_encoder``'s numbers, with the protocol they were measured under."""
    if result.get("reason"):
        return f"skipped ({result['reason']})"
    parts = []
    if result["knn_top1"] is not None:
        parts.append(f"k-NN (k={result['knn_k']}, T={result['knn_temperature']:g}) top-1 {result['knn_top1']:.2f} %  "
                     f"top-5 {result['knn_top5']:.2f} %")
    if result["linear_top1"] is not None:
        parts.append(f"linear ({result['linear_epochs']} epochs) top-1 {result['linear_top1']:.2f} %  "
                     f"top-5 {result['linear_top5']:.2f} %")
    return " | ".join(parts)


__all__ = ["RESULT_KEYS", "describe", "eval_features", "eval_splits", "evaluate_encoder"]
