"""Weighted k-NN evaluation of frozen features, as in DINO (Caron et al. 2021, §4 / eval_knn.py).

For each test feature x (L2-normalised), take the k training features with the highest cosine
similarity s_1..s_k, give neighbour n the weight exp(s_n / T) and add it to its class; the classes
ranked by summed weight are the predictions (top-1 and top-5 accuracy, in percent).

`extract_features` runs a model over an eval loader (one shard per rank), gathers all ranks'
rows and returns them in dataset-index order, so every rank ends up with the full feature bank.
`engine/evaluate.py` extracts raw features once and feeds both this k-NN and the linear probe.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor, Tensor]], device: torch.device | str,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Features of every sample, float32 [N, D] (L2-normalised unless ``normalize=False``), and labels int64 [N].

    `loader` yields `(images [B,3,H,W], labels [B], indices [B])` for this rank's shard; `model`
    maps images to [B, D]. Rows come back sorted by dataset index, one per distinct index
    (samples a sampler repeated to even out shards are dropped). With torch.distributed
    initialised, rows of all ranks are gathered (shards may differ in size), so each rank gets
    the same result. The model runs in eval mode; its previous mode is restored.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    indices: list[Tensor] = []
    try:
        for images, y, idx in loader:
            out = model(images.to(device, non_blocking=True))
            if out.dim() != 2 or out.shape[0] != len(images):
                raise ValueError(f"model must return [B, D] features, got {tuple(out.shape)}")
            feats.append(F.normalize(out.float(), dim=1) if normalize else out.float())
            labels.append(torch.as_tensor(y).reshape(-1).to(device=device, dtype=torch.int64))
            indices.append(torch.as_tensor(idx).reshape(-1).to(device=device, dtype=torch.int64))
    finally:
        model.train(was_training)

    dim = feats[0].shape[1] if feats else 0
    f = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)  # [n, D]
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    i = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64, device=device)
    assert f.shape[0] == y.shape[0] == i.shape[0], "labels/indices must match the images"

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        f, y, i = _all_gather_rows(f, y, i)
        f, y, i = f.to(device), y.to(device), i.to(device)
    if f.shape[0] == 0:
        raise ValueError("the loader yielded no samples")

    # Sort by dataset index and keep the first row of each index.
    order = torch.argsort(i, stable=True)
    sorted_i = i[order]
    keep = torch.ones_like(sorted_i, dtype=torch.bool)
    keep[1:] = sorted_i[1:] != sorted_i[:-1]
    rows = order[keep]
    return f[rows], y[rows]


def class_count(train_labels: Tensor, test_labels: Tensor, num_classes: int | None) -> int:
    """``num_classes``, or the count the labels imply when None; ValueError when a label exceeds it."""
    n_seen = int(max(train_labels.max(), test_labels.max())) + 1
    if num_classes is None:
        return n_seen
    if n_seen > num_classes:
        raise ValueError(f"labels go up to {n_seen - 1} but num_classes={num_classes}")
    return num_classes


def _all_gather_rows(f: Tensor, y: Tensor, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All-gather rows whose count differs by rank: gather sizes, pad to the max, trim."""
    backend = str(dist.get_backend())
    if "nccl" in backend and torch.cuda.is_available():
        comm = torch.device("cuda", torch.cuda.current_device())
    else:
        comm = torch.device("cpu")
    world = dist.get_world_size()

    meta = torch.tensor([f.shape[0], f.shape[1]], dtype=torch.int64, device=comm)  # [n, D]
    metas = [torch.zeros_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    sizes = [int(m[0]) for m in metas]
    dims = {int(m[1]) for m, n in zip(metas, sizes) if n > 0}
    if len(dims) > 1:
        raise ValueError(f"ranks produced features of different widths: {sorted(dims)}")
    dim, n_max = (dims.pop() if dims else 0), max(sizes)

    def gather(t: Tensor) -> Tensor:
        padded = torch.zeros((n_max, *t.shape[1:]), dtype=t.dtype, device=comm)
        padded[: t.shape[0]] = t.to(comm)
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded)
        return torch.cat([o[:n] for o, n in zip(out, sizes)])

    f = f if f.shape[0] > 0 else torch.zeros(0, dim, dtype=torch.float32)
    return gather(f), gather(y), gather(i)


@torch.no_grad()
def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[str, float | int]:
    """Weighted k-NN accuracy (DINO protocol); see the module docstring.

    Features are L2-normalised here (again), so similarities are cosines. `k` is clipped to the
    number of training rows (the returned "k" is the one used). "knn_top5" counts a hit in the
    first min(5, k, C) predictions (C classes; DINO uses min(5, k)). Computation runs on
    `train_feats`' device, `chunk` test rows at a time.
    """
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be [N, D] with the same D, got train {tuple(train_feats.shape)} "
            f"and test {tuple(test_feats.shape)}"
        )
    n_train, n_test = train_feats.shape[0], test_feats.shape[0]
    if n_train == 0 or n_test == 0:
        raise ValueError(f"k-NN needs training and test rows, got n_train={n_train}, n_test={n_test}")
    if train_labels.shape != (n_train,) or test_labels.shape != (n_test,):
        raise ValueError("labels must be 1-D with one entry per feature row")
    for name, lab in (("train", train_labels), ("test", test_labels)):
        if bool((lab < 0).any()):
            raise ValueError(
                f"{name} set has unlabelled rows (label -1): k-NN evaluation needs a class label "
                "for every train and test image (an ImageFolder with one folder per class)"
            )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    num_classes = class_count(train_labels, test_labels, num_classes)

    device = train_feats.device
    train = F.normalize(train_feats.float(), dim=1)  # [N_train, D]
    train_y = train_labels.to(device=device, dtype=torch.int64)
    k_used = min(k, n_train)
    n_top5 = min(5, k_used, num_classes)
    top1 = top5 = 0
    for start in range(0, n_test, chunk):
        x = F.normalize(test_feats[start : start + chunk].to(device).float(), dim=1)  # [b, D]
        y = test_labels[start : start + chunk].to(device=device, dtype=torch.int64)  # [b]
        sim, nb = (x @ train.T).topk(k_used, dim=1)  # [b, k] cosine similarities, neighbour rows
        weights = (sim / temperature).exp()  # [b, k]
        votes = torch.zeros(x.shape[0], num_classes, device=device)  # [b, C]
        votes.scatter_add_(1, train_y[nb], weights)
        pred = votes.topk(n_top5, dim=1).indices  # [b, n_top5], best first
        hit = pred == y[:, None]
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(dim=1).sum())
    return {
        "knn_top1": 100.0 * top1 / n_test,
        "knn_top5": 100.0 * top5 / n_test,
        "k": k_used,
        "temperature": float(temperature),
        "n_train": int(n_train),
        "n_test": int(n_test),
    }
