"""k-NN evaluation: the DINO weighted vote, feature gathering across ranks, and the evaluation entry point."""

from __future__ import annotations

import dataclasses
import importlib
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from genssl.engine.distributed import DistInfo
from genssl.engine.evaluate import RESULT_KEYS, eval_features, eval_splits, evaluate_encoder
from genssl.engine.knn import extract_features, knn_classify
from genssl.engine.linear import linear_probe
from genssl.engine.run_config import EvalConfig
from genssl.engine.setup import load_data

# ---------------------------------------------------------------------------------- knn_classify


def test_separable_clusters_are_perfect() -> None:
    g = torch.Generator().manual_seed(0)
    C, D, per = 4, 16, 30
    centres = torch.eye(D)[:C] * 5  # orthogonal class directions
    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(C).repeat_interleave(n)
        return centres[y] + 0.3 * torch.randn(C * n, D, generator=g), y
    xtr, ytr = sample(per)
    xte, yte = sample(10)
    res = knn_classify(xtr, ytr, xte, yte, k=20, temperature=0.07)
    assert res["knn_top1"] == 100.0 and res["knn_top5"] == 100.0
    assert (res["k"], res["n_train"], res["n_test"]) == (20, C * per, C * 10)


def test_tiny_case_by_hand() -> None:
    # One test point x = (1, 0) of class 0. Neighbours (cosine similarity, class):
    #   (1, 0) → 1.0, class 0;  (0.8, 0.6) → 0.8, class 1;  (0.6, 0.8) → 0.6, class 1;  (0, 1) → 0.
    # k = 3. Votes: class 0 gets e^{1/T}, class 1 gets e^{0.8/T} + e^{0.6/T}.
    #   T = 0.07: e^{14.29} ≈ 1.6e6  >  e^{11.43} + e^{8.57} ≈ 9.3e4   → predicts 0 (correct)
    #   T = 10:   e^{0.1} ≈ 1.105    <  e^{0.08} + e^{0.06} ≈ 2.145    → predicts 1 (wrong top-1),
    #   but class 0 is second: a top-5 hit (min(5, k=3, C=2) = 2 predictions).
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    ytr = torch.tensor([0, 1, 1, 1])
    x, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])  # norm does not matter
    assert math.exp(1 / 0.07) > math.exp(0.8 / 0.07) + math.exp(0.6 / 0.07)
    assert math.exp(1 / 10) < math.exp(0.8 / 10) + math.exp(0.6 / 10)
    sharp = knn_classify(train, ytr, x, y, k=3, temperature=0.07)
    flat = knn_classify(train, ytr, x, y, k=3, temperature=10.0)
    assert (sharp["knn_top1"], sharp["knn_top5"]) == (100.0, 100.0)
    assert (flat["knn_top1"], flat["knn_top5"]) == (0.0, 100.0)
    # k = 1: only the nearest neighbour votes, whatever T
    assert knn_classify(train, ytr, x, y, k=1, temperature=10.0)["knn_top1"] == 100.0


def test_top5_with_few_classes_and_k_clipped() -> None:
    train = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    ytr = torch.tensor([0, 1, 2, 0])
    test = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    yte = torch.tensor([0, 1, 2, 2, 1, 0])
    res = knn_classify(train, ytr, test, yte, k=20)
    assert res["k"] == 4  # clipped to n_train
    assert res["knn_top5"] == 100.0  # 3 classes: every class is within the top min(5, C)


def test_chunking_does_not_change_result() -> None:
    g = torch.Generator().manual_seed(3)
    train, test = torch.randn(50, 8, generator=g), torch.randn(23, 8, generator=g)
    ytr, yte = torch.randint(0, 7, (50,), generator=g), torch.randint(0, 7, (23,), generator=g)
    a = knn_classify(train, ytr, test, yte, k=5, chunk=1024)
    b = knn_classify(train, ytr, test, yte, k=5, chunk=4)
    assert a == b


def test_unlabelled_rows_are_refused() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="k-NN evaluation needs a class label"):
        knn_classify(x, torch.tensor([0, -1, 1]), x, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="unlabelled"):
        knn_classify(x, torch.tensor([0, 1, 1]), x, torch.tensor([-1, -1, -1]))
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(x, torch.tensor([0, 1, 2]), x, torch.tensor([0, 1, 2]), num_classes=2)


# ---------------------------------------------------------------------------------- features

N = 11


def _dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(N, 3, 2, 2, generator=g), torch.arange(N) % 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Dropout(0.5))  # dropout: eval mode matters


def _loader(index: list[int], batch: int = 3):
    images, labels = _dataset()
    for s in range(0, len(index), batch):
        idx = torch.tensor(index[s : s + batch])
        yield images[idx], labels[idx], idx


def test_extract_features_single_process() -> None:
    model = _model().train()
    order = [5, 3, 0, 10, 1, 2, 4, 6, 7, 8, 9, 3, 0]  # shuffled, with repeats
    feats, labels = extract_features(model, _loader(order), "cpu")
    assert model.training  # mode restored (dropout was off during extraction: checked below)
    images, y = _dataset()
    expected = torch.nn.functional.normalize(model.eval()(images).detach(), dim=1)
    assert feats.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(feats, expected)
    assert torch.equal(labels, y)
    extract_features(model, _loader(order), "cpu")
    assert not model.training


def test_extract_features_raw() -> None:
    model = _model()
    feats, _ = extract_features(model, _loader(list(range(N))), "cpu", normalize=False)
    torch.testing.assert_close(feats, model.eval()(_dataset()[0]).detach())


UNEVEN = ([0, 2, 4, 6, 8, 10, 1], [3, 5, 7, 9, 0])  # rank 1 repeats index 0 as padding
ONE_EMPTY = (list(range(N)), [])


def _gather_worker(rank: int, world: int, store: str, out: str, shards: tuple[list[int], ...]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        feats, labels = extract_features(_model(), _loader(shards[rank], batch=2), "cpu")
        torch.save((feats, labels), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("shards", [UNEVEN, ONE_EMPTY], ids=["uneven", "one_empty"])
def test_distributed_gather_matches_single_process(tmp_path, shards) -> None:
    worker = importlib.import_module("genssl.tests.engine.test_knn")._gather_worker
    out = str(tmp_path / "feats")
    mp.spawn(worker, args=(2, str(tmp_path / "store"), out, shards), nprocs=2, join=True)
    ref_feats, ref_labels = extract_features(_model(), _loader(list(range(N))), "cpu")
    for r in range(2):
        feats, labels = torch.load(f"{out}.{r}")
        assert feats.shape == (N, 6)
        torch.testing.assert_close(feats, ref_feats)
        assert torch.equal(labels, ref_labels)


# ---------------------------------------------------------------------------------- evaluate_encoder

TINY_DATA = "builtin:shapes?size=32&per_class=4&val_per_class=2"
ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _channel_means() -> nn.Module:
    """Features = the per-channel mean of the normalised image: shows which normalisation was applied."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_eval_features_use_the_training_normalisation() -> None:
    data = load_data(TINY_DATA, "", ONE_PROCESS)
    cfg = EvalConfig(size=32, batch_size=16)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    imagenet = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    (ours, _), = eval_features(_channel_means(), [data.val], cfg, ONE_PROCESS, 1, mean, std)
    (theirs, _), = eval_features(_channel_means(), [data.val], cfg, ONE_PROCESS, 1, *imagenet)
    # (p - m) / s for the same pixels p: undo ImageNet's normalisation, apply ours
    pixels = theirs * torch.tensor(imagenet[1]) + torch.tensor(imagenet[0])
    torch.testing.assert_close(ours, (pixels - torch.tensor(mean)) / torch.tensor(std), atol=1e-4, rtol=1e-4)


def test_evaluate_encoder_scores_one_extraction_with_both_protocols() -> None:
    data = load_data(TINY_DATA, "", ONE_PROCESS)
    cfg = EvalConfig(size=32, batch_size=16, knn_k=5, linear_epochs=5, linear_lr=0.05, linear_batch_size=8)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.Flatten())  # 8 x 7 x 7 features
    result = evaluate_encoder(backbone, data.train, data.val, cfg, ONE_PROCESS, seed=3, num_threads=1)
    assert set(result) == set(RESULT_KEYS)
    (bank, bank_y), (query, query_y) = eval_features(backbone, eval_splits(data.train, data.val, cfg.holdout, 3), cfg,
                                                     ONE_PROCESS, 1, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    knn = knn_classify(bank, bank_y, query, query_y, k=5, num_classes=12)
    linear = linear_probe(bank, bank_y, query, query_y, num_classes=12, epochs=5, lr=0.05, batch_size=8, seed=3)
    assert (result["knn_top1"], result["knn_top5"], result["knn_k"], result["knn_temperature"]) == (
        knn["knn_top1"], knn["knn_top5"], 5, 0.07)
    assert (result["linear_top1"], result["linear_top5"]) == (linear["linear_top1"], linear["linear_top5"])
    assert (result["n_train"], result["n_test"], result["linear_epochs"]) == (48, 24, 5)

    k_only = evaluate_encoder(backbone, data.train, data.val, dataclasses.replace(cfg, linear=False), ONE_PROCESS,
                              seed=3, num_threads=1)
    assert k_only["knn_top1"] == result["knn_top1"] and k_only["linear_top1"] is None and k_only["linear_lr"] is None


def test_evaluate_encoder_on_unlabelled_data_says_why() -> None:
    data = load_data(TINY_DATA, "", ONE_PROCESS)
    flat = dataclasses.replace(data.train, labels=np.full(len(data.train), -1))
    result = evaluate_encoder(_channel_means(), flat, None, EvalConfig(size=32), ONE_PROCESS)
    assert result["reason"] == "no labels in the data"
    assert all(result[key] is None for key in RESULT_KEYS)
