"""Packed multi-crop ViT forward (models/packed_vit.py) = the per-resolution forward: outputs, gradients, DINO loss."""

from __future__ import annotations

import copy
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from genssl.engine.config import ConfigError
from genssl.engine.run_config import TrainConfig
from genssl.models import packed_vit
from genssl.models.backbones import build_backbone
from genssl.models.dino import DINOHead, MultiCropWrapper
from genssl.models.heads import backbone_over_crops
from genssl.models.objectives import DINOConfig, DINOObjective, build_dino_student
from genssl.models.packed_vit import PackedViT, packed_forward, resolve_attention, set_multicrop

XFORMERS_MISSING = ("xformers is not installed. PyPI's newest (0.0.35, torch>=2.10) installs beside the pinned torch "
                    "2.14.1 with `pip install --no-deps xformers`; its C++ extension, built for torch 2.10 + CUDA 12.8, "
                    "does not load there; xformers.info still lists the operators on PyTorch's own CUDA kernels "
                    "(cutlassF-pt, fa2F-pt)")


def _pair(patch: int, drop_path: float = 0.0, dtype=torch.float64):
    """(per-resolution ViT, packed copy with the same weights); vit_tiny at 32 px."""
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", img_size=32, patch_size=patch, drop_path_rate=drop_path).to(dtype)
    return vit, set_multicrop(copy.deepcopy(vit), "packed", "sdpa")


def _crops(batch: int, sizes, dtype=torch.float64, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g, dtype=dtype).requires_grad_(True) for s in sizes]


def _forward_backward(vit, crops):
    out = backbone_over_crops(vit, crops)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)  # grad_output ≠ 1, differs per row
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad for n, p in vit.named_parameters()}, [c.grad for c in crops]


@pytest.mark.parametrize("patch, batch, sizes", [
    (4, 3, (32, 32, 16, 16)),            # DINO's order: global crops, then local ones
    (8, 1, (32, 16, 32, 16)),            # batch 1, resolutions alternating
    (8, 5, (16, 32, 32, 24, 16, 24)),    # three resolutions, odd batch
])
def test_packed_equals_per_resolution_float64(patch: int, batch: int, sizes) -> None:
    vit, packed = _pair(patch)
    out_a, grads_a, dx_a = _forward_backward(vit, _crops(batch, sizes))
    out_b, grads_b, dx_b = _forward_backward(packed, crops := _crops(batch, sizes))
    assert out_b.shape == (len(sizes) * batch, 192)
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-10)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-9, atol=1e-10, msg=name)
    for a, b in zip(dx_a, dx_b):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    assert all(c.grad is not None for c in crops)


def test_packed_equals_per_resolution_float32() -> None:
    vit, packed = _pair(4, dtype=torch.float32)
    sizes = (32, 32, 16, 16, 16, 16, 16, 16)  # 2×32 + 6×16 (the cifar preset's crops)
    out_a, grads_a, _ = _forward_backward(vit, _crops(1, sizes, torch.float32))
    out_b, grads_b, _ = _forward_backward(packed, _crops(1, sizes, torch.float32))
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_one_pass_over_all_crops() -> None:
    """Every block runs once on [B, Σ T_i, D] (the per-resolution forward: once per resolution)."""
    vit, packed = _pair(8)
    seen = {"per_resolution": [], "packed": []}
    for key, model in (("per_resolution", vit), ("packed", packed)):
        model.blocks[3].norm1.register_forward_hook(lambda m, args, out, key=key: seen[key].append(tuple(out.shape)))
        with torch.no_grad():
            backbone_over_crops(model, _crops(2, (32, 32, 16, 16, 16)))
    assert seen["per_resolution"] == [(4, 17, 192), (6, 5, 192)]
    assert seen["packed"] == [(2, 2 * 17 + 3 * 5, 192)]


def test_drop_path_eval_equal_and_train_per_crop() -> None:
    vit, packed = _pair(8, drop_path=0.5)
    vit.eval(), packed.eval()
    out_a, grads_a, _ = _forward_backward(vit, _crops(3, (32, 16, 16)))
    out_b, grads_b, _ = _forward_backward(packed, _crops(3, (32, 16, 16)))
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads_b["blocks.11.mlp.fc1.weight"], grads_a["blocks.11.mlp.fc1.weight"])

    # training: one keep/drop draw per (sample, crop), scaled by 1/keep, constant over a crop's tokens
    block = packed.train().blocks[11]
    seqlens = [17, 5, 5, 5, 5, 5, 5]
    torch.manual_seed(0)
    mask = packed_vit._drop_path(block.drop_path1, torch.ones(64, sum(seqlens), 1, dtype=torch.float64), seqlens)
    per_crop = torch.stack([s[:, 0, 0] for s in mask.split(seqlens, dim=1)], 1)  # [64, 7]
    for seg, value in zip(mask.split(seqlens, dim=1), per_crop.T):
        assert (seg == value[:, None, None]).all()
    keep = 1 - block.drop_path1.drop_prob
    assert set(per_crop.unique().tolist()) == {0.0, 1 / keep}
    assert ((per_crop > 0).any(1) & (per_crop == 0).any(1)).any()  # crops of one sample drawn independently
    assert abs((per_crop > 0).double().mean().item() - keep) < 0.1


def test_dino_objective_loss_and_gradients_equal() -> None:
    torch.manual_seed(0)
    cfg = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, drop_path_rate=0.0)
    student = build_dino_student("vit_tiny", 32, 8, cfg)
    packed = set_multicrop(copy.deepcopy(student), "packed", "auto")
    crops = [c.detach() for c in _crops(3, (32, 32, 16, 16, 16, 16), torch.float32)]
    losses, grads = [], []
    for model in (student, packed):
        objective = DINOObjective(model, cfg, n_global=2, epochs=1, dtype=torch.float32)
        assert isinstance(objective.teacher.module.backbone, type(model.backbone))  # the EMA copy keeps the mode
        loss, _ = objective.training_loss(model, (crops, None), SimpleNamespace(epoch=0))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():  # float32 (the EMA teacher is float32): within 1e-4 of each tensor's scale
        assert (grads[1][name] - g).abs().max() <= 1e-4 * g.abs().max(), name


def test_set_multicrop_keeps_weights_and_rejects_what_it_cannot_pack() -> None:
    vit = build_backbone("vit_tiny", img_size=16, patch_size=8)
    keys = vit.state_dict().keys()
    wrapper = MultiCropWrapper(vit, DINOHead(192, out_dim=8, hidden_dim=8, bottleneck_dim=4))
    assert set_multicrop(wrapper, "packed", "sdpa") is wrapper and isinstance(vit, PackedViT)
    assert vit.state_dict().keys() == keys and vit.multicrop_attention == "sdpa"
    with torch.no_grad():  # a tensor input is timm's forward
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(vit(x), vit.forward_features(x)[:, 0])
    set_multicrop(wrapper, "per_resolution")
    assert type(vit) is not PackedViT
    with pytest.raises(ValueError, match="multicrop=per_resolution"):
        set_multicrop(build_backbone("resnet18", img_size=32, stem_stride=2), "packed")
    with pytest.raises(ValueError, match="choose one of"):
        set_multicrop(vit, "packd")
    with pytest.raises(ValueError, match="choose one of"):
        set_multicrop(vit, "packed", "flash")


def test_attention_auto_is_sdpa_without_xformers(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "xformers", None)  # import xformers now fails, installed or not
    packed_vit.xformers_available.cache_clear()
    try:
        assert resolve_attention("auto", "cuda") == "sdpa" and resolve_attention("auto", "cpu") == "sdpa"
        with pytest.raises(ValueError, match="xformers is not importable"):
            resolve_attention("xformers", "cuda")
        monkeypatch.setitem(sys.modules, "xformers", SimpleNamespace())
        monkeypatch.setitem(sys.modules, "xformers.ops", SimpleNamespace())  # importable (no kernel is called)
        packed_vit.xformers_available.cache_clear()
        assert resolve_attention("auto", "cuda") == "xformers" and resolve_attention("auto", "cpu") == "sdpa"
        with pytest.raises(ValueError, match="needs CUDA"):
            resolve_attention("xformers", "cpu")
    finally:
        packed_vit.xformers_available.cache_clear()


def test_train_config_keys() -> None:
    TrainConfig(model="vit_tiny", multicrop="packed", attention="sdpa").validate()
    with pytest.raises(ConfigError, match="multicrop=packed packs ViT tokens, but model=resnet18"):
        TrainConfig(model="resnet18", multicrop="packed").validate()
    with pytest.raises(ConfigError, match="set multicrop=packed"):
        TrainConfig(model="vit_tiny", attention="xformers").validate()
    xformers_cfg = TrainConfig(model="vit_tiny", multicrop="packed", attention="xformers")
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ConfigError, match="xformers is not installed"):
            xformers_cfg.validate()
    else:
        xformers_cfg.validate()


def test_xformers_layout_on_cpu(monkeypatch) -> None:
    """The xformers path's packing and BlockDiagonalMask, with the CUDA kernel replaced by its dense definition."""
    fmha = pytest.importorskip("xformers.ops.fmha", reason=XFORMERS_MISSING)
    import xformers.ops

    def dense(q, k, v, attn_bias, p=0.0, scale=None):  # [1, N, H, d]; the mask xformers itself materialises
        assert isinstance(attn_bias, fmha.BlockDiagonalMask) and p == 0.0
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        bias = attn_bias.materialize((1, q.shape[1], q.shape[2], k.shape[2]), dtype=q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale).transpose(1, 2)

    monkeypatch.setattr(xformers.ops, "memory_efficient_attention", dense)
    vit, packed = _pair(8)
    crops = _crops(3, (32, 32, 16, 24))
    with torch.no_grad():
        torch.testing.assert_close(packed_forward(packed, crops, "xformers"), backbone_over_crops(vit, crops))


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "xformers"])
def test_packed_on_cuda_equals_per_resolution(attention: str) -> None:
    if attention == "xformers" and importlib.util.find_spec("xformers") is None:
        pytest.skip(XFORMERS_MISSING)
    vit, packed = _pair(16, dtype=torch.float32)
    vit, packed = vit.cuda(), packed.cuda()
    packed.multicrop_attention = attention
    crops = [torch.randn(5, 3, s, s, device="cuda") for s in (224, 224, 96, 96, 96, 96)]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(backbone_over_crops(packed, crops).float(), backbone_over_crops(vit, crops).float(),
                                   rtol=0.05, atol=0.05)
