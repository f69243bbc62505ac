"""Resume picks the newest complete checkpoint, also when the run was killed between renaming it into
place and updating ``checkpoints/latest`` (found by bench/faults.py, point ``ckpt-rename``: the rerun
resumed from the previous checkpoint and lost a checkpoint interval of work)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genssl.engine import checkpoint
from genssl.engine.checkpoint import COMPLETE, CheckpointManager
from genssl.engine.distributed import DistInfo

DIST = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class _Engine:
    """Stands in for DeepSpeed's engine: CheckpointManager only asks it to write its files into a folder."""

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"client_state": client_state}, Path(save_dir) / tag / "model_states.pt")


class _Killed(Exception):
    pass


def test_a_checkpoint_renamed_into_place_before_latest_was_written_is_resumed(tmp_path: Path, monkeypatch) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2, dist=DIST)
    manager.save(_Engine(), 2, {"global_step": 2}, {})

    def killed(path, text):  # the process dies here: step 4 is in place, `latest` still names step 2
        raise _Killed

    monkeypatch.setattr(checkpoint, "write_text_atomic", killed)
    with pytest.raises(_Killed):
        manager.save(_Engine(), 4, {"global_step": 4}, {})
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000002"
    assert (tmp_path / "checkpoints" / "step00000004" / COMPLETE).is_file()
    assert CheckpointManager(tmp_path, keep_last=2, dist=DIST).latest() == "step00000004"


def test_incomplete_checkpoints_and_a_stale_marker_are_ignored(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2, dist=DIST)
    for step in (2, 4):
        manager.save(_Engine(), step, {"global_step": step}, {})
    (tmp_path / "checkpoints" / "step00000006").mkdir()  # no COMPLETE: never resumed from
    (tmp_path / "checkpoints" / "latest").write_text("step00000009")  # names nothing
    assert manager.latest() == "step00000004"
    (tmp_path / "checkpoints" / "latest").unlink()
    assert manager.latest() == "step00000004"
    assert CheckpointManager(tmp_path / "empty", keep_last=2, dist=DIST).latest() is None


def test_a_fresh_start_sets_the_old_runs_checkpoints_aside(tmp_path: Path) -> None:
    """ckpt.resume=false in a folder whose old run reached higher steps: before, pruning kept the old
    run's newest checkpoints and deleted the new run's as the oldest, and a rerun resumed the old run."""
    old = CheckpointManager(tmp_path, keep_last=2, dist=DIST)
    for step in (8, 10):
        old.save(_Engine(), step, {"global_step": step}, {})
    fresh = CheckpointManager(tmp_path, keep_last=2, dist=DIST)
    aside = fresh.set_aside()
    assert aside is not None and aside.parent == tmp_path and aside.name.startswith("checkpoints.replaced-")
    assert sorted(p.name for p in aside.glob("step*")) == ["step00000008", "step00000010"]
    for step in (2, 4, 6):
        fresh.save(_Engine(), step, {"global_step": step}, {})
    assert sorted(p.name for p in fresh.dir.glob("step*")) == ["step00000004", "step00000006"]
    assert fresh.latest() == "step00000006"
    assert CheckpointManager(tmp_path / "empty", keep_last=2, dist=DIST).set_aside() is None
