"""DINO multi-crop augmentation: the spec, and host-side sampling of every random parameter.

All randomness of an augmented batch is drawn here, in numpy, from a generator the loader seeds
with (seed, epoch, rank, step). The DALI graph only *applies* the parameters it is fed, so a batch
is a pure function of those four numbers: runs are reproducible, and a run resumed at step k sees
exactly the crops the uninterrupted run would have seen (same world size and batch size).

Parameter layout, one row per (sample, crop), float32, see the `P_*` column indices:
``y0, x0, y1, x1`` crop window relative to the image (0..1), ``flip`` (0/1), ``brightness``,
``contrast``, ``saturation`` (factors, 1 = unchanged; saturation 0 = grayscale), ``hue`` (degrees),
``sigma`` (Gaussian blur, 0 = no blur), ``solarize`` (0/1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

P_Y0, P_X0, P_Y1, P_X1, P_FLIP, P_BRIGHT, P_CONTRAST, P_SAT, P_HUE, P_SIGMA, P_SOLAR = range(11)
N_PARAMS = 11


@dataclass(frozen=True)
class CropPlan:
    """What one crop slot does: its output size, area range and per-crop probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


@dataclass
class MultiCropSpec:
    """DINO's multi-crop recipe (Caron et al. 2021). Defaults reproduce the paper's ImageNet setup.

    Global crop ``i`` uses ``blur_p_global[i % len]`` and ``solarize_p_global[i % len]``, which gives
    DINO's asymmetric pair (blur 1.0 / 0.1, solarize 0.0 / 0.2) for the default two global crops.
    """

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p_global: tuple[float, ...] = (1.0, 0.1)
    blur_p_local: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p_global: tuple[float, ...] = (0.0, 0.2)
    solarize_p_local: float = 0.0
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma", "mean", "std",
                     "blur_p_global", "solarize_p_global"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("global_size", "local_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MultiCropSpec.{name} must be a positive pixel size, got {getattr(self, name)}")
        if self.n_global < 1:
            raise ValueError(f"MultiCropSpec.n_global must be >= 1 (DINO needs global crops), got {self.n_global}")
        if self.n_local < 0:
            raise ValueError(f"MultiCropSpec.n_local must be >= 0, got {self.n_local}")
        for name in ("global_scale", "local_scale"):
            lo, hi = _pair(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"MultiCropSpec.{name} must satisfy 0 < lo <= hi <= 1 (fractions of the image area), got {(lo, hi)}")
        lo, hi = _pair(self, "ratio")
        if not 0.0 < lo <= hi:
            raise ValueError(f"MultiCropSpec.ratio must satisfy 0 < lo <= hi, got {(lo, hi)}")
        lo, hi = _pair(self, "blur_sigma")
        if not 0.0 < lo <= hi:
            raise ValueError(f"MultiCropSpec.blur_sigma must satisfy 0 < lo <= hi, got {(lo, hi)}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p_local", "solarize_p_local"):
            _check_prob(name, getattr(self, name))
        for name in ("blur_p_global", "solarize_p_global"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"MultiCropSpec.{name} needs at least one probability")
            for v in values:
                _check_prob(name, v)
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"MultiCropSpec.{name} must be >= 0 (jitter strength), got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"MultiCropSpec.hue must be in [0, 0.5] (fraction of the colour circle), got {self.hue}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"MultiCropSpec.{name} needs 3 values (R, G, B), got {getattr(self, name)}")
        if min(self.std) <= 0:
            raise ValueError(f"MultiCropSpec.std must be positive, got {self.std}")

    @property
    def n_crops(self) -> int:
        return self.n_global + self.n_local

    def plans(self) -> list[CropPlan]:
        """One plan per crop, global crops first (the order loaders yield them in)."""
        out = [CropPlan(self.global_size, self.global_scale,
                        self.blur_p_global[i % len(self.blur_p_global)],
                        self.solarize_p_global[i % len(self.solarize_p_global)])
               for i in range(self.n_global)]
        out += [CropPlan(self.local_size, self.local_scale, self.blur_p_local, self.solarize_p_local)
                for _ in range(self.n_local)]
        return out


def _pair(spec: MultiCropSpec, name: str) -> tuple[float, float]:
    value = getattr(spec, name)
    if len(value) != 2:
        raise ValueError(f"MultiCropSpec.{name} must be a (low, high) pair, got {value}")
    return value[0], value[1]


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"MultiCropSpec.{name} is a probability and must be in [0, 1], got {value}")


def random_resized_crop_boxes(rng: np.random.Generator, sizes_wh: np.ndarray,
                              scale: tuple[float, float], ratio: tuple[float, float],
                              attempts: int = 10) -> np.ndarray:
    """torchvision's RandomResizedCrop window, vectorised over a batch.

    Returns ``[B, 4]`` float (y0, x0, y1, x1) relative to each image. Same algorithm as
    torchvision: up to ``attempts`` (area, log-aspect) draws, first one that fits wins, else a
    centre crop with the aspect clamped to ``ratio``.
    """
    sizes_wh = np.asarray(sizes_wh, dtype=np.float64).reshape(-1, 2)
    b = len(sizes_wh)
    width, height = sizes_wh[:, 0:1], sizes_wh[:, 1:2]
    area = width * height
    target = area * rng.uniform(scale[0], scale[1], size=(b, attempts))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(b, attempts)))
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(b), first]
    w, h = w[np.arange(b), first], h[np.arange(b), first]
    width, height = width[:, 0], height[:, 0]
    # fallback: centre crop, aspect clamped to the allowed range
    in_ratio = width / height
    fw = np.where(in_ratio < ratio[0], width, np.where(in_ratio > ratio[1], np.rint(height * ratio[1]), width))
    fh = np.where(in_ratio < ratio[0], np.rint(width / ratio[0]), height)
    w, h = np.where(found, w, np.minimum(fw, width)), np.where(found, h, np.minimum(fh, height))
    u = rng.random((b, 2))
    y0 = np.where(found, np.floor(u[:, 0] * (height - h + 1)), np.floor((height - h) / 2))
    x0 = np.where(found, np.floor(u[:, 1] * (width - w + 1)), np.floor((width - w) / 2))
    boxes = np.stack([y0 / height, x0 / width, (y0 + h) / height, (x0 + w) / width], axis=1)
    assert np.all((boxes >= 0) & (boxes <= 1)), "crop window outside the image"
    return boxes


def sample_multicrop_params(rng: np.random.Generator, spec: MultiCropSpec,
                            sizes_wh: np.ndarray) -> np.ndarray:
    """All augmentation parameters of one batch: ``[B, n_crops, N_PARAMS]`` float32 (layout above).

    ``sizes_wh`` is ``[B, 2]`` (width, height) of the images as decoded; the crop windows depend on
    it, so synthetic views of another size get their own call.
    """
    sizes_wh = np.asarray(sizes_wh).reshape(-1, 2)
    b = len(sizes_wh)
    out = np.zeros((b, spec.n_crops, N_PARAMS), dtype=np.float32)
    for c, plan in enumerate(spec.plans()):
        p = out[:, c]
        p[:, P_Y0:P_X1 + 1] = random_resized_crop_boxes(rng, sizes_wh, plan.scale, spec.ratio)
        p[:, P_FLIP] = rng.random(b) < spec.flip_p
        jitter = rng.random(b) < spec.jitter_p
        for col, strength in ((P_BRIGHT, spec.brightness), (P_CONTRAST, spec.contrast), (P_SAT, spec.saturation)):
            factor = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=b)
            p[:, col] = np.where(jitter, factor, 1.0)
        p[:, P_HUE] = np.where(jitter, rng.uniform(-spec.hue, spec.hue, size=b) * 360.0, 0.0)
        gray = rng.random(b) < spec.grayscale_p
        p[:, P_SAT] *= ~gray  # grayscale after jitter == saturation 0 (hue rotation keeps luma)
        blur = rng.random(b) < plan.blur_p
        p[:, P_SIGMA] = np.where(blur, rng.uniform(*spec.blur_sigma, size=b), 0.0)
        p[:, P_SOLAR] = rng.random(b) < plan.solarize_p
    return out
