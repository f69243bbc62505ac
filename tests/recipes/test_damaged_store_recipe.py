"""The reliability battery's damaged view store, end to end on the tiny Gen-SIS pipeline: a finished run's
``views.zarr`` loses one chunk to bit flips and another to deletion. Training Gen-DINO on it completes
(real crops stand in for the damaged views) and the report names both sources; rerunning the pipeline
verifies the store, regenerates exactly those sources, and the store is byte for byte the undamaged one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from genssl.data.viewstore import open_view_store
from genssl.tests.helpers import assert_accuracies, run_recipe
from genssl.tests.recipes.test_gensis_recipe import TINY

pytestmark = pytest.mark.slow
FLIPPED, DELETED = 50, 61  # sources (72 train images)


def _drop_source(st, name: str, i: int) -> None:
    """Delete source i's inner chunk from its shard file: its index entry says "no data" (valid crc32c)."""
    from genssl.data.viewstore import _crc

    shard, _, _ = st.chunk_location(name, i)
    data = bytearray(shard.read_bytes())
    start = len(data) - (16 * (st.shard_size // st.sources_per_chunk) + 4)
    entry = start + 16 * st._inner(i)
    data[entry:entry + 16] = b"\xff" * 16
    data[-4:] = _crc(bytes(data[start:-4]))
    shard.write_bytes(bytes(data))


def _files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_damaged_store_trains_through_then_a_rerun_repairs_it(tmp_path: Path) -> None:
    # p_gen = 1: every sample reads its synthetic view, so the damaged one is met for sure
    cmd = [sys.executable, "recipes/dino_gensis.py", *TINY, "gendino.p_gen=1.0"]
    first = tmp_path / "run"
    run_recipe([*cmd, f"out={first}"], timeout=600)
    store = first / "views.zarr"
    undamaged = _files(store)

    st = open_view_store(store)
    shard, off, length = st.chunk_location("views", FLIPPED)  # the source's inner chunk in its shard file
    data = bytearray(shard.read_bytes())
    data[off + length // 2] ^= 0xFF
    data[off + length // 2 + 1] ^= 0xFF
    shard.write_bytes(bytes(data))
    _drop_source(st, "interp", DELETED)

    # Gen-DINO on the damaged store (supplied as views=, so no stage repairs it first) runs to the end.
    second = tmp_path / "on_damaged"
    log = run_recipe([*cmd, f"encoder={first / 'dino'}", f"views={store}", f"out={second}"], timeout=600)
    assert_accuracies(json.loads((second / "eval.json").read_text())["gen_dino"], n_test=12 * 2)
    warned = [line for line in log.splitlines() if "its samples use real crops instead" in line]
    assert len(warned) == 2, warned  # once per source, though both are read every step they are drawn
    assert any(f"source {FLIPPED} " in w and "checksum" in w for w in warned)
    assert any(f"source {DELETED} " in w and "missing" in w for w in warned)
    report = json.loads(Path(str(store) + ".damage.json").read_text())
    assert sorted(r["source"] for r in report["sources"]) == [FLIPPED, DELETED]

    # The pipeline's rerun: every trained stage is skipped, the generation stage verifies and regenerates.
    again = run_recipe([*cmd, f"out={first}"], timeout=600)
    assert again.count("finished earlier with these settings; skipped") == 3  # dino, eldm, gen_dino
    assert "2 damaged chunk(s)" in again and f"source {FLIPPED}: views" in again and f"source {DELETED}: interp" in again
    assert "wrote 2 source(s)" in again
    assert not Path(str(store) + ".damage.json").exists()
    assert _files(store) == undamaged
