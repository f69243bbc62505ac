"""GenView foreground proportion (PCA of frozen tokens) and adaptive noise levels (docs/METHODS.md §2.1–2.2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genssl.generators.foreground import (ForegroundPCA, TokenEncoder, adaptive_noise_level, fit_foreground_pca,
                                          foreground_proportions, load_token_encoder, noise_level_histogram)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _scenes(n: int, seed: int, size: int = 32):
    """A flat, brightly coloured square near the centre on a grey high-frequency texture; returns
    images [n, 3, size, size] in [0, 1] and the true foreground area fraction [n]."""
    g = torch.Generator().manual_seed(seed)
    images = 0.5 + 0.35 * torch.sign(torch.randn(n, 1, size, size, generator=g)).expand(n, 3, size, size).clone()
    areas = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        side = int(torch.randint(5, size - 3, (1,), generator=g))
        jitter = torch.randint(-2, 3, (2,), generator=g)
        top = max(0, min(size - side, (size - side) // 2 + int(jitter[0])))
        left = max(0, min(size - side, (size - side) // 2 + int(jitter[1])))
        colour = 0.6 + 0.4 * torch.rand(3, 1, 1, generator=g)
        images[i, :, top:top + side, left:left + side] = colour
        areas[i] = side * side / size ** 2
    return images, areas


def _patch_features(images: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """A fixed hand-made "encoder": per 4×4 patch, channel means and stds mixed by a fixed matrix → [B, h, w, 12]."""
    B, C, H, W = images.shape
    p = images.unfold(2, patch, patch).unfold(3, patch, patch)            # [B, C, h, w, patch, patch]
    feats = torch.cat([p.mean((-1, -2)), p.std((-1, -2))], 1)              # [B, 2C, h, w]
    mix = torch.randn(2 * C, 12, generator=torch.Generator().manual_seed(99), dtype=feats.dtype)
    return (feats.permute(0, 2, 3, 1) @ mix)


def _batches(images, size=16):
    return [images[i:i + size] for i in range(0, len(images), size)]


def test_proportion_tracks_the_true_foreground_area():
    fit_images, _ = _scenes(96, seed=0)
    pca = fit_foreground_pca(_patch_features, _batches(fit_images), foreground_fraction=0.4)
    assert abs(pca.foreground_fraction - 0.4) < 0.02
    images, areas = _scenes(64, seed=1)
    p = foreground_proportions(pca, _patch_features, _batches(images))
    assert p.shape == (64,) and p.dtype == torch.float64
    corr = float(np.corrcoef(p.numpy(), areas.numpy())[0, 1])
    assert corr > 0.95, corr
    assert float((p - areas).abs().mean()) < 0.1
    # the sign matters: the opposite PC-1 direction marks the background instead
    flipped = ForegroundPCA(pca.mean, -pca.direction, -pca.threshold, pca.foreground_fraction)
    assert float(np.corrcoef(flipped.proportion(_patch_features(images)).numpy(), areas.numpy())[0, 1]) < -0.9


def test_pca_equals_plain_computation():
    images, _ = _scenes(40, seed=2)
    pca = fit_foreground_pca(_patch_features, _batches(images, 7), foreground_fraction=0.3)
    tokens = _patch_features(images).double().reshape(-1, 12)
    mean = tokens.mean(0)
    _, _, vt = torch.linalg.svd(tokens - mean, full_matrices=False)        # reference PC-1 by SVD
    torch.testing.assert_close(pca.mean, mean)
    assert abs(abs(float(vt[0] @ pca.direction)) - 1) < 1e-9
    proj = (tokens - mean) @ pca.direction
    assert pca.threshold == pytest.approx(float(np.quantile(proj.numpy(), 0.7)))
    # sign: central tokens (rows/cols 2–5 of the 8×8 grid) project above the border ones
    grid = proj.reshape(40, 8, 8)
    assert float(grid[:, 2:6, 2:6].mean()) > float(grid.mean())
    again = ForegroundPCA.from_state_dict(pca.state_dict())
    torch.testing.assert_close(again.proportion(_patch_features(images)), pca.proportion(_patch_features(images)))


def test_fit_errors():
    images, _ = _scenes(8, seed=3)
    with pytest.raises(ValueError, match="re-iterable"):
        fit_foreground_pca(_patch_features, (b for b in _batches(images)))
    with pytest.raises(ValueError, match="too small"):
        fit_foreground_pca(lambda x: _patch_features(x, patch=16), _batches(images))   # a 2×2 grid
    with pytest.raises(ValueError, match="foreground_fraction"):
        fit_foreground_pca(_patch_features, _batches(images), foreground_fraction=1.0)
    pca = fit_foreground_pca(_patch_features, _batches(images))
    with pytest.raises(ValueError, match="channels"):
        pca.project(torch.zeros(1, 2, 2, 5))


def test_adaptive_noise_level():
    ps = [0.0, 0.19, 0.2, 0.39, 0.4, 0.6, 0.79, 0.8, 0.99, 1.0]
    want = [0, 0, 100, 100, 200, 300, 300, 400, 400, 400]
    assert [adaptive_noise_level(p) for p in ps] == want
    assert adaptive_noise_level(np.array(ps)).tolist() == want
    assert adaptive_noise_level(torch.tensor(ps)).tolist() == want
    assert adaptive_noise_level(torch.tensor(ps)).dtype == torch.int64
    assert adaptive_noise_level(0.5, bins=3, max_level=200) == 100
    with pytest.raises(ValueError, match="multiple"):
        adaptive_noise_level(0.5, bins=4, max_level=400)
    assert noise_level_histogram(torch.tensor([0, 400, 100, 400])) == {"0": 1, "100": 1, "400": 2}


# ------------------------------------------------------------------------------------ token encoders
def test_genssl_vit_and_cnn_tokens(tmp_path):
    from genssl.engine.export import save_encoder
    from genssl.models.backbones import build_backbone

    x = torch.randn(2, 3, 32, 32)
    vit = build_backbone("vit_tiny", img_size=32, patch_size=8).eval()
    save_encoder(vit, tmp_path, config={})
    enc = load_token_encoder(tmp_path)
    tokens = enc(x)
    assert tokens.shape == (2, 4, 4, 192)
    with torch.no_grad():
        ref = vit.forward_features(x)[:, vit.num_prefix_tokens:].reshape(2, 4, 4, 192)
    torch.testing.assert_close(tokens, ref)
    assert tokens.requires_grad is False and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training                                   # stays frozen in eval mode
    torch.testing.assert_close(enc(torch.randn(1, 3, 48, 40)).shape, torch.Size([1, 6, 5, 192]))  # any multiple of 8

    cnn = build_backbone("resnet18", stem_stride=1).eval()
    enc = TokenEncoder(cnn, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        ref = cnn.forward_features(x).permute(0, 2, 3, 1)
    torch.testing.assert_close(enc(x), ref)                         # last feature map, 4×4 for 32² at stride 8
    assert enc(x).shape == (2, 4, 4, 512)
    # re-normalisation: images normalised with other statistics give the same tokens
    raw = torch.rand(2, 3, 32, 32)
    mine = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    other_mean, other_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    theirs = (raw - 0.5) / 0.25
    torch.testing.assert_close(enc(theirs, other_mean, other_std), enc(mine), atol=1e-4, rtol=1e-4)


def test_timm_folder(tmp_path):
    import timm
    from timm.models import save_for_hf

    for arch, grid in (("test_vit", (10, 10)), ("test_resnet", (5, 5))):
        model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
        folder = tmp_path / arch
        save_for_hf(model, str(folder), safe_serialization=True)
        assert json.loads((folder / "config.json").read_text())["architecture"] == arch
        enc = load_token_encoder(folder)
        x = torch.randn(1, 3, 160, 160)
        tokens = enc(x)
        assert tokens.shape[1:3] == grid
        with torch.no_grad():
            out = model.forward_features(x)
        ref = (out[:, model.num_prefix_tokens:].reshape(1, *grid, -1) if out.dim() == 3 else out.permute(0, 2, 3, 1))
        torch.testing.assert_close(tokens, ref)
    assert enc(torch.randn(1, 3, 96, 96)).shape[1:3] == (3, 3)     # a CNN takes any size


def test_open_clip_folder(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}
    model = open_clip.CLIP(**cfg).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                              "std": [0.26862954, 0.26130258, 0.27577711]}}))
    enc = load_token_encoder(tmp_path)
    assert enc.kind == "open_clip_vit" and enc.size == 32
    x = torch.randn(2, 3, 64, 64)                                   # resized to the tower's 32² first
    tokens = enc(x)
    assert tokens.shape == (2, 4, 4, 32)
    with torch.no_grad():
        model.visual.output_tokens = True
        _, ref = model.visual(F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True))
    torch.testing.assert_close(tokens, ref.reshape(2, 4, 4, 32))


def test_load_token_encoder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a genssl encoder"):
        load_token_encoder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="architecture"):
        load_token_encoder(tmp_path)


def test_encoder_side_sample_and_hash(tmp_path):
    """``load_token_encoder(size=)`` resizes (a 32 px ResNet grid of 2×2 becomes 4×4 at 64 px) and sets the
    side a data set is read at; ``sample_index`` is a seeded subset; ``token_encoder_hash`` follows the weights."""
    from genssl.data.index import DatasetIndex
    from genssl.engine.export import save_encoder
    from genssl.generators.foreground import sample_index, token_encoder_hash
    from genssl.models.backbones import build_backbone

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    torch.manual_seed(0)
    save_encoder(build_backbone("resnet18", img_size=32, stem_stride=2), tmp_path / "a", {"eval": {"size": 32}})
    x = torch.randn(2, 3, 32, 32)
    assert load_token_encoder(tmp_path / "a")(x).shape == (2, 2, 2, 512)
    enc = load_token_encoder(tmp_path / "a", size=64)
    assert enc(x).shape == (2, 4, 4, 512) and enc.input_size == 64
    assert load_token_encoder(tmp_path / "a").input_size == 32                       # the run's eval size
    h = token_encoder_hash(tmp_path / "a")
    assert h == token_encoder_hash(tmp_path / "a" / "encoder.safetensors")
    torch.manual_seed(1)
    save_encoder(build_backbone("resnet18", img_size=32, stem_stride=2), tmp_path / "b", {"eval": {"size": 32}})
    assert token_encoder_hash(tmp_path / "b") != h

    n = 50
    index = DatasetIndex(root=tmp_path, paths=[f"{i}.png" for i in range(n)], source_paths=[f"{i}.png" for i in range(n)],
                         sizes=np.full((n, 2), 32), labels=np.arange(n) % 5, classes=list("abcde"), fingerprint="f")
    sub = sample_index(index, 10, seed=3)
    rows = [int(p.split(".")[0]) for p in sub.paths]
    assert len(rows) == 10 and rows == sorted(set(rows)) and (sub.labels == np.array(rows) % 5).all()
    assert sub.paths == sample_index(index, 10, seed=3).paths != sample_index(index, 10, seed=4).paths
    assert len(sample_index(index, 500, seed=0)) == n and sub.fingerprint != index.fingerprint
