"""builtin:shapes and builtin:textures generation and resolve_data."""

from __future__ import annotations

from pathlib import Path

import pytest

from genssl.data.builtin import CLASSES, TEXTURE_CLASSES, ensure_builtin, ensure_builtin_shapes, resolve_data


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_shapes_deterministic_by_seed(tmp_path):
    a = ensure_builtin_shapes(tmp_path / "a", seed=1, n_train=2, n_val=1, size=32)
    b = ensure_builtin_shapes(tmp_path / "b", seed=1, n_train=2, n_val=1, size=32)
    c = ensure_builtin_shapes(tmp_path / "a", seed=2, n_train=2, n_val=1, size=32)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb and len(fa) == len(CLASSES) * 3
    assert fa.keys() == fc.keys() and all(fa[k] != fc[k] for k in fa)
    assert sorted(p.name for p in (a / "train").iterdir()) == sorted(CLASSES) and len(set(CLASSES)) == 12


def test_shapes_written_once(tmp_path):
    root = ensure_builtin_shapes(tmp_path, seed=0, n_train=1, n_val=0, size=16)
    marker = next((root / "train").rglob("*.jpg"))
    stamp = marker.stat().st_mtime_ns
    assert ensure_builtin_shapes(tmp_path, seed=0, n_train=1, n_val=0, size=16) == root
    assert marker.stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "builtin").iterdir() if p.name.startswith(".tmp")]
    assert resolve_data("builtin:shapes?size=16&per_class=1&val_per_class=0&seed=0", tmp_path).val is None


def test_textures_are_their_own_deterministic_set(tmp_path):
    a = ensure_builtin("textures", tmp_path, seed=1, n_train=2, n_val=1, size=32)
    again = ensure_builtin("textures", tmp_path / "other", seed=1, n_train=2, n_val=1, size=32)
    assert _files(a) == _files(again) and len(_files(a)) == len(TEXTURE_CLASSES) * 3
    assert sorted(p.name for p in (a / "train").iterdir()) == sorted(TEXTURE_CLASSES) and len(set(TEXTURE_CLASSES)) == 12
    shapes = ensure_builtin("shapes", tmp_path, seed=1, n_train=2, n_val=1, size=32)
    assert shapes != a and a.name.startswith("textures-")
    splits = resolve_data("builtin:textures?size=32&per_class=2&val_per_class=1&seed=1", tmp_path)
    assert splits.train == a / "train" and splits.val == a / "val"


def test_resolve_data_folders(tmp_path):
    (tmp_path / "ds" / "train").mkdir(parents=True)
    assert resolve_data(tmp_path / "ds").train == tmp_path / "ds" / "train"
    assert resolve_data(tmp_path / "ds").val is None
    (tmp_path / "ds" / "val").mkdir()
    assert resolve_data(str(tmp_path / "ds")).val == tmp_path / "ds" / "val"
    assert resolve_data(tmp_path / "ds" / "val").train == tmp_path / "ds" / "val"


@pytest.mark.parametrize("spec, match", [
    ("builtin:cifar", "builtin:shapes, builtin:textures"),
    ("builtin:textures?per_class=x", "builtin:textures option per_class"),
    ("builtin:shapes?colour=3", "unknown builtin:shapes option"),
    ("builtin:shapes?size=big", "must be an integer"),
    ("/no/such/folder", "neither an existing folder"),
])
def test_resolve_data_errors(tmp_path, spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_data(spec, tmp_path)
