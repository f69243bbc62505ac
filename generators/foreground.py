"""GenView's foreground proportion and adaptive noise level (docs/METHODS.md §2.1, §2.2).

- Li et al., "GenView: Enhancing View Quality with Pretrained Generative Model for Self-Supervised
  Learning", ECCV 2024, https://arxiv.org/abs/2403.12003 (§3.3, Eq. 7–8; App. A)
- official code: github.com/xiaojieli0903/genview, tools/clip_pca/extract_features_pca.py (PCA of the
  patch tokens of a 10k-image sample, threshold from their histogram), calculate_fgratio.py (the
  proportion per image), generate_ada_noise_level.py (the 5 bins)

A frozen encoder turns image i into tokens ``F_i`` ``[h, w, D]`` (ViT: patch tokens after the final
norm; CNN: the last feature map). PCA over the tokens of a sample of the data set gives the first
principal direction ``v`` and the token mean ``μ``; a token is foreground when its projection clears
one global threshold ``α``::

    s = (F − μ)·v,   p_i = (1/hw) Σ_{tokens} [s > α],   l_i = 100·min(⌊p_i / 0.2⌋, 4) ∈ {0, …, 400}

``α`` is the ``1 − f`` quantile of the sample's projections, ``f = 0.4``: about 40 % of tokens are
foreground, the paper's App. A choice. PCA leaves the sign of ``v`` open; the official code leaves it to
the user (``calculate_fgratio.py --mask-type gt|lt``, picked after looking at the masks). genssl fixes it
so that the central tokens project higher than the border tokens (objects tend to sit in the middle of
the frame), which needs a token grid of at least 3×3.

The frozen encoder (:class:`TokenEncoder`, :func:`load_token_encoder`) is by default genssl's own
stage-1 encoder; the paper's CLIP ViT-H/14 (foreground) or ConvNeXt-B (QDC scorer, ``models/qdc.py``)
work too, from a local timm or open_clip folder. Using the stage-1 encoder is a deviation: the paper's
encoders never saw the SSL data set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenEncoder", "load_token_encoder", "ForegroundPCA", "fit_foreground_pca", "foreground_proportions",
           "adaptive_noise_level", "noise_level_histogram", "NOISE_LEVEL_BINS", "MAX_NOISE_LEVEL", "FOREGROUND_FRACTION",
           "token_encoder_hash", "sample_index", "fit_dataset_pca", "dataset_foreground_proportions"]

NOISE_LEVEL_BINS = 5    # the proportion's range [0, 1] cut into 5 equal intervals (paper §3.3)
MAX_NOISE_LEVEL = 400   # the paper caps the level at 400 of unCLIP's 1000
FOREGROUND_FRACTION = 0.4  # share of a sample's tokens above the global threshold (paper App. A)


# ----------------------------------------------------------------------------------------- tokens
class TokenEncoder(nn.Module):
    """A frozen encoder seen as a grid of tokens: ``forward(images [B, 3, H, W]) -> [B, h, w, D]`` (float32).

    Args:
        model: a timm ViT (patch tokens after the final norm, prefix tokens dropped), a timm CNN (last
            feature map), an open_clip ``VisionTransformer`` (its ``output_tokens``) or an open_clip
            timm tower (``.trunk``'s last feature map).
        mean, std: the normalisation the encoder expects.
        size: resize inputs to ``size²`` first (encoders with a fixed position embedding); ``None`` feeds
            them as they come (genssl ViTs interpolate their position embedding, CNNs take any size).
        input_size: the side a data set's images are read at for this encoder (default ``size``, else 224).

    ``forward(images, input_mean, input_std)`` re-normalises images that were normalised with other
    statistics (e.g. the training crops' ImageNet mean/std) to the encoder's own.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], size: int | None = None,
                 input_size: int | None = None):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, 3, 1, 1), persistent=False)
        self.size = None if size is None else int(size)
        # the side to read a data set's images at for this encoder (dataset_foreground_proportions)
        self.input_size = int(input_size or size or 224)
        if hasattr(model, "output_tokens") and hasattr(model, "transformer"):
            model.output_tokens = True  # open_clip ViT: forward returns (pooled, tokens)
            self.kind = "open_clip_vit"
        elif hasattr(model, "trunk") and hasattr(model.trunk, "forward_features"):
            self.kind = "timm_tower"
        elif hasattr(model, "forward_features"):
            self.kind = "timm"
        else:
            raise ValueError(f"{type(model).__name__} is neither a timm model nor an open_clip image tower; "
                             "pass one of those (or a folder load_token_encoder understands)")

    def train(self, mode: bool = True):  # frozen: BN/dropout stay in eval mode whatever the caller does
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, input_mean: Sequence[float] | None = None,
                input_std: Sequence[float] | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        if input_mean is not None or input_std is not None:
            if input_mean is None or input_std is None:
                raise ValueError("pass both input_mean and input_std (how the images are normalised now), or neither")
            m = torch.tensor([float(v) for v in input_mean], device=x.device).view(1, 3, 1, 1)
            s = torch.tensor([float(v) for v in input_std], device=x.device).view(1, 3, 1, 1)
            x = ((x * s + m) - self.mean) / self.std
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        dtype = next(self.model.parameters()).dtype
        x = x.to(dtype)
        if self.kind == "open_clip_vit":
            _, tokens = self.model(x)                                        # [B, h·w, D]
            return _to_grid(tokens, tuple(self.model.grid_size)).float()
        if self.kind == "timm_tower":
            return _feature_map_to_grid(self.model.trunk.forward_features(x), self.model.trunk).float()
        out = self.model.forward_features(x)
        if out.dim() == 3:  # ViT: [B, prefix + h·w, D]
            out = out[:, int(getattr(self.model, "num_prefix_tokens", 0)):]
            return _to_grid(out, _vit_grid(self.model, x.shape[-2:])).float()
        return _feature_map_to_grid(out, self.model).float()


def _vit_grid(model: nn.Module, hw) -> tuple[int, int]:
    pe = model.patch_embed
    if hasattr(pe, "dynamic_feat_size"):
        return tuple(int(v) for v in pe.dynamic_feat_size(tuple(int(v) for v in hw)))
    return tuple(int(v) for v in pe.grid_size)


def _to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    h, w = grid
    assert tokens.shape[1] == h * w, f"{tokens.shape[1]} tokens for a {h}×{w} grid"
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])


def _feature_map_to_grid(fmap: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """[B, C, h, w] (or channels-last [B, h, w, C], e.g. Swin) → [B, h, w, C]."""
    if fmap.dim() != 4:
        raise ValueError(f"{type(model).__name__}.forward_features gave shape {tuple(fmap.shape)}, not a feature map")
    c = int(getattr(model, "num_features", fmap.shape[1]))
    return fmap.permute(0, 2, 3, 1) if fmap.shape[1] == c else fmap


def load_token_encoder(spec: str | Path, device: torch.device | str = "cpu", size: int = 0) -> TokenEncoder:
    """A :class:`TokenEncoder` from a local path (nothing is downloaded):

    * a genssl encoder: a run directory or its ``encoder.safetensors`` (``encoder.json`` beside it) —
      its own normalisation; inputs are resized to ``size`` when given (a CNN at 32 px has a 2×2 grid,
      too coarse for a foreground map: ``size=64`` gives 4×4), else fed as they come, and a data set
      is read at its eval size;
    * a timm folder: ``config.json`` naming the ``architecture`` + ``model.safetensors`` /
      ``pytorch_model.bin`` (the layout of timm models on the Hugging Face hub);
    * an open_clip folder: ``open_clip_config.json`` + weights (open_clip's ``local-dir:`` layout, e.g.
      ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` or ``laion/CLIP-convnext_base_w-laion2B-s13B-b82K-augreg``).
    """
    path = Path(spec)
    if (path.is_dir() and (path / "encoder.json").is_file()) or (path.is_file() and path.suffix == ".safetensors"
                                                                 and path.with_name("encoder.json").is_file()):
        from genssl.engine.export import load_encoder
        from genssl.generators.training import encoder_input

        model, meta = load_encoder(path, device)
        spec_in = encoder_input(meta, size)
        return TokenEncoder(model, spec_in.mean, spec_in.std, size=size or None, input_size=spec_in.size).to(device)
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        try:
            import open_clip
        except ImportError:
            raise ValueError(f"{path} is an open_clip folder, but open_clip is not installed: "
                             "pip install open_clip_torch") from None
        model = open_clip.create_model(f"local-dir:{path}", device=device)
        visual = model.visual
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(visual, "image_size", 224))
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
        return TokenEncoder(visual, mean, std, size=int(size)).to(device)  # a fixed input side: size= is ignored
    if path.is_dir() and (path / "config.json").is_file():
        import timm

        config = json.loads((path / "config.json").read_text())
        arch = config.get("architecture")
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if not arch or weights is None:
            raise ValueError(f"{path}: a timm folder needs config.json with 'architecture' and model.safetensors or "
                             "pytorch_model.bin")
        # The folder's pretrained_cfg says how many classes its weights hold; timm drops that head.
        model = timm.create_model(arch, pretrained=True, **{**config.get("model_args", {}), "num_classes": 0},
                                  pretrained_cfg_overlay={**config.get("pretrained_cfg", {}), "file": str(weights)})
        cfg = model.pretrained_cfg
        fixed = hasattr(model, "patch_embed") and not getattr(model.patch_embed, "dynamic_img_size", False)
        side = int(cfg["input_size"][-1])
        return TokenEncoder(model, cfg["mean"], cfg["std"], size=side if fixed else (size or None),
                            input_size=side if fixed else (size or side)).to(device)
    raise ValueError(f"{spec}: not a genssl encoder (encoder.json), an open_clip folder (open_clip_config.json) "
                     "or a timm folder (config.json); pass one of those")


# ------------------------------------------------------------------------------------------- PCA
@dataclasses.dataclass
class ForegroundPCA:
    """PC-1 of a frozen encoder's tokens and the global foreground threshold (module docstring).

    ``mean`` ``[D]``, ``direction`` ``[D]`` (unit, sign fixed: centre > border), ``threshold`` on
    ``(F − mean)·direction``; ``foreground_fraction`` the share of the fit sample's tokens above it.
    """

    mean: torch.Tensor
    direction: torch.Tensor
    threshold: float
    foreground_fraction: float

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` → ``[...]`` projections on PC-1 (in the tokens' dtype)."""
        if tokens.shape[-1] != self.direction.numel():
            raise ValueError(f"tokens have {tokens.shape[-1]} channels, the PCA was fit on {self.direction.numel()}")
        return (tokens - self.mean.to(tokens)) @ self.direction.to(tokens)

    def mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Boolean foreground mask ``[B, h, w]`` of tokens ``[B, h, w, D]``."""
        return self.project(tokens) > self.threshold

    def proportion(self, tokens: torch.Tensor) -> torch.Tensor:
        """Foreground proportion ``p_i`` ``[B]`` (float64) of tokens ``[B, h, w, D]``."""
        return self.mask(tokens).flatten(1).to(torch.float64).mean(1)

    def state_dict(self) -> dict:
        as64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return {"mean": self.mean, "direction": self.direction, "threshold": as64(self.threshold),
                "foreground_fraction": as64(self.foreground_fraction)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ForegroundPCA":
        return cls(state["mean"].to(torch.float64), state["direction"].to(torch.float64), float(state["threshold"]),
                   float(state["foreground_fraction"]))


def _centre_mask(h: int, w: int) -> torch.Tensor:
    """``[h, w]`` True on the central box of half the height and width (strictly inside)."""
    r = ((torch.arange(h) + 0.5 - h / 2).abs() < h / 4)[:, None]
    c = ((torch.arange(w) + 0.5 - w / 2).abs() < w / 4)[None, :]
    return r & c


def _reiterable(images: Iterable) -> Iterable:
    if iter(images) is images:
        raise ValueError("images must be re-iterable (a list of batches or a DataLoader): the PCA reads it twice; "
                         "a generator can be read once only")
    return images


def fit_foreground_pca(token_fn: Callable[[torch.Tensor], torch.Tensor], images: Iterable[torch.Tensor],
                       foreground_fraction: float = FOREGROUND_FRACTION) -> ForegroundPCA:
    """PC-1, its sign and the global threshold from the tokens of a sample of the data set.

    Args:
        token_fn: ``images [B, 3, H, W] -> tokens [B, h, w, D]`` (a :class:`TokenEncoder`).
        images: re-iterable batches of the sample (the paper: 10,000 random training images), read
            twice: moments first (float64, ``[D, D]`` memory, never all tokens), projections second.
        foreground_fraction: share of the sample's tokens above the threshold (paper: ≈ 0.4).
    """
    if not 0.0 < foreground_fraction < 1.0:
        raise ValueError(f"foreground_fraction must lie in (0, 1), got {foreground_fraction}")
    images = _reiterable(images)
    n, total, outer = 0, None, None
    centre_sum = border_sum = None
    n_centre = n_border = 0
    for batch in images:
        t = token_fn(batch).to(torch.float64)
        if t.dim() != 4:
            raise ValueError(f"token_fn must return [B, h, w, D], got {tuple(t.shape)}")
        B, h, w, D = t.shape
        flat = t.reshape(-1, D)
        if total is None:
            total, outer = torch.zeros(D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
            centre_sum, border_sum = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
        n += flat.shape[0]
        total += flat.sum(0).cpu()
        outer += (flat.T @ flat).cpu()
        cm = _centre_mask(h, w).to(t.device)
        centre_sum += t[:, cm].sum((0, 1)).cpu()
        border_sum += t[:, ~cm].sum((0, 1)).cpu()
        n_centre += B * int(cm.sum())
        n_border += B * int((~cm).sum())
    if n < 2:
        raise ValueError("fit_foreground_pca: images gave fewer than 2 tokens")
    if n_centre == 0 or n_border == 0:
        raise ValueError(f"the token grid ({h}×{w}) is too small to tell the centre from the border (the sign of PC-1); "
                         "use an encoder / input size giving at least 3×3 tokens")
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    _, vecs = torch.linalg.eigh(cov)                # ascending eigenvalues
    direction = vecs[:, -1].contiguous()
    if float((centre_sum / n_centre - border_sum / n_border) @ direction) < 0:
        direction = -direction
    proj = []
    for batch in images:
        t = token_fn(batch).to(torch.float64)
        proj.append(((t.reshape(-1, t.shape[-1]) - mean.to(t.device)) @ direction.to(t.device)).cpu().numpy())
    proj = np.concatenate(proj)
    threshold = float(np.quantile(proj, 1.0 - foreground_fraction))
    return ForegroundPCA(mean, direction, threshold, float((proj > threshold).mean()))


def foreground_proportions(pca: ForegroundPCA, token_fn: Callable[[torch.Tensor], torch.Tensor],
                           images: Iterable[torch.Tensor]) -> torch.Tensor:
    """``p_i`` ``[N]`` (float64) for every image of ``images`` (batches, in order)."""
    out = [pca.proportion(token_fn(batch)).cpu() for batch in images]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


# ---------------------------------------------------------------------------------- noise levels
def adaptive_noise_level(p, bins: int = NOISE_LEVEL_BINS, max_level: int = MAX_NOISE_LEVEL):
    """GenView's level ``l = step·min(⌊p·bins⌋, bins − 1)``, ``step = max_level/(bins − 1)``: by default
    ``100·min(⌊p/0.2⌋, 4)`` ∈ {0, 100, 200, 300, 400} (paper Eq. 8).

    ``p`` in [0, 1]: a float, numpy array or tensor; the result has the same kind, integer dtype. A 1e-9
    slack makes exact bin edges (p = 0.6 → 300) immune to round-off (0.6/0.2 = 2.9999999999999996).
    Bins are closed on the left as Eq. 8's floor; the official ``generate_ada_noise_level.py`` closes them
    on the right (``np.digitize(right=True)``), which differs only when p falls exactly on an edge.
    """
    if bins < 2 or max_level % (bins - 1):
        raise ValueError(f"bins must be >= 2 and max_level a multiple of bins - 1, got bins={bins}, max_level={max_level}")
    step = max_level // (bins - 1)
    if isinstance(p, torch.Tensor):
        q = torch.floor(p.to(torch.float64) * bins + 1e-9).clamp(0, bins - 1)
        return (step * q).to(torch.int64)
    if isinstance(p, (np.ndarray, list, tuple)):
        q = np.clip(np.floor(np.asarray(p, dtype=np.float64) * bins + 1e-9), 0, bins - 1)
        return (step * q).astype(np.int64)
    return int(step * min(max(int(np.floor(float(p) * bins + 1e-9)), 0), bins - 1))


def noise_level_histogram(levels) -> dict[str, int]:
    """``{"0": n_0, "100": n_100, …}``: how many views got each level (for the generation report)."""
    arr = np.asarray(levels.cpu() if isinstance(levels, torch.Tensor) else levels).reshape(-1).astype(np.int64)
    values, counts = np.unique(arr, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


# ------------------------------------------------------------------------------------ data sets
def token_encoder_hash(spec: str | os.PathLike) -> str:
    """sha256 naming the weights behind ``load_token_encoder(spec)``: a genssl encoder file's own
    hash (as the E-LDM records it), else a hash of every file of the folder (names and contents)."""
    from genssl.generators.training import file_sha256

    path = Path(spec)
    if path.is_file():
        return file_sha256(path)
    if (path / "encoder.json").is_file():
        from genssl.engine.export import resolve_encoder_path

        return file_sha256(resolve_encoder_path(path))
    if not path.is_dir():
        raise ValueError(f"{spec}: no such encoder file or folder")
    h = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()


def sample_index(index, n: int, seed: int):
    """The ``n`` images (uniform without replacement, seeded; all when ``n >= len(index)``) of a
    ``DatasetIndex``, in index order, as a ``DatasetIndex`` of their own."""
    rows = np.arange(len(index)) if n >= len(index) else \
        np.sort(np.random.default_rng([int(seed), 0x46]).choice(len(index), size=int(n), replace=False))
    return index.subset(rows, fingerprint=f"{index.fingerprint}:sample{len(rows)}:{seed}", quarantine=[])


class _Images:
    """Re-iterable ``[B, 3, s, s]`` batches of a ``DatasetIndex`` on ``device``, read as ``encoder``
    expects them: side ``encoder.input_size`` (whole image, shorter side resized, centre square),
    its own normalisation; one process reads them all."""

    def __init__(self, index, encoder: TokenEncoder, device: torch.device, batch_size: int, num_threads: int):
        from genssl.data.dali_loader import DaliEvalLoader

        self.device = torch.device(device)
        self.loader = DaliEvalLoader(index, encoder.input_size, batch_size, 0, 1,
                                     device_id=self.device.index if self.device.type == "cuda" else None,
                                     num_threads=num_threads, crop_ratio=1.0, mean=encoder.mean.flatten().tolist(),
                                     std=encoder.std.flatten().tolist())

    def __iter__(self):
        for images, _, _ in self.loader:
            yield images.to(self.device)


def fit_dataset_pca(encoder: TokenEncoder, index, device: torch.device | str, n_sample: int = 10_000, seed: int = 0,
                    foreground_fraction: float = FOREGROUND_FRACTION, batch_size: int = 64,
                    num_threads: int = 2) -> ForegroundPCA:
    """:func:`fit_foreground_pca` of ``encoder``'s tokens over ``n_sample`` images of ``index`` (the
    paper: 10,000 random training images), drawn by :func:`sample_index`."""
    images = _Images(sample_index(index, n_sample, seed), encoder, device, batch_size, num_threads)
    return fit_foreground_pca(encoder, images, foreground_fraction)


def dataset_foreground_proportions(encoder: TokenEncoder, encoder_hash: str, index, dist, n_sample: int = 10_000,
                                   seed: int = 0, foreground_fraction: float = FOREGROUND_FRACTION,
                                   batch_size: int = 64, num_threads: int = 2, cache_dir=None,
                                   log=print) -> np.ndarray:
    """``p_i`` ``[N]`` (float64) of every image of ``index``, cached like the E-LDM's embeddings
    (``generators/training.cached_dataset_tensor``: every rank computes its share, then the file is
    reused) under the key (data fingerprint, ``encoder_hash``, input side, sample, seed, fraction).

    Only when the cache is missing, rank 0 fits the PCA on the sample (:func:`fit_dataset_pca`) and
    sends it to the other ranks. Every rank must call this."""
    from genssl.engine.distributed import broadcast_object
    from genssl.generators.autoencoder import LatentCache
    from genssl.generators.training import _cache_dir, cached_dataset_tensor

    key = (f"foreground:{encoder_hash}|size={encoder.input_size}|sample={int(n_sample)}|seed={int(seed)}"
           f"|fraction={float(foreground_fraction)}")
    cache = LatentCache(_cache_dir(cache_dir), index.fingerprint, key, name="foreground")
    pca = None
    if not broadcast_object(cache.exists() if dist.is_main else None):
        if dist.is_main:
            if log:
                log(f"foreground PCA of {min(n_sample, len(index))} images at {encoder.input_size}px")
            try:
                pca = fit_dataset_pca(encoder, index, dist.device, n_sample, seed, foreground_fraction, batch_size,
                                      num_threads).state_dict()
            except ValueError as e:  # raised on every rank below, so none waits for rank 0 forever
                pca = e
        pca = broadcast_object(pca)
        if isinstance(pca, Exception):
            raise pca
        pca = ForegroundPCA.from_state_dict(pca)
    mean, std = encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()
    return cached_dataset_tensor(cache, "foreground", index, dist, lambda x: pca.proportion(encoder(x)),
                                 encoder.input_size, mean, std, 1.0, batch_size, num_threads, torch.float64, log)
