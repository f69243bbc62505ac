"""slerp (α the weight on e1); GenView/unCLIP noise on the condition (docs/METHODS.md §2.2)."""

from __future__ import annotations

import math

import pytest
import torch

from genssl.generators.conditioning import EmbeddingStats, noise_condition, slerp, squaredcos_alphas_cumprod


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


def _clip_like(n, dim, seed):
    """Unit-norm embeddings with a large shared direction and uneven per-dimension spread, as real
    encoder embeddings are (the case where noising the raw unit vector destroys it)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g) * 2.0
    scale = torch.rand(dim, generator=g) * 1.5 + 0.1
    return torch.nn.functional.normalize(common + scale * torch.randn(n, dim, generator=g), dim=-1)


def test_squaredcos_schedule_equals_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    ours = squaredcos_alphas_cumprod()
    assert ours.shape == (1000,) and ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), ref, atol=2e-6, rtol=0)
    assert abs(float(ours[400].sqrt()) - 0.8037) < 1e-3


def test_embedding_stats():
    e = _clip_like(300, 24, seed=1).double()
    st = EmbeddingStats.from_embeddings(e.numpy())
    torch.testing.assert_close(st.mean, e.mean(0))
    torch.testing.assert_close(st.std, e.std(0))
    z = st.standardise(e)
    torch.testing.assert_close(z.mean(0), torch.zeros(24, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(st.unstandardise(z), e)
    again = EmbeddingStats.from_state_dict(st.state_dict())
    torch.testing.assert_close(again.std, st.std)
    with pytest.raises(ValueError, match="at least 2"):
        EmbeddingStats.from_embeddings(e[:1])
    with pytest.raises(ValueError, match="std must be > 0"):
        EmbeddingStats(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))


def test_noised_standardised_cosine_follows_sqrt_alpha_bar():
    """The issue's test: mean cos(ê, ê_l) over the data set ≈ √ᾱ_l (≈ 0.80 at l = 400); level 0 = identity."""
    e = _clip_like(512, 384, seed=2)
    st = EmbeddingStats.from_embeddings(e)
    ac = squaredcos_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    for level in (100, 200, 300, 400, 600):
        out = noise_condition(e, level, st, generator=g)
        assert out.shape == e.shape and out.dtype == e.dtype
        cos = torch.nn.functional.cosine_similarity(st.standardise(e.double()), st.standardise(out.double()), dim=1)
        assert abs(float(cos.mean()) - float(ac[level].sqrt())) < 0.01, (level, float(cos.mean()))
    assert abs(float(ac[400].sqrt()) - 0.80) < 0.01
    torch.testing.assert_close(noise_condition(e, 0, st, generator=g), e, atol=0, rtol=0)
    torch.testing.assert_close(noise_condition(e, 0, None), e, atol=0, rtol=0)  # level 0 needs no statistics
    # The form this replaces (ε added to the unit vector itself) fails the same check: cos ≈ 0.15 at l = 100.
    a = ac[100]
    naive = a.sqrt() * e + (1 - a).sqrt() * torch.randn(e.shape, generator=g)
    assert float(torch.nn.functional.cosine_similarity(e.double(), naive.double(), dim=1).mean()) < 0.3


def test_noise_condition_formula_and_per_row_generators():
    e = _clip_like(4, 8, seed=5)
    st = EmbeddingStats.from_embeddings(_clip_like(50, 8, seed=6))
    levels = [0, 100, 0, 400]
    gens = [torch.Generator().manual_seed(10 + b) for b in range(4)]
    out = noise_condition(e, levels, st, generator=gens)
    torch.testing.assert_close(out[0], e[0], atol=0, rtol=0)
    torch.testing.assert_close(out[2], e[2], atol=0, rtol=0)
    eps = torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(10 + b)) for b in range(4)]).double()
    a = squaredcos_alphas_cumprod()[400]
    want = st.std * (a.sqrt() * (e[3].double() - st.mean) / st.std + (1 - a).sqrt() * eps[3]) + st.mean
    torch.testing.assert_close(out[3].double(), want, atol=1e-6, rtol=0)
    # per-row generators: a row does not depend on the others; unbatched input works
    alone = noise_condition(e[3], 400, st, generator=[torch.Generator().manual_seed(13)])
    torch.testing.assert_close(alone, out[3], atol=0, rtol=0)
    # a custom schedule is honoured
    lin = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000), 0)
    assert not torch.allclose(noise_condition(e, 400, st, generator=torch.Generator().manual_seed(1), alphas_cumprod=lin),
                              noise_condition(e, 400, st, generator=torch.Generator().manual_seed(1)))


def test_noise_condition_errors():
    e = _clip_like(4, 8, seed=7)
    st = EmbeddingStats.from_embeddings(_clip_like(20, 8, seed=8))
    with pytest.raises(ValueError, match="levels must lie"):
        noise_condition(e, 1000, st)
    with pytest.raises(ValueError, match="need the data set's EmbeddingStats"):
        noise_condition(e, 100, None)
    with pytest.raises(ValueError, match="stats must be the data set's EmbeddingStats"):
        noise_condition(e, 100, squaredcos_alphas_cumprod())  # the old signature's ᾱ in the stats slot
    with pytest.raises(ValueError, match="16-d"):
        noise_condition(_clip_like(2, 16, seed=9), 100, st)
    with pytest.raises(ValueError, match="3 levels for 4"):
        noise_condition(e, [0, 1, 2], st)
