"""E-LDM: one conditioning token, CFG drop → map(0), guided step arithmetic, training, provenance."""

from __future__ import annotations

import pytest
import torch

from genssl.generators.eldm import (ELDM, ELDMConfig, GuidedStep, guided_eps, load_eldm, save_eldm,
                                    tiny_eldm_config)




def _model(seed=0):
    torch.manual_seed(seed)
    return ELDM(tiny_eldm_config())


def test_condition_shapes_and_drop():
    m = _model()
    c = m.config
    e = torch.randn(5, c.embed_dim)
    tok = m.condition(e)
    assert tok.shape == (5, 1, c.cross_attention_dim)
    # the embedding is L2-normalised first
    torch.testing.assert_close(m.condition(3.0 * e), tok)
    drop = torch.tensor([True, False, True, False, False])
    td = m.condition(e, drop)
    null = m.cond_map(torch.zeros(1, c.embed_dim))                     # map(0)
    torch.testing.assert_close(td[0, 0], null[0])
    torch.testing.assert_close(td[2, 0], null[0])
    torch.testing.assert_close(td[1], tok[1])
    torch.testing.assert_close(m.null_tokens(3)[2, 0], null[0])
    torch.testing.assert_close(null[0], m.cond_map[1](m.cond_map[0].bias))   # LayerNorm(Linear.bias)
    eps = m(torch.randn(5, c.latent_channels, c.sample_size, c.sample_size), torch.tensor(10), e)
    assert eps.shape == (5, c.latent_channels, c.sample_size, c.sample_size)
    with pytest.raises(ValueError, match="embeddings"):
        m.condition(torch.randn(5, c.embed_dim + 1))


class _StubUNet(torch.nn.Module):
    """ε(x, t, tokens) = x·Σtokens + t/1000, so guidance can be checked by hand."""

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        s = encoder_hidden_states.sum(dim=(1, 2)).view(-1, 1, 1, 1)
        return (x * s + t.view(-1, 1, 1, 1).float() / 1000,)


def test_guidance_arithmetic_by_hand():
    x = torch.randn(3, 2, 4, 4)
    cond = torch.randn(3, 1, 5)
    unc = torch.randn(1, 1, 5)
    w = 2.0
    out = guided_eps(_StubUNet(), x, torch.tensor([250.0]), cond, unc, torch.tensor([w]))
    eps_c = x * cond.sum(dim=(1, 2)).view(-1, 1, 1, 1) + 0.25
    eps_u = x * unc.sum() + 0.25
    torch.testing.assert_close(out, eps_u + w * (eps_c - eps_u))
    # per-row guidance, w = 1 → conditional, w = 0 → unconditional
    out = guided_eps(_StubUNet(), x, 250, cond, unc, torch.tensor([1.0, 0.0, 3.0]))
    torch.testing.assert_close(out[0], eps_c[0])
    torch.testing.assert_close(out[1], eps_u[1])
    torch.testing.assert_close(out[2], eps_u[2] + 3.0 * (eps_c[2] - eps_u[2]))


def test_guided_step_matches_two_unet_calls():
    m = _model().eval()
    c = m.config
    x = torch.randn(2, c.latent_channels, c.sample_size, c.sample_size)
    e = torch.randn(2, c.embed_dim)
    with torch.no_grad():
        out = GuidedStep(m.unet)(x, torch.tensor([100.0]), m.condition(e), m.null_tokens(1), torch.tensor([2.0]))
        eps_c = m(x, 100, e)
        eps_u = m(x, 100, e, drop_mask=torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(out, eps_u + 2.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)


def test_tiny_eldm_trains_on_fixed_latents():
    m = _model(1)
    c = m.config
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(8, c.latent_channels, c.sample_size, c.sample_size, generator=g) * 0.5 + \
        torch.linspace(-1, 1, c.sample_size).view(1, 1, 1, -1)
    emb = torch.randn(8, c.embed_dim, generator=g)

    def eval_loss():
        with torch.no_grad():
            return sum(float(m.training_loss(lat, emb, torch.Generator().manual_seed(100 + k))) for k in range(4)) / 4

    before = eval_loss()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    m.train()
    for step in range(40):
        loss = m.training_loss(lat, emb, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_model_hash_and_save_load(tmp_path):
    a, b = _model(0), _model(0)
    assert a.model_hash() == b.model_hash() and len(a.model_hash()) == 64
    with torch.no_grad():
        b.cond_map[0].bias[0] += 1e-3
    assert a.model_hash() != b.model_hash()
    save_eldm(a, tmp_path / "eldm")
    c = load_eldm(tmp_path / "eldm")
    assert c.model_hash() == a.model_hash() and c.config == a.config
    with pytest.raises(FileNotFoundError, match="save_eldm"):
        load_eldm(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown keys"):
        ELDMConfig.from_dict({"embed_dim": 8, "bogus": 1})
    with pytest.raises(ValueError, match="norm_num_groups"):
        ELDMConfig(block_out_channels=(30, 64), norm_num_groups=8)


# ---------------------------------------------------------------------------------- attention kernel


def test_attention_is_sdpa_when_xformers_is_missing(monkeypatch):
    import sys

    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from genssl.models import packed_vit

    monkeypatch.setitem(sys.modules, "xformers", None)  # import xformers fails, installed or not
    packed_vit.xformers_available.cache_clear()
    try:
        m = _model().eval()
        m.unet.set_attn_processor(AttnProcessor())  # diffusers' pre-SDPA kernel, so the switch is visible
        x, e = torch.randn(2, 4, 8, 8), torch.randn(2, m.config.embed_dim)
        with torch.no_grad():
            before = m(x, torch.tensor([10, 500]), e)
            assert m.set_attention("auto") == "sdpa"
            assert {type(p) for p in m.unet.attn_processors.values()} == {AttnProcessor2_0}
            torch.testing.assert_close(m(x, torch.tensor([10, 500]), e), before, rtol=1e-4, atol=1e-5)
        assert packed_vit.resolve_attention("auto", "cuda") == "sdpa"  # what a GPU without xformers gets
        with pytest.raises(ValueError, match="attention=xformers but xformers is not importable"):
            m.set_attention("xformers")
    finally:
        packed_vit.xformers_available.cache_clear()


@pytest.mark.gpu
def test_attention_auto_takes_xformers_on_cuda():
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers is not installed (pip install --no-deps xformers; see pyproject's xformers extra)")
    m = _model().cuda().eval()
    x, e, t = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(2, m.config.embed_dim, device="cuda"), 10
    with torch.no_grad():
        assert m.set_attention("sdpa") == "sdpa"
        ref = m(x, t, e)
        assert m.set_attention("auto") == "xformers"
        assert all("XFormers" in type(p).__name__ for p in m.unet.attn_processors.values())
        torch.testing.assert_close(m(x, t, e), ref, rtol=1e-3, atol=1e-3)
