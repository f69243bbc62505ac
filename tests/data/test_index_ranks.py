"""Ranks building one index together through files (no flock): slices validated once, a clear timeout."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genssl.data import index as index_mod
from genssl.data.index import build_index, index_cache_dir
from genssl.data.index_columns import RankFailed, RunDir
from genssl.tests.dist_spawn import spawn

from .conftest import encode, rgb_array

DATA_ENV = "GENSSL_TEST_INDEX_RANKS"
N = 8


def _dataset(root: Path) -> Path:
    """train/{a,b} and val/{b} of small JPEGs, mtimes an hour back (size + mtime are trusted)."""
    for split, classes in (("train", "ab"), ("val", "b")):
        for i in range(N if split == "train" else 2):
            f = root / split / classes[i % len(classes)] / f"{i}.jpg"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(encode(Image.fromarray(rgb_array(i)), "JPEG", quality=90))
            then = f.stat().st_mtime_ns - 3600 * 10**9
            os.utime(f, ns=(then, then))
    return root


def _load_twice(rank: int, world: int) -> dict:
    """Scenario: every rank runs load_data twice (first build, then a rerun), counting its own file reads."""
    from genssl.engine.distributed import DistInfo
    from genssl.engine.setup import load_data

    base = Path(os.environ[DATA_ENV])
    reads: list[str] = []
    real = index_mod._read_bytes
    index_mod._read_bytes = lambda p: (reads.append(p), real(p))[1]
    me = DistInfo(rank, world, rank, torch.device("cpu"))
    first = load_data(str(base / "ds"), str(base / "cache"), me)
    first_reads = list(reads)
    second = load_data(str(base / "ds"), str(base / "cache"), me)
    return {"reads": first_reads, "rerun_reads": reads[len(first_reads):], "paths": list(first.train.paths),
            "labels": np.asarray(first.train.labels).tolist(), "fingerprint": first.train.fingerprint,
            "val_labels": np.asarray(first.val.labels).tolist(), "again": second.train.fingerprint}


SCENARIOS = {"load_twice": _load_twice}


@pytest.mark.slow
def test_two_ranks_validate_disjoint_slices_and_agree(tmp_path, monkeypatch):
    _dataset(tmp_path / "ds")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    results = spawn("genssl.tests.data.test_index_ranks", "load_twice", tmp_path, world=2)
    alone = build_index(tmp_path / "ds" / "train", tmp_path / "alone")
    for r in results:  # both ranks map the same index, equal to one built by a single process
        assert r["paths"] == list(alone.paths) and r["labels"] == alone.labels.tolist()
        assert r["fingerprint"] == r["again"] == alone.fingerprint and r["val_labels"] == [1, 1]
    first = [set(r["reads"]) for r in results]
    assert all(first) and not first[0] & first[1]  # each rank validated a slice, none a file twice
    assert len(first[0] | first[1]) == N + 2  # train and val, every file once
    assert [r["rerun_reads"] for r in results] == [[], []]  # the rerun reads nothing
    assert not list(index_cache_dir(tmp_path / "ds" / "train", tmp_path / "cache").glob(".lock"))


def test_a_rank_waiting_for_a_dead_rank_zero_stops_with_a_clear_error(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(encode(Image.fromarray(rgb_array(0)), "JPEG"))
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:  # rank 0 never started: no heartbeat, no todo list
        build_index(root, tmp_path / "cache", rank=1, world_size=2, run_id="run-without-rank-0", timeout_s=0.5)
    assert time.monotonic() - start < 10
    message = str(info.value)
    work = index_cache_dir(root, tmp_path / "cache")
    assert message.startswith("rank 1 waited 0.5 s for rank 0 to find the files of the dataset index of")
    assert str(work / "runs" / "run-without-rank-0") in message  # where it looked
    assert "shared folder" in message and "GENSSL_INDEX_TIMEOUT" in message  # what to do
    assert f"python -m genssl.data.index {root.resolve()}" in message
    with pytest.raises(ValueError, match="needs run_id="):
        build_index(root, tmp_path / "cache", rank=1, world_size=2)


def test_progress_keeps_a_rank_waiting_and_a_failure_stops_it_at_once(tmp_path):
    waiter = RunDir(tmp_path / "run", rank=1, world_size=2, timeout_s=0.6, what="DATA")
    worker = RunDir(tmp_path / "run", rank=0, world_size=2, timeout_s=0.6, what="DATA")
    with worker.heartbeat():  # 2 s of work, beyond the 0.6 s timeout, with a live heartbeat
        threading.Timer(2.0, worker.publish, args=("done.json", {"generation": "g"})).start()
        assert waiter.wait("done.json", [0], "merge") == {"generation": "g"}
    worker.fail("ValueError: no usable images")
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 0 failed while building the dataset index of DATA.*no usable images"):
        waiter.wait("never.json", [0], "merge")
    assert time.monotonic() - start < 0.5
