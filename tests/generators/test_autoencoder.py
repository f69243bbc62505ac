"""Autoencoder: round-trip shapes, training loss falls, pretrained loading, latent cache."""

from __future__ import annotations

import json

import pytest
import torch

from genssl.generators.autoencoder import (LatentCache, autoencoder_hash, autoencoder_loss,
                                           build_autoencoder, decode, downsample_factor, encode,
                                           from_uint8, load_pretrained_autoencoder, set_scaling_factor,
                                           tiny_autoencoder_config, to_uint8)




def _images(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth images: coarse noise upsampled, in [-1, 1]
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def _ae(seed=0):
    torch.manual_seed(seed)
    return build_autoencoder(tiny_autoencoder_config())


def test_roundtrip_shapes_and_uint8():
    ae = _ae()
    x = _images()
    z = encode(ae, x)
    assert downsample_factor(ae) == 2 and z.shape == (6, 4, 8, 8)
    y = decode(ae, z)
    assert y.shape == x.shape
    with torch.no_grad():  # the scaled latents decode to what the raw posterior mean decodes to, clamped
        raw = ae.decode(ae.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(y, raw.clamp(-1, 1))
    u = to_uint8(y)
    assert u.shape == (6, 16, 16, 3) and u.dtype == torch.uint8
    torch.testing.assert_close(from_uint8(u), y, atol=1 / 127.5, rtol=0)
    sf = set_scaling_factor(ae, x)
    assert ae.config.scaling_factor == pytest.approx(sf)
    assert encode(ae, x).std() == pytest.approx(1.0, rel=1e-3)
    assert sf != pytest.approx(1.0, rel=0.05)  # so the next line checks that decode undoes encode's scaling
    torch.testing.assert_close(decode(ae, encode(ae, x)), raw.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_autoencoder_loss_falls():
    ae = _ae(1)
    x = _images(8, seed=1)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    losses = []
    for step in range(25):
        loss, parts = autoencoder_loss(ae, x, generator=torch.Generator().manual_seed(step), return_parts=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # KL to N(0, I) summed over latent elements, averaged over the batch; loss = rec + kl_weight * KL
    with torch.no_grad():
        post = ae.encode(x).latent_dist
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).sum(dim=(1, 2, 3)).mean()
        rec = (ae.decode(post.sample(generator=torch.Generator().manual_seed(0))).sample - x).abs().mean()
        loss, parts = autoencoder_loss(ae, x, generator=torch.Generator().manual_seed(0), return_parts=True)
    assert parts["kl"] == pytest.approx(float(kl), rel=1e-5) and parts["rec"] == pytest.approx(float(rec), rel=1e-5)
    assert float(loss) == pytest.approx(parts["rec"] + 1e-6 * parts["kl"], rel=1e-6)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    with pytest.raises(ValueError, match="l1"):
        autoencoder_loss(ae, x, rec="huber")


def test_load_pretrained(tmp_path):
    ae = _ae(2)
    ae.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = load_pretrained_autoencoder(tmp_path / "pipe")           # pipeline folder → vae/
    assert type(loaded).__name__ == "AutoencoderKL"
    assert autoencoder_hash(loaded) == autoencoder_hash(ae)
    x = _images(2)
    torch.testing.assert_close(encode(loaded, x), encode(ae, x))
    from diffusers import VQModel

    vq = VQModel(block_out_channels=(16,), norm_num_groups=8, latent_channels=3, num_vq_embeddings=16)
    vq.save_pretrained(tmp_path / "vq")
    vq2 = load_pretrained_autoencoder(tmp_path / "vq")
    assert type(vq2).__name__ == "VQModel"
    assert decode(vq2, encode(vq2, x)).shape == x.shape

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained_autoencoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        load_pretrained_autoencoder(tmp_path / "empty")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="UNet2DModel"):
        load_pretrained_autoencoder(tmp_path / "unet")


def test_latent_cache(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"latents": torch.arange(12.0).view(3, 4), "embeddings": torch.ones(3, 2)}

    c = LatentCache(tmp_path, fingerprint="fp", model_hash="mh")
    out = c.get_or_compute(compute)
    out2 = LatentCache(tmp_path, fingerprint="fp", model_hash="mh").get_or_compute(compute)
    assert len(calls) == 1 and torch.equal(out["latents"], out2["latents"])
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    other = LatentCache(tmp_path, fingerprint="fp2", model_hash="mh")
    assert other.path != c.path and not other.exists()
    # a file whose stored keys disagree with its name is refused
    other.path.write_bytes(c.path.read_bytes())
    with pytest.raises(ValueError, match="written for fingerprint"):
        other.load()
