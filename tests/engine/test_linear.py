"""Linear probe on frozen features: separable → 100 %, random labels → chance, the same SGD as a
hand-written reference, the regularised optimum, determinism, standardisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genssl.engine.linear import linear_probe, standardise, train_linear_classifier


def _clusters(n_per_class: int, seed: int, classes: int = 5, dim: int = 32, scale: float = 1.0, offset: float = 0.0):
    """Gaussian clusters around orthogonal class centres: linearly separable by a wide margin."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = 4 * torch.eye(dim)[:classes][y] + 0.3 * torch.randn(len(y), dim, generator=g)
    return scale * x + offset, y


def test_separable_classes_reach_100_percent_whatever_the_feature_scale() -> None:
    for scale, offset in ((1.0, 0.0), (1e3, -50.0), (1e-3, 7.0)):  # standardisation makes lr scale-free
        xtr, ytr = _clusters(40, seed=0, scale=scale, offset=offset)
        xte, yte = _clusters(20, seed=1, scale=scale, offset=offset)
        res = linear_probe(xtr, ytr, xte, yte, epochs=20, lr=0.1, batch_size=32)
        assert res["linear_top1"] == 100.0 and res["linear_top5"] == 100.0, (scale, offset, res)
        assert (res["n_train"], res["n_test"]) == (200, 100)


def test_random_labels_give_chance_on_the_test_rows() -> None:
    g = torch.Generator().manual_seed(0)
    classes, n = 10, 2000
    xtr, xte = torch.randn(n, 64, generator=g), torch.randn(n, 64, generator=g)
    ytr, yte = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (n,), generator=g)
    res = linear_probe(xtr, ytr, xte, yte, num_classes=classes, epochs=30, lr=0.1, batch_size=128)
    # chance is 10 % (top-1) and 50 % (top-5); one standard deviation over 2000 rows is 0.7 and 1.1 points
    assert abs(res["linear_top1"] - 10.0) < 3.0 and abs(res["linear_top5"] - 50.0) < 5.0, res
    assert res["linear_train_top1"] > 20.0, "the probe fits the train noise, so it did train"


def _reference_sgd(x, y, classes, epochs, lr, batch_size, weight_decay, seed):
    """The same training written out in float64: softmax-CE gradient by hand, torch's SGD momentum rule."""
    g = torch.Generator().manual_seed(seed)
    n, dim = x.shape
    w = (0.01 * torch.randn(classes, dim, generator=g)).double()
    b = torch.zeros(classes, dtype=torch.float64)
    x, onehot = x.double(), F.one_hot(y, classes).double()
    buf_w = buf_b = None
    for epoch in range(epochs):
        step_lr = lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            p = torch.softmax(x[rows] @ w.T + b, dim=1)
            d = (p - onehot[rows]) / len(rows)  # d(mean CE)/d(logits)
            gw, gb = d.T @ x[rows] + weight_decay * w, d.sum(0) + weight_decay * b
            buf_w, buf_b = (gw, gb) if buf_w is None else (0.9 * buf_w + gw, 0.9 * buf_b + gb)
            w, b = w - step_lr * buf_w, b - step_lr * buf_b
    return w, b


def test_training_matches_a_hand_written_sgd_reference() -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(103, 9, generator=g), torch.randint(0, 4, (103,), generator=g)  # 103: a short last batch
    layer = train_linear_classifier(x, y, 4, epochs=6, lr=0.2, batch_size=16, weight_decay=0.01, seed=3)
    w, b = _reference_sgd(x, y, 4, epochs=6, lr=0.2, batch_size=16, weight_decay=0.01, seed=3)
    torch.testing.assert_close(layer.weight.detach().double(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.detach().double(), b, atol=1e-5, rtol=1e-5)


def test_full_batch_training_reaches_the_regularised_optimum() -> None:
    # Convex: mean cross-entropy + wd/2 (|W|² + |b|²) has one minimum; L-BFGS in float64 finds it.
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(120, 6, generator=g), torch.randint(0, 3, (120,), generator=g)
    wd = 0.05

    def objective(w, b):
        return F.cross_entropy(x.double() @ w.T + b, y) + wd / 2 * (w.square().sum() + b.square().sum())

    layer = train_linear_classifier(x, y, 3, epochs=400, lr=0.5, batch_size=len(x), weight_decay=wd, seed=0)
    reached = objective(layer.weight.detach().double(), layer.bias.detach().double())
    w = torch.zeros(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(w, b)
        loss.backward()
        return loss

    opt.step(closure)
    optimum = objective(w.detach(), b.detach())
    assert abs(float(reached - optimum)) < 1e-6, (float(reached), float(optimum))


def test_deterministic_given_the_seed() -> None:
    xtr, ytr = _clusters(30, seed=0)
    xtr = xtr + 3.0 * torch.randn(xtr.shape, generator=torch.Generator().manual_seed(9))  # overlap: not all 100 %
    xte, yte = _clusters(30, seed=1)
    a = train_linear_classifier(*standardise(xtr), ytr, 5, epochs=3, lr=0.1, batch_size=32, weight_decay=0.0, seed=0)
    b = train_linear_classifier(*standardise(xtr), ytr, 5, epochs=3, lr=0.1, batch_size=32, weight_decay=0.0, seed=0)
    c = train_linear_classifier(*standardise(xtr), ytr, 5, epochs=3, lr=0.1, batch_size=32, weight_decay=0.0, seed=1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    assert linear_probe(xtr, ytr, xte, yte, epochs=3, seed=0) == linear_probe(xtr, ytr, xte, yte, epochs=3, seed=0)


def test_a_dimension_constant_on_train_does_not_swamp_the_test_rows() -> None:
    xtr, ytr = _clusters(30, seed=0)
    xte, yte = _clusters(30, seed=1)
    xtr[:, -1] = 0.0  # a dead channel on the train rows...
    xte[:, -1] = 5.0  # ...that fires on the test rows: std 0 must not divide it into a huge value
    mean_std_train, standard_test = standardise(xtr, xte)
    assert torch.all(standard_test[:, -1] == 5.0) and torch.all(mean_std_train[:, -1] == 0.0)
    assert linear_probe(xtr, ytr, xte, yte, epochs=10, lr=0.1, batch_size=32)["linear_top1"] == 100.0


def test_bad_inputs_are_refused() -> None:
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="needs a class label"):
        linear_probe(x, torch.tensor([0, 1, -1, 0, 1, 2]), x, y)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(x, y, x, y, num_classes=2)
    with pytest.raises(ValueError, match="lr > 0"):
        linear_probe(x, y, x, y, lr=0.0)
    with pytest.raises(ValueError, match="same D"):
        linear_probe(x, y, torch.randn(6, 5), y)
