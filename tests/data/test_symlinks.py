"""Symbolic links in a dataset: followed inside the data root, quarantined with a reason when they leave
it (unless allowed), link loops and unlistable folders reported instead of walked forever or skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from genssl.data import index as index_mod
from genssl.data.index import build_index

from .conftest import encode, rgb_array


def _jpg(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(Image.fromarray(rgb_array(seed)), "JPEG", quality=90))
    return path


@pytest.fixture
def layout(tmp_path):
    """``data/{a,b}/`` ImageFolder with one real image per class, and ``outside/`` beside it."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    _jpg(data / "a" / "a0.jpg", 0)
    _jpg(data / "b" / "b0.jpg", 1)
    _jpg(outside / "secret.jpg", 2)
    _jpg(outside / "cls" / "o0.jpg", 3)
    return data, outside


def test_links_out_of_the_root_are_quarantined_with_their_target(layout, tmp_path, monkeypatch):
    monkeypatch.delenv(index_mod.EXTERNAL_LINKS_ENV, raising=False)
    data, outside = layout
    (data / "a" / "file_link.jpg").symlink_to(outside / "secret.jpg")  # a file link
    (data / "b" / "dir_link").symlink_to(outside / "cls")  # a folder link inside a class
    (data / "c").symlink_to(outside / "cls")  # a class folder that is a link
    ix = build_index(data, cache_dir=tmp_path / "cache")
    reasons = dict(ix.quarantine)
    assert set(reasons) == {"a/file_link.jpg", "b/dir_link", "c"}
    for rel, target in (("a/file_link.jpg", outside / "secret.jpg"), ("b/dir_link", outside / "cls"), ("c", outside / "cls")):
        assert f"symbolic link to {target.resolve()}" in reasons[rel] and "outside the data root" in reasons[rel]
        assert f"{index_mod.EXTERNAL_LINKS_ENV}=1" in reasons[rel]  # names the fix
    assert ix.source_paths == ["a/a0.jpg", "b/b0.jpg"] and ix.classes == ["a", "b"]
    assert not any("outside" in p for p in ix.paths)
    report = ix.report.read_text()
    assert "file_link.jpg" in report and "dir_link" in report


def test_links_inside_the_root_are_followed(layout, tmp_path):
    data, _ = layout
    (data / "b" / "again.jpg").symlink_to(data / "a" / "a0.jpg")  # absolute link, inside
    (data / "b" / "rel.jpg").symlink_to(Path("..") / "a" / "a0.jpg")  # relative link, inside
    (data / "b" / "sub").symlink_to(data / "a")  # folder link, inside
    ix = build_index(data, cache_dir=tmp_path / "cache", external_links=False)
    assert ix.quarantine == []
    assert ix.source_paths == ["a/a0.jpg", "b/again.jpg", "b/b0.jpg", "b/rel.jpg", "b/sub/a0.jpg"]


def test_a_linked_root_is_the_root(layout, tmp_path):
    """data= may itself be a link (a dataset on another disk); only links inside it are judged."""
    data, _ = layout
    alias = tmp_path / "alias"
    alias.symlink_to(data)
    ix = build_index(alias, cache_dir=tmp_path / "cache", external_links=False)
    assert ix.quarantine == [] and ix.source_paths == ["a/a0.jpg", "b/b0.jpg"]


def test_the_option_follows_external_links(layout, tmp_path, monkeypatch):
    data, outside = layout
    (data / "a" / "file_link.jpg").symlink_to(outside / "secret.jpg")
    (data / "c").symlink_to(outside / "cls")
    expected = ["a/a0.jpg", "a/file_link.jpg", "b/b0.jpg", "c/o0.jpg"]
    ix = build_index(data, cache_dir=tmp_path / "cache", external_links=True)
    assert ix.quarantine == [] and ix.source_paths == expected and ix.classes == ["a", "b", "c"]
    monkeypatch.setenv(index_mod.EXTERNAL_LINKS_ENV, "1")  # the environment default reaches every recipe
    assert build_index(data, cache_dir=tmp_path / "cache").source_paths == expected
    monkeypatch.setenv(index_mod.EXTERNAL_LINKS_ENV, "0")
    assert build_index(data, cache_dir=tmp_path / "cache").source_paths == ["a/a0.jpg", "b/b0.jpg"]


def test_data_root_lets_a_split_link_into_its_sibling(tmp_path):
    """val/ images linked from train/: inside the dataset folder, outside val/ itself."""
    _jpg(tmp_path / "ds" / "train" / "a" / "t0.jpg", 0)
    _jpg(tmp_path / "ds" / "val" / "a" / "v0.jpg", 1)
    (tmp_path / "ds" / "val" / "a" / "from_train.jpg").symlink_to(tmp_path / "ds" / "train" / "a" / "t0.jpg")
    alone = build_index(tmp_path / "ds" / "val", cache_dir=tmp_path / "cache", external_links=False)
    assert [rel for rel, _ in alone.quarantine] == ["a/from_train.jpg"]
    within = build_index(tmp_path / "ds" / "val", cache_dir=tmp_path / "cache", external_links=False,
                         data_root=tmp_path / "ds")
    assert within.quarantine == [] and within.source_paths == ["a/from_train.jpg", "a/v0.jpg"]
    with pytest.raises(ValueError, match="does not contain the dataset folder"):
        build_index(tmp_path / "ds" / "val", cache_dir=tmp_path / "cache", data_root=tmp_path / "ds" / "train")


def test_flat_folder_and_webdataset_shard_links(tmp_path):
    flat, outside = tmp_path / "flat", tmp_path / "outside"
    _jpg(flat / "x.jpg", 0)
    _jpg(outside / "y.jpg", 1)
    (flat / "y.jpg").symlink_to(outside / "y.jpg")
    ix = build_index(flat, cache_dir=tmp_path / "cache", external_links=False)
    assert ix.source_paths == ["x.jpg"] and [rel for rel, _ in ix.quarantine] == ["y.jpg"]  # reported once


def test_a_link_loop_is_reported_not_walked(tmp_path):
    _jpg(tmp_path / "data" / "a" / "a0.jpg", 0)
    (tmp_path / "data" / "a" / "back").symlink_to(tmp_path / "data")  # data/a/back/a/back/... forever
    ix = build_index(tmp_path / "data", cache_dir=tmp_path / "cache", external_links=True)
    assert ix.source_paths == ["a/a0.jpg"]
    assert [rel for rel, _ in ix.quarantine] == ["a/back"] and "loop" in ix.quarantine[0][1]


_UNREADABLE = """
import sys
from genssl.data.index import build_index
root, cache = sys.argv[1], sys.argv[2]
ix = build_index(root + "/data", cache_dir=cache)
print(ix.source_paths, ix.quarantine)
try:
    build_index(root + "/locked", cache_dir=cache)
except ValueError as e:
    print("ERROR", e)
"""


def test_unlistable_folders(tmp_path):
    """An unlistable class folder is quarantined (not silently dropped); an unlistable data= folder is
    a ValueError naming the fix. Root lists anything, so as root the check runs without the
    capabilities that bypass file permissions (setpriv)."""
    _jpg(tmp_path / "data" / "a" / "a0.jpg", 0)
    _jpg(tmp_path / "data" / "b" / "b0.jpg", 1)
    _jpg(tmp_path / "locked" / "z.jpg", 2)
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: no folder is unreadable here")
        drop = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", "--"]
    env = {k: v for k, v in os.environ.items() if k != index_mod.EXTERNAL_LINKS_ENV}
    os.chmod(tmp_path / "data" / "b", 0o000)
    os.chmod(tmp_path / "locked", 0o000)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", _UNREADABLE, str(tmp_path), str(tmp_path / "cache")],
                              capture_output=True, text=True, timeout=120, env=env)
    finally:
        os.chmod(tmp_path / "data" / "b", 0o755)
        os.chmod(tmp_path / "locked", 0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "['a/a0.jpg']" in proc.stdout and "('b', 'folder cannot be listed (Permission denied)" in proc.stdout
    assert "chmod -R a+rX" in proc.stdout
    assert f"ERROR dataset folder {tmp_path / 'locked'} cannot be listed (Permission denied)" in proc.stdout
