"""Linear probe on frozen features: DINO's eval_linear.py (Caron et al. 2021, §4), scaled down.

DINO trains one linear layer (weights N(0, 0.01²), bias 0) on the frozen backbone's features with
SGD (momentum 0.9, no weight decay), cross-entropy and a cosine learning rate to 0 over 100
epochs, then reports val top-1. Here the features are extracted once, without DINO's per-epoch
random crops, so an epoch is a pass over a cached [N, D] matrix (100 epochs over 10k x 512
features take seconds on a CPU). One addition to DINO: the features are standardised per dimension
with the train features' mean and std (the BatchNorm-free form of the affine-free BatchNorm MAE puts
in front of its probe), so one learning rate serves backbones whose feature scales differ by orders
of magnitude, such as a random init and a trained encoder. The reported accuracy is that of the
last epoch (DINO prints the best epoch's, which peeks at the val set).

Deterministic given the seed: initial weights and the per-epoch shuffling come from one seeded
CPU generator, and the loss is written as soft-target cross-entropy (no scatter in the backward),
so a run is bitwise reproducible on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genssl.engine.knn import class_count


def standardise(train_feats: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """``(x - mean) / std`` with the per-dimension mean and std of ``train_feats``, applied to all.

    A dimension that is constant on the train rows (a dead ReLU channel) keeps std 1: it carries
    nothing the classifier could learn from, and dividing by ~0 would blow up its test values.
    """
    mean = train_feats.mean(dim=0)
    std = train_feats.std(dim=0, unbiased=False)
    std = torch.where(std > eps, std, torch.ones_like(std))
    return tuple((x - mean) / std for x in (train_feats, *others))


def train_linear_classifier(x: Tensor, y: Tensor, num_classes: int, epochs: int, lr: float, batch_size: int,
                            weight_decay: float, seed: int) -> nn.Linear:
    """An ``nn.Linear(D, C)`` trained on rows ``x`` [N, D] with labels ``y`` [N] (DINO's recipe).

    Init as DINO (weights N(0, 0.01²), bias 0); SGD with momentum 0.9 and ``weight_decay`` on weights
    and bias; mini-batches of ``batch_size`` rows in a new seeded order every epoch (the last one may
    be smaller); the lr of epoch e is ``lr * (1 + cos(pi * e / epochs)) / 2`` (DINO's per-epoch
    CosineAnnealingLR to 0). Runs on ``x``'s device.
    """
    n, dim = x.shape
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(dim, num_classes).to(x.device)
    with torch.no_grad():
        layer.weight.copy_(0.01 * torch.randn(num_classes, dim, generator=g))
        layer.bias.zero_()
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    targets = F.one_hot(y, num_classes).to(x.dtype)  # [N, C]
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
        order = torch.randperm(n, generator=g).to(x.device)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            loss = F.cross_entropy(layer(x[rows]), targets[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return layer


@torch.no_grad()
def top_k_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    """Percent of rows whose label is among the ``k`` highest logits."""
    hit = logits.topk(k, dim=1).indices == labels[:, None]
    return 100.0 * int(hit.any(dim=1).sum()) / len(labels)


def linear_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, *,
                 num_classes: int | None = None, epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                 weight_decay: float = 0.0, seed: int = 0) -> dict[str, float | int]:
    """Val top-1 / top-5 (percent) of a linear classifier trained on standardised train features.

    "linear_top5" counts a hit among the first min(5, C) predictions (C classes). Computation runs
    on ``train_feats``' device.
    """
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got train {tuple(train_feats.shape)} "
                         f"and test {tuple(test_feats.shape)}")
    n_train, n_test = train_feats.shape[0], test_feats.shape[0]
    if n_train == 0 or n_test == 0:
        raise ValueError(f"the linear probe needs training and test rows, got n_train={n_train}, n_test={n_test}")
    if train_labels.shape != (n_train,) or test_labels.shape != (n_test,):
        raise ValueError("labels must be 1-D with one entry per feature row")
    if bool((train_labels < 0).any()) or bool((test_labels < 0).any()):
        raise ValueError("unlabelled rows (label -1): the linear probe needs a class label for every train and test "
                         "image (an ImageFolder with one folder per class)")
    if epochs < 1 or batch_size < 1 or lr <= 0 or weight_decay < 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0; got epochs={epochs}, "
                         f"batch_size={batch_size}, lr={lr}, weight_decay={weight_decay}")
    num_classes = class_count(train_labels, test_labels, num_classes)

    device = train_feats.device
    x, x_test = standardise(train_feats.float(), test_feats.to(device).float())
    y, y_test = train_labels.to(device, torch.int64), test_labels.to(device, torch.int64)
    layer = train_linear_classifier(x, y, num_classes, epochs, lr, batch_size, weight_decay, seed)
    with torch.no_grad():
        logits = layer(x_test)  # [N_test, C]
    return {
        "linear_top1": top_k_accuracy(logits, y_test, 1),
        "linear_top5": top_k_accuracy(logits, y_test, min(5, num_classes)),
        "linear_train_top1": top_k_accuracy(layer(x).detach(), y, 1),
        "n_train": int(n_train),
        "n_test": int(n_test),
    }


__all__ = ["linear_probe", "standardise", "top_k_accuracy", "train_linear_classifier"]
