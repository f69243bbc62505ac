"""LARS (engine/lars.py): the gradient rewrite plus SGD with momentum equals a plain LARS loop."""

from __future__ import annotations

import copy

import torch
from torch import nn

from genssl.engine.lars import adapts, apply_lars, lars_gradient


def _lars_reference(model: nn.Module, lr: float, wd: float, eta: float, momentum: float, buffers: dict) -> None:
    """One step of LARS as the Barlow Twins code writes it, in float64."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = p.grad.clone()
            if adapts(name, p):
                g = g + wd * p
                w_norm, g_norm = p.norm(), g.norm()
                if w_norm > 0 and g_norm > 0:
                    g = g * (eta * w_norm / g_norm)
            buf = buffers.setdefault(name, torch.zeros_like(p))
            buf.mul_(momentum).add_(g)
            p.sub_(lr * buf)


def test_lars_gradient_matches_the_formula() -> None:
    torch.manual_seed(0)
    w, g = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    got = lars_gradient(w, g, weight_decay=0.1, eta=0.02)
    u = g + 0.1 * w
    torch.testing.assert_close(got, 0.02 * w.norm() / u.norm() * u)
    zero = torch.zeros_like(w)  # a zero weight keeps its gradient (trust 1), as in the papers' code
    torch.testing.assert_close(lars_gradient(zero, g, weight_decay=0.1, eta=0.02), g)


def test_apply_lars_then_sgd_equals_a_plain_lars_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3)).double()
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    lr, wd, eta, momentum = 0.5, 1e-3, 0.01, 0.9
    # what engine/trainer.fit builds for optim.name=lars: SGD with momentum, no weight decay of its own
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=0.0)
    buffers: dict = {}
    for step in range(3):
        x = torch.randn(11, 5, dtype=torch.float64)
        for m in (model, reference):
            m.zero_grad()
            m(x).pow(2).mean().backward()
        apply_lars(model, wd, eta)
        optimizer.step()
        _lars_reference(reference, lr, wd, eta, momentum, buffers)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert not torch.allclose(model[0].weight, initial[0].weight)  # the steps did move the weights
