"""Checkpoints load without running pickle: RNG states round-trip as tensors, DeepSpeed's files load
with ``weights_only=True`` and the allow-list (ZeRO 0, 1, 3; bf16 ZeRO 0, 1), and a planted pickle is refused
before it runs, also before DeepSpeed's universal-checkpoint converter (which unpickles in full) sees it (engine/checkpoint.py, docs/ENGINE.md *What is pickled*).

The DeepSpeed part runs in a fresh process (``python tests/engine/test_checkpoint_safety.py DIR``), a
world of one on the CPU, so the test session's own process never initialises torch.distributed.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genssl.engine.checkpoint import rng_state, set_rng_state


def _draw() -> tuple:
    """Numbers from every RNG the checkpoint restores, including the cached second normal of python's
    ``random.gauss`` and numpy's legacy ``standard_normal``."""
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
            torch.rand(3).tolist())


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached gaussian in both
    torch.save({"rng": rng_state()}, tmp_path / "extra.pt")
    expected = _draw()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "extra.pt")) == []
    set_rng_state(torch.load(tmp_path / "extra.pt", weights_only=True)["rng"])  # no allow-list needed
    assert _draw() == expected


class _Planted:
    """A pickle that makes a folder when it is loaded: what a malicious checkpoint would do instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _worker(out: Path) -> None:
    """Save and load through CheckpointManager for ZeRO 0/1/3 (fp32) and ZeRO 0/1 (bf16), then plant
    pickles in a rank file and in DeepSpeed's model file and check both are refused unexecuted."""
    import deepspeed

    from genssl.engine.checkpoint import CheckpointManager
    from genssl.engine.distributed import setup_distributed

    dist = setup_distributed()
    client = {"global_step": 3, "objective": {"center": torch.arange(4.0)},
              "run_identity": {"a.b": [1, 2], "c": None, "d": "x", "e": (0.5, 1.0)}}
    for stage, bf16 in ((0, False), (1, False), (3, False), (0, True), (1, True)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                  "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                          config=config)
        dtype = torch.bfloat16 if bf16 else torch.float32
        engine.backward(engine(torch.randn(2, 6, dtype=dtype)).float().square().mean())
        engine.step()
        run = out / f"zero{stage}{'_bf16' if bf16 else ''}"
        ckpt = CheckpointManager(run, keep_last=2, dist=dist)
        tag = ckpt.save(engine, 3, client, {"rng": rng_state()})
        for f in sorted((run / "checkpoints" / tag).glob("*.pt")):  # what the allow-list must cover
            print("GLOBALS", f.name, torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        state, rank_state = ckpt.load(engine, tag)
        assert state["global_step"] == 3 and torch.equal(state["objective"]["center"], torch.arange(4.0))
        assert state["run_identity"] == client["run_identity"] and "rng" in rank_state
        print("LOADED", run.name, flush=True)

    run = out / "zero1_bf16"  # the last engine's own run
    folder = run / "checkpoints" / "step00000003"
    ckpt = CheckpointManager(run, keep_last=2, dist=dist)
    ckpt.to_universal("step00000003")  # what a resume at another world size does first
    assert (folder / "universal" / "COMPLETE").is_file() and any((folder / "universal" / "zero").iterdir())
    print("CONVERTED", run.name, flush=True)
    extra = folder / "rank00000_extra.pt"
    torch.save({"rng": _Planted(str(out / "ran_from_rank_file"))}, extra)
    try:
        ckpt.load(engine, "step00000003")
        raise AssertionError("a planted rank file was loaded")
    except ValueError as e:
        print("REFUSED", e, flush=True)
    model_file = next(folder.glob("*model_states.pt"))
    sd = torch.load(model_file, weights_only=False)  # the test's own file: read it to plant into it
    sd["planted"] = _Planted(str(out / "ran_from_deepspeed_file"))
    torch.save(sd, model_file)
    try:
        ckpt.load(engine, "step00000003")
        raise AssertionError("a planted DeepSpeed file was loaded")
    except ValueError as e:
        print("REFUSED", e, flush=True)
    shutil.rmtree(folder / "universal")
    try:  # DeepSpeed's converter unpickles in full: the check must come first
        ckpt.to_universal("step00000003")
        raise AssertionError("a planted DeepSpeed file was converted")
    except ValueError as e:
        print("REFUSED", e, flush=True)


@pytest.mark.slow
def test_deepspeed_checkpoints_load_weights_only_and_planted_pickles_are_refused(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-5000:]
    assert [line.split()[1] for line in out.splitlines() if line.startswith("LOADED")] == [
        "zero0", "zero1", "zero3", "zero0_bf16", "zero1_bf16"]
    # the planted objects never ran, and each refusal names the file, what it held and the fix
    assert not (tmp_path / "ran_from_rank_file").exists() and not (tmp_path / "ran_from_deepspeed_file").exists()
    assert "CONVERTED zero1_bf16" in out  # DeepSpeed's universal form of a bf16 ZeRO-1 checkpoint
    refused = [line for line in out.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 3
    assert "rank00000_extra.pt holds a pickled posix.mkdir" in refused[0]
    assert "step00000003 holds a pickled posix.mkdir" in refused[1]
    assert "model_states.pt holds a pickled posix.mkdir" in refused[2]
    assert all("new out=" in line and "ckpt.resume=false" in line for line in refused)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
