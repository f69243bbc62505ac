"""Built-in data: ``builtin:shapes`` and ``builtin:textures``, procedural labelled image sets, and `resolve_data`.

Why: smoke runs, tests and CI need a dataset that exists everywhere, downloads nothing, has labels
(so k-NN accuracy means something: chance is 1/12) and is not trivially separable by colour or
background alone. Class = shape; each shape has a characteristic hue that varies by +-25 degrees
(neighbouring classes overlap, so colour alone is weak: k-NN on pixels is ~12 %), and size, position,
rotation, brightness and a low-contrast textured background (noise, stripes, gradients, checkers)
vary per image. Deterministic by seed; written once as JPEG
ImageFolder ``train/`` and ``val/`` into the cache (atomically) and reused.

``builtin:textures``: 12 grey periodic patterns (stripes in three orientations at two frequencies,
checkers, dots, grids, zigzags, crosshatch, rings), each image at a random phase, period (±15 %)
and pair of grey levels. Why a second set: it is the data on which a few hundred SSL steps on 2 CPU
cores measurably improve an encoder (docs/LEARNING.md, *A guard that learns*). Everything that
varies within a class is what the SSL augmentations vary (crop position and scale, brightness,
contrast), and there is no colour an instance could be told apart by, so instance discrimination
has to learn the pattern; on ``builtin:shapes`` (colour, rotation, textured backgrounds) it learns
those first and k-NN does not move in that budget. Orientation classes are flip-symmetric (the
diagonal class draws +45 or -45 degrees) because every recipe flips its crops.
"""

from __future__ import annotations

import colorsys
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from genssl.data.index import default_cache_dir

SHAPES_VERSION = 3
TEXTURES_VERSION = 1
TEXTURE_CLASSES = ("stripes_h", "stripes_v", "stripes_diag", "fine_stripes_h", "fine_stripes_v", "fine_stripes_diag",
                   "checkers", "dots", "grid", "zigzag", "crosshatch", "rings")
CLASSES = ("arrow", "circle", "cross", "crescent", "diamond", "ellipse_bar", "heart", "hexagon",
           "ring", "square", "star", "triangle")


@dataclass(frozen=True)
class DataSplits:
    train: Path
    val: Path | None


# ---------------------------------------------------------------------------------------------
# drawing


def _polygon(n: int, r: float, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(r: float) -> list[tuple[float, float]]:
    return [((r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + math.pi * k / 5),
             (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + math.pi * k / 5)) for k in range(10)]


def _heart(r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x * r / 17, y * r / 17 + 0.1 * r))
    return pts


def _shape_polys(name: str, r: float) -> tuple[list[list[tuple[float, float]]], list[list[tuple[float, float]]]]:
    """Filled polygons and 'holes' (drawn in background colour) of a shape centred at the origin."""
    ell = lambda rx, ry, cx=0.0: [(cx + rx * math.cos(2 * math.pi * k / 48), ry * math.sin(2 * math.pi * k / 48)) for k in range(48)]
    if name == "circle":
        return [ell(r, r)], []
    if name == "ring":
        return [ell(r, r)], [ell(0.55 * r, 0.55 * r)]
    if name == "crescent":
        return [ell(r, r)], [ell(0.85 * r, 0.85 * r, 0.45 * r)]
    if name == "ellipse_bar":
        return [ell(r, 0.35 * r)], []
    if name == "square":
        return [_polygon(4, r * 1.1, math.pi / 4)], []
    if name == "diamond":
        return [[(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)]], []
    if name == "triangle":
        return [_polygon(3, r * 1.1, -math.pi / 2)], []
    if name == "hexagon":
        return [_polygon(6, r)], []
    if name == "star":
        return [_star(r * 1.1)], []
    if name == "heart":
        return [_heart(r)], []
    if name == "cross":
        a, b = 0.3 * r, r
        return [[(-a, -b), (a, -b), (a, b), (-a, b)], [(-b, -a), (b, -a), (b, a), (-b, a)]], []
    if name == "arrow":
        return [[(-r, -0.22 * r), (0.1 * r, -0.22 * r), (0.1 * r, -0.6 * r), (r, 0), (0.1 * r, 0.6 * r),
                 (0.1 * r, 0.22 * r), (-r, 0.22 * r)]], []
    raise AssertionError(f"unknown shape {name}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Low-contrast textures: visible, but the object stays the most salient thing two crops share
    # (high-contrast textures let SSL match crops by background alone and ignore the shape).
    c0 = rng.uniform(40, 215, 3)
    c1 = np.clip(c0 + rng.uniform(-40, 40, 3), 0, 255)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient
        ang = rng.uniform(0, 2 * math.pi)
        t = (np.cos(ang) * xx + np.sin(ang) * yy)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 1:  # stripes
        ang, freq = rng.uniform(0, math.pi), rng.uniform(3, 10)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy))
    elif kind == 2:  # checkers
        n = rng.integers(2, 8)
        t = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
    else:  # smooth noise
        coarse = rng.random((5, 5)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32) / 255
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += rng.normal(0, rng.uniform(2, 10), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_shape(name: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of shape ``name``: random colour, size, position, rotation, background."""
    ss = 2  # draw at 2x and downsample: anti-aliased edges
    big = size * ss
    background = _background(rng, size)
    img = Image.fromarray(background).resize((big, big), Image.NEAREST)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    r = rng.uniform(0.28, 0.45) * big
    cx, cy = rng.uniform(r * 0.8, big - r * 0.8, 2)
    rot = rng.uniform(0, 2 * math.pi)
    # Each kind of object has a characteristic hue (as fire engines are red), varied by +-25 degrees,
    # with random saturation and brightness; the value is kept clearly off the background's mean
    # brightness so the outline is visible.
    hue = (CLASSES.index(name) / len(CLASSES) + rng.normal(0, 25 / 360)) % 1.0
    mean = float(background.mean()) / 255
    value = rng.uniform(0.75, 1.0) if mean < 0.5 else rng.uniform(0.1, 0.35)
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), value))
    polys, holes = _shape_polys(name, r)

    def place(poly: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in poly]

    for poly in polys:
        draw.polygon(place(poly), fill=255)
    for poly in holes:  # holes show the background through
        draw.polygon(place(poly), fill=0)
    img.paste(Image.new("RGB", (big, big), colour), (0, 0), mask)
    img = img.resize((size, size), Image.BILINEAR)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return img


def render_texture(name: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One image of grey pattern ``name``: random phase, period (±15 %) and dark/light grey levels."""
    ss = 4  # draw at 4x and downsample: anti-aliased edges
    yy, xx = np.mgrid[0:size * ss, 0:size * ss].astype(np.float32) / (size * ss)
    dark, light = rng.uniform(0.0, 0.35), rng.uniform(0.65, 1.0)
    if rng.random() < 0.5:
        dark, light = light, dark  # either level may be the pattern's
    period = 1.0 / (6.0 * rng.uniform(0.85, 1.15))  # in image widths
    ox, oy = rng.uniform(0, 1, 2)
    u, v = (xx / period + ox) % 1.0, (yy / period + oy) % 1.0  # position within a cell

    def stripes(angle: float, freq: float) -> np.ndarray:
        phase = rng.uniform(0, 2 * math.pi)
        return np.sin(2 * math.pi * freq / (6 * period) * (math.cos(angle) * xx + math.sin(angle) * yy) + phase) > 0

    diag = math.pi / 4 * rng.choice([1, -1])
    if name.endswith(("_h", "_v", "_diag")):
        angle = {"h": math.pi / 2, "v": 0.0, "diag": diag}[name.rsplit("_", 1)[1]] + rng.normal(0, 0.08)
        on = stripes(angle, 5.0 if name.startswith("stripes") else 10.0)
    elif name == "checkers":
        on = ((np.floor(xx / period + ox) + np.floor(yy / period + oy)) % 2) > 0
    elif name == "dots":
        on = (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.09
    elif name == "grid":
        on = (u < 0.2) | (v < 0.2)
    elif name == "zigzag":
        on = ((v + 0.5 * np.abs(u - 0.5)) % 1.0) < 0.5
    elif name == "crosshatch":
        on = stripes(math.pi / 4, 5.0) ^ stripes(-math.pi / 4, 5.0)
    elif name == "rings":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        on = (np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / period + ox) % 1.0 < 0.5
    else:
        raise AssertionError(f"unknown texture {name}")
    grey = np.where(on, light, dark) * 255 + rng.normal(0, 6, on.shape)
    img = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")
    return img.resize((size, size), Image.BILINEAR)


# What each built-in set is: its classes, how one image is drawn, and its version (in the cache
# folder's name: a change to the drawing gets a new folder, never a stale cache).
BUILTIN_SETS = {"shapes": (CLASSES, render_shape, SHAPES_VERSION),
                "textures": (TEXTURE_CLASSES, render_texture, TEXTURES_VERSION)}


# ---------------------------------------------------------------------------------------------
# cache


def ensure_builtin_shapes(cache_dir: str | os.PathLike | None = None, seed: int = 0, n_train: int = 200,
                          n_val: int = 50, size: int = 64) -> Path:
    """`ensure_builtin` of ``builtin:shapes``."""
    return ensure_builtin("shapes", cache_dir, seed, n_train, n_val, size)


def ensure_builtin(name: str, cache_dir: str | os.PathLike | None = None, seed: int = 0, n_train: int = 200,
                   n_val: int = 50, size: int = 64) -> Path:
    """Write ``<cache>/builtin/<name>-.../{train,val}/<class>/*.jpg`` once and return the folder.

    ``n_train`` / ``n_val`` are images *per class* (12 classes). Generation goes to a temporary
    folder renamed into place, so concurrent callers (ranks) never see a half-written set; the loser
    of the race discards its copy.
    """
    if size < 16 or n_train < 1 or n_val < 0:
        raise ValueError(f"builtin:{name} needs size >= 16, n_train >= 1, n_val >= 0; got size={size}, n_train={n_train}, n_val={n_val}")
    classes, render, version = BUILTIN_SETS[name]
    base = default_cache_dir(cache_dir) / "builtin"
    final = base / f"{name}-v{version}-s{seed}-{size}px-{n_train}x{n_val}"
    if (final / "train").is_dir():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        for split, count, salt in (("train", n_train, 0), ("val", n_val, 1)):
            if count == 0:
                continue
            for ci, label in enumerate(classes):
                d = tmp / split / label
                d.mkdir(parents=True)
                for i in range(count):
                    rng = np.random.default_rng([seed, salt, ci, i])
                    render(label, rng, size).save(d / f"{label}_{i:05d}.jpg", quality=92)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "train").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


_OPTION_KEYS = {"seed": "seed", "size": "size", "per_class": "n_train", "n_train": "n_train",
                "val_per_class": "n_val", "n_val": "n_val"}


def resolve_data(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> DataSplits:
    """``builtin:shapes[?size=64&per_class=200&val_per_class=50&seed=0]`` (or ``builtin:textures?...``,
    the same options) or a folder.

    A folder with a ``train/`` subfolder gives train=that and val=``val/`` when present; any other
    folder (or a .tar shard) is train only. Index val with ``build_index(val, classes=train.classes)``
    so its labels are train's class names (as ``engine.setup.load_data`` does).
    """
    text = str(spec)
    if text.startswith("builtin:"):
        name, _, query = text[len("builtin:"):].partition("?")
        if name not in BUILTIN_SETS:
            raise ValueError(f"unknown built-in dataset {text!r}; the built-in sets are "
                             f"{', '.join('builtin:' + n for n in BUILTIN_SETS)}")
        kwargs: dict[str, int] = {}
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            if key not in _OPTION_KEYS:
                raise ValueError(f"unknown builtin:{name} option {key!r}; valid: {sorted(_OPTION_KEYS)}")
            try:
                kwargs[_OPTION_KEYS[key]] = int(value)
            except ValueError:
                raise ValueError(f"builtin:{name} option {key}={value!r} must be an integer") from None
        root = ensure_builtin(name, cache_dir, **kwargs)
        return DataSplits(root / "train", root / "val" if (root / "val").is_dir() else None)
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"data {text!r} is neither an existing folder nor a built-in set; pass a folder of images "
                         "(ImageFolder, flat, WebDataset .tar shards, optionally with train/ and val/), builtin:shapes "
                         "or builtin:textures")
    if (path / "train").is_dir():
        return DataSplits(path / "train", path / "val" if (path / "val").is_dir() else None)
    return DataSplits(path, None)
