"""Fixtures for the data tests: a tiny built-in shapes set and a corpus of awkward files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genssl.data.builtin import resolve_data
from genssl.data.index import DatasetIndex, build_index


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_array(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    """A smooth random image (JPEG-friendly, so round trips stay close)."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


GOOD = {  # name -> (bytes maker, expected status)
    "plain.jpg": (lambda a: encode(Image.fromarray(a), "JPEG", quality=90), "ok"),
    "plain.png": (lambda a: encode(Image.fromarray(a), "PNG"), "ok"),
    "gray.jpg": (lambda a: encode(Image.fromarray(a).convert("L"), "JPEG"), "ok"),
    "gray.png": (lambda a: encode(Image.fromarray(a).convert("L"), "PNG"), "converted"),
    "alpha.png": (lambda a: encode(Image.fromarray(a).convert("RGBA"), "PNG"), "converted"),
    "la.png": (lambda a: encode(Image.fromarray(a).convert("LA"), "PNG"), "converted"),
    "cmyk.jpg": (lambda a: encode(Image.fromarray(a).convert("CMYK"), "JPEG", quality=95), "converted"),
    "palette.png": (lambda a: encode(Image.fromarray(a).convert("P"), "PNG"), "converted"),
    "deep16.png": (lambda a: encode(Image.fromarray(a[..., 0].astype(np.uint16) * 257), "PNG"), "converted"),
    "bitmap.bmp": (lambda a: encode(Image.fromarray(a), "BMP"), "converted"),
}


def _bad_files(a: np.ndarray) -> dict[str, bytes]:
    jpg = encode(Image.fromarray(a), "JPEG", quality=90)
    return {
        "empty.jpg": b"",
        "truncated.jpg": jpg[: len(jpg) // 2],
        "no_eoi.jpg": jpg[:-2],
        "text.jpg": b"this is not an image\n" * 20,
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3,
    }


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """ImageFolder (classes a, b) holding every odd-but-valid kind and every broken kind.
    Returns the root and the expected status per relative path (ok | converted | bad)."""
    root = tmp_path / "corpus"
    expect = {}
    for i, (name, (make, status)) in enumerate(GOOD.items()):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(make(rgb_array(i)))
        expect[f"{d.name}/{name}"] = status
    for name, data in _bad_files(rgb_array(99)).items():
        (root / "b" / name).write_bytes(data)
        expect[f"b/{name}"] = "bad"
    (root / "b" / "notes.txt").write_text("ignored: not an image extension")
    return root, expect


@pytest.fixture()
def within_normalised_range():
    """``within_normalised_range(x [B, 3, h, w], mean, std) -> bool``: every value lies in what
    ``(pixel / 255 - mean) / std`` can give for 8-bit pixels, per channel: a bound derived
    from the normalisation rather than a loose ``-3 < x < 3``."""
    import torch

    def check(x, mean, std, slack: float = 1e-4) -> bool:
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        return bool(((x >= -m / s - slack) & (x <= (1 - m) / s + slack)).all())

    return check


@pytest.fixture()
def make_image():
    """``make_image(seed, fmt='JPEG', h=40, w=48) -> bytes``."""
    return lambda seed, fmt="JPEG", h=40, w=48: encode(Image.fromarray(rgb_array(seed, h, w)), fmt)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("genssl-cache")


@pytest.fixture(scope="session")
def shapes(cache: Path) -> tuple[DatasetIndex, DatasetIndex]:
    """Tiny built-in set: 12 classes x 4 train / x 2 val, 32 px."""
    splits = resolve_data("builtin:shapes?size=32&per_class=4&val_per_class=2", cache_dir=cache)
    assert splits.val is not None
    train = build_index(splits.train, cache_dir=cache)
    return train, build_index(splits.val, cache_dir=cache, classes=train.classes)
