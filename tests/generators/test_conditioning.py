"""slerp (α the weight on e1), GenView noise on the condition, foreground noise levels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genssl.generators.conditioning import foreground_noise_level, noise_condition, slerp


def _unit(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_slerp_endpoints_norm_and_formula():
    e1, e2 = _unit(5, 32, seed=1), _unit(5, 32, seed=2)
    torch.testing.assert_close(slerp(e1, e2, 1.0), e1, atol=1e-6, rtol=0)
    torch.testing.assert_close(slerp(e1, e2, 0.0), e2, atol=1e-6, rtol=0)
    alpha = torch.tensor([0.2, 0.4, 0.6, 0.8, 0.5])
    out = slerp(e1, e2, alpha)
    assert out.shape == (5, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5), atol=1e-6, rtol=0)
    # hand formula for one row: [sin(αθ) e1 + sin((1−α)θ) e2] / sin θ
    a, th = 0.2, math.acos(float(e1[0] @ e2[0]))
    ref = (math.sin(a * th) * e1[0] + math.sin((1 - a) * th) * e2[0]) / math.sin(th)
    torch.testing.assert_close(out[0], ref, atol=1e-6, rtol=0)
    # α is the weight on e1: α=0.8 lies closer to e1 (angle αθ... from e2, (1−α)θ from e1)
    assert float(out[3] @ e1[3]) > float(out[3] @ e2[3])
    torch.testing.assert_close(torch.arccos((out[3] @ e1[3]).clamp(-1, 1)), torch.tensor(0.2 * math.acos(float(e1[3] @ e2[3]))),
                               atol=1e-4, rtol=0)
    # unbatched, numpy in
    o1 = slerp(e1[0].numpy(), e2[0].numpy(), 0.2)
    torch.testing.assert_close(o1, out[0], atol=1e-6, rtol=0)


def test_slerp_stable_for_tiny_angles():
    e1 = _unit(3, 16, seed=3)
    for d in (0.0, 1e-9, 1e-6, 1e-4):
        e2 = torch.nn.functional.normalize(e1 + d * _unit(3, 16, seed=4), dim=-1)
        out = slerp(e1, e2, torch.tensor([0.2, 0.5, 0.9]))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3), atol=1e-6, rtol=0)
        torch.testing.assert_close(out, e1, atol=2e-4, rtol=0)
    # gradients finite at θ = 0 too
    x = e1.clone().requires_grad_(True)
    slerp(x, e1, 0.3).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_noise_condition():
    ddpm_ac = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000), 0)
    e = _unit(4, 8, seed=5)
    out = noise_condition(e, torch.tensor([0, 100, 0, 400]), ddpm_ac, generator=torch.Generator().manual_seed(0))
    assert out.shape == e.shape
    torch.testing.assert_close(out[0], e[0], atol=0, rtol=0)          # level 0: unchanged
    torch.testing.assert_close(out[2], e[2], atol=0, rtol=0)
    assert not torch.allclose(out[1], e[1])
    # formula with the same ε
    gens = [torch.Generator().manual_seed(10 + b) for b in range(4)]
    eps = torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(10 + b)) for b in range(4)])
    out2 = noise_condition(e, [0, 100, 0, 400], ddpm_ac, generator=gens)
    a = ddpm_ac[400]
    torch.testing.assert_close(out2[3], a.sqrt() * e[3] + (1 - a).sqrt() * eps[3], atol=1e-6, rtol=0)
    # per-row generators: a row does not depend on the others
    alone = noise_condition(e[3:], [400], ddpm_ac, generator=[torch.Generator().manual_seed(13)])
    torch.testing.assert_close(alone[0], out2[3], atol=0, rtol=0)
    with pytest.raises(ValueError, match="levels"):
        noise_condition(e, 1000, ddpm_ac)


def test_foreground_noise_level():
    ps = [0.0, 0.19, 0.2, 0.39, 0.4, 0.6, 0.79, 0.8, 0.99, 1.0]
    want = [0, 0, 100, 100, 200, 300, 300, 400, 400, 400]
    assert [foreground_noise_level(p) for p in ps] == want
    assert foreground_noise_level(np.array(ps)).tolist() == want
    assert foreground_noise_level(torch.tensor(ps)).tolist() == want
