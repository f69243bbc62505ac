"""train/ and val/ splits: val is labelled by class *name* with train's classes, end to end through k-NN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

from genssl.data import index as index_mod
from genssl.data.index import build_index
from genssl.engine.distributed import DistInfo
from genssl.engine.evaluate import evaluate_encoder
from genssl.engine.run_config import EvalConfig
from genssl.engine.setup import load_data

ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
COLOURS = {"apple": (220, 30, 30), "grass": (30, 200, 40), "sky": (40, 60, 230), "zebra": (128, 128, 128)}


def _split(root: Path, classes: list[str], per_class: int = 3) -> None:
    """An ImageFolder split: one solid colour per class, so the pixels alone say the class."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), COLOURS[name]).save(root / name / f"{i}.jpg", quality=95)


def test_val_missing_the_first_class_keeps_train_labels(tmp_path):
    _split(tmp_path / "ds" / "train", ["apple", "grass", "sky"])
    _split(tmp_path / "ds" / "val", ["grass", "sky"])  # no apple: its own folder positions would shift
    data = load_data(str(tmp_path / "ds"), str(tmp_path / "c"), ONE_PROCESS)
    assert data.train.classes == data.val.classes == ["apple", "grass", "sky"]
    assert list(data.val.labels) == [1, 1, 1, 2, 2, 2]
    assert all(data.val.classes[y] == p.split("/")[0] for y, p in zip(data.val.labels, data.val.source_paths))


def test_knn_scores_a_val_missing_a_class_correctly(tmp_path):
    _split(tmp_path / "ds" / "train", ["apple", "grass", "sky"])
    _split(tmp_path / "ds" / "val", ["grass", "sky"])
    data = load_data(str(tmp_path / "ds"), str(tmp_path / "c"), ONE_PROCESS)
    means = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # features = mean colour: one cluster per class
    cfg = EvalConfig(size=32, batch_size=8, knn_k=3, linear=False)
    result = evaluate_encoder(means, data.train, data.val, cfg, ONE_PROCESS, num_threads=1)
    # shifted labels (grass -> 0, sky -> 1) would score 0 %
    assert (result["knn_top1"], result["n_train"], result["n_test"]) == (100.0, 9, 6)


def test_val_class_unknown_to_train_is_an_error_naming_it(tmp_path):
    _split(tmp_path / "ds" / "train", ["apple", "grass"], per_class=1)
    _split(tmp_path / "ds" / "val", ["apple", "grass", "zebra"], per_class=1)
    with pytest.raises(ValueError, match=r"class folder\(s\) \['zebra'\] that the train split does not have"
                                         r".*apple, grass.*rename or remove"):
        load_data(str(tmp_path / "ds"), str(tmp_path / "c"), ONE_PROCESS)


def test_full_val_is_labelled_as_before_and_the_cache_is_shared(tmp_path, monkeypatch):
    """With every class present, name labels equal folder-position labels (nothing changes for
    complete splits); the validation cache does not depend on the class list."""
    _split(tmp_path / "train", ["apple", "grass", "sky"], per_class=1)
    _split(tmp_path / "val", ["apple", "grass", "sky"], per_class=1)
    _split(tmp_path / "partial", ["sky"], per_class=1)
    train = build_index(tmp_path / "train", tmp_path / "c")
    own = build_index(tmp_path / "val", tmp_path / "c")
    own_partial = build_index(tmp_path / "partial", tmp_path / "c")

    def no_decode(*_):
        raise AssertionError("a cached file was decoded again")

    monkeypatch.setattr(index_mod, "_inspect_strict", no_decode)
    named = build_index(tmp_path / "val", tmp_path / "c", classes=train.classes)
    assert (list(named.labels), named.classes, named.fingerprint) == (list(own.labels), own.classes, own.fingerprint)
    partial = build_index(tmp_path / "partial", tmp_path / "c", classes=train.classes)
    assert (list(own_partial.labels), list(partial.labels)) == ([0], [2])
    assert partial.fingerprint != own_partial.fingerprint  # the fingerprint covers the labels
    assert partial.paths == own_partial.paths
