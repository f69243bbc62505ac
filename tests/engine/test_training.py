"""Distributed training through the real engine: DeepSpeed ZeRO 1/2/3 on 2 gloo ranks, the EMA
teacher under ZeRO-3, SIGKILL + resume, 2-node torchrun, and non-finite handling.

Every run uses tests/engine/dist_train.py (real DINO objective, synthetic data in fp32), so a
2-rank run with batch 2 must reproduce a 1-rank run with batch 4 step for step. Tolerance: 1e-5
absolute on teacher weights and per-step losses (fp32; only reduction order differs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genssl.tests.helpers import free_port, launch_env

pytestmark = pytest.mark.slow
SCRIPT = str(Path(__file__).with_name("dist_train.py"))
TOL = 1e-5


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            SCRIPT, *args]


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _teacher(run: Path) -> dict:
    return torch.load(run / "teacher.pt", weights_only=False)


def _assert_same_teacher(a: dict, b: dict) -> None:
    for key in a["teacher"]:
        torch.testing.assert_close(a["teacher"][key], b["teacher"][key], atol=TOL, rtol=0, msg=key)
    torch.testing.assert_close(a["center"], b["center"], atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, no ZeRO, batch 4: what every distributed run must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    _run([sys.executable, SCRIPT, f"out={out}", "batch_size=4", "zero_stage=0"])
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_zero_stage_matches_single_process(reference: Path, tmp_path: Path, stage: int) -> None:
    _run(_torchrun(2, f"out={tmp_path}", "batch_size=2", f"zero_stage={stage}"))
    _assert_same_teacher(_teacher(reference), _teacher(tmp_path))
    # Every rank holds the same teacher (ranks start from different RNG states in dist_train.py).
    _assert_same_teacher(_teacher(reference), torch.load(tmp_path / "teacher_rank1.pt", weights_only=False))
    ref, got = _losses(reference), _losses(tmp_path)
    assert ref.keys() == got.keys() and len(ref) == 24
    for step in ref:
        assert abs(ref[step] - got[step]) < TOL, (step, ref[step], got[step])


def test_lars_two_ranks_zero3_matches_single_process(tmp_path: Path) -> None:
    """LARS rewrites each parameter's full gradient between backward and step (engine/lars.py): under
    ZeRO-3 on 2 ranks (gathered, partitioned gradients) it must equal the 1-rank run without ZeRO."""
    keys = ["epochs=1", "optim.name=lars", "optim.lr=2.0", "optim.weight_decay=1e-3", "optim.weight_decay_end=1e-3"]
    single, double = tmp_path / "single", tmp_path / "double"
    _run([sys.executable, SCRIPT, f"out={single}", "batch_size=4", "zero_stage=0", *keys])
    _run(_torchrun(2, f"out={double}", "batch_size=2", "zero_stage=3", *keys))
    ref, got = _losses(single), _losses(double)
    assert ref.keys() == got.keys() and len(ref) == 12
    for step in ref:
        assert abs(ref[step] - got[step]) < TOL, (step, ref[step], got[step])
    _assert_same_teacher(_teacher(single), _teacher(double))


def test_two_ranks_batchnorm_backbone_matches_single_process(tmp_path: Path) -> None:
    """BatchNorm is synchronised across ranks (SyncBatchNorm, as DINO): with per-rank statistics a
    2-rank ResNet would normalise each half batch on its own and its losses would drift from the
    1-rank run with the same global batch."""
    keys = ["model=resnet18", "epochs=1", "n_samples=24"]
    single, double = tmp_path / "single", tmp_path / "double"
    _run([sys.executable, SCRIPT, f"out={single}", "batch_size=4", *keys])
    _run(_torchrun(2, f"out={double}", "batch_size=2", "zero_stage=2", *keys))
    ref, got = _losses(single), _losses(double)
    assert ref.keys() == got.keys() and len(ref) == 6
    for step in ref:
        assert abs(ref[step] - got[step]) < 1e-4, (step, ref[step], got[step])
    a, b = _teacher(single), _teacher(double)
    for key in a["teacher"]:  # running statistics included: every rank's teacher sees the global batch
        torch.testing.assert_close(a["teacher"][key], b["teacher"][key], atol=1e-4, rtol=0, msg=key)


def test_teacher_targets_are_deterministic_with_drop_path(tmp_path: Path) -> None:
    """The student trains with stochastic depth; the teacher is a deterministic function of its
    weights and input (DINO builds its teacher without drop path), on every rank."""
    _run(_torchrun(2, f"out={tmp_path}", "batch_size=2", "zero_stage=3", "epochs=1", "dino.drop_path_rate=0.5"))
    rank0 = _teacher(tmp_path)
    rank1 = torch.load(tmp_path / "teacher_rank1.pt", weights_only=False)
    first, second = rank0["targets"]
    assert torch.equal(first, second), "teacher targets changed between two calls on the same input"
    assert torch.equal(first, rank1["targets"][0]), "teacher targets differ by rank"
    _assert_same_teacher(rank0, rank1)


def test_skipped_step_leaves_the_centre_unchanged(tmp_path: Path) -> None:
    """A step skipped for a non-finite loss must leave no trace: the DINO centre moves only on kept steps."""
    _run([sys.executable, SCRIPT, f"out={tmp_path}", "epochs=1", "n_samples=4", "batch_size=4", "nan_at_step=0"])
    state = _teacher(tmp_path)
    assert state["skipped"] == 1
    assert torch.count_nonzero(state["center"]) == 0, "the skipped step's teacher outputs reached the centre"


def test_sigkill_then_resume_gives_the_same_losses(reference: Path, tmp_path: Path) -> None:
    cmd = _torchrun(2, f"out={tmp_path}", "batch_size=2", "zero_stage=3", "ckpt.every_steps=4", "step_sleep=0.4")
    proc = subprocess.Popen(cmd, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step00000008"):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(tmp_path))
    assert killed_at < 24, "the run finished before the kill; the test did not test resume"

    resumed = _run(cmd)
    assert "resumed from" in resumed.stdout + resumed.stderr
    ref, got = _losses(reference), _losses(tmp_path)
    assert sorted(got) == list(range(1, 25)), "metrics.jsonl must hold each step once after resume"
    for step in ref:
        assert abs(ref[step] - got[step]) < TOL, (step, ref[step], got[step])
    _assert_same_teacher(_teacher(reference), _teacher(tmp_path))
    tags = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*"))
    assert len(tags) <= 2 and tags[-1] == "step00000024"  # keep_last=2


_EXTENDED = pytest.mark.skipif(not os.environ.get("GENSSL_EXTENDED"), reason=(
    "ZeRO-1/2 variants of the resize test (DeepSpeed's stage-1/2 universal path; both passed when added): about 3 more "
    "minutes, so run with GENSSL_EXTENDED=1; the default suite keeps ZeRO-3 both ways and ZeRO-0"))


@pytest.mark.parametrize("stage, before, after", [(3, 2, 1), (3, 1, 2), (0, 2, 1), pytest.param(1, 2, 1, marks=_EXTENDED),
                                                  pytest.param(2, 1, 2, marks=_EXTENDED)])
def test_resume_at_another_world_size(reference: Path, tmp_path: Path, stage: int, before: int, after: int) -> None:
    """A checkpoint of ``before`` ranks resumes on ``after`` ranks at the same global batch (4). ZeRO-3
    goes through DeepSpeed's universal form (the optimizer state re-partitioned); ZeRO-0 fp32 loads as
    it is. Losses and teacher equal the uninterrupted single process: the same data position, no
    sample of the epoch lost or seen twice, the optimizer state intact."""
    def command(world: int) -> list[str]:
        keys = [f"out={tmp_path}", f"zero_stage={stage}", f"batch_size={4 // world}", "ckpt.every_steps=4"]
        return _torchrun(world, *keys) if world > 1 else [sys.executable, SCRIPT, *keys]

    crashed = subprocess.run(command(before), env={**launch_env(), "GENSSL_TEST_EXIT_AT_STEP": "10"},
                             capture_output=True, text=True, timeout=300)
    assert crashed.returncode != 0 and (tmp_path / "checkpoints" / "step00000008" / "COMPLETE").is_file(), crashed.stderr[-3000:]
    resumed = _run(command(after))
    printed = resumed.stdout + resumed.stderr
    assert f"written by {before} ranks, resumed on {after}" in printed
    assert ("to DeepSpeed's universal checkpoint" in printed) == (stage > 0)
    ref, got = _losses(reference), _losses(tmp_path)
    assert sorted(got) == list(range(1, 25)), "metrics.jsonl must hold each step once after resume"
    for step in ref:
        assert abs(ref[step] - got[step]) < TOL, (step, ref[step], got[step])
    _assert_same_teacher(_teacher(reference), _teacher(tmp_path))
    if after > 1:
        _assert_same_teacher(_teacher(reference), torch.load(tmp_path / "teacher_rank1.pt", weights_only=False))


def test_resume_at_another_world_size_needs_the_same_global_batch(reference: Path, tmp_path: Path) -> None:
    keys = [f"out={tmp_path}", "zero_stage=2", "ckpt.every_steps=4"]
    subprocess.run(_torchrun(2, *keys, "batch_size=2"), env={**launch_env(), "GENSSL_TEST_EXIT_AT_STEP": "5"},
                   capture_output=True, timeout=300)
    refused = subprocess.run([sys.executable, SCRIPT, *keys, "batch_size=2"], env=launch_env(), capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode != 0
    assert "global batch of 4 (2 per rank x 2 ranks)" in refused.stderr and "resume with batch_size=4" in refused.stderr


def test_two_nodes_one_process_each_with_torchrun(reference: Path, tmp_path: Path) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", SCRIPT,
                               f"out={tmp_path}", "batch_size=2", "zero_stage=2"],
                              env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-4000:]
    _assert_same_teacher(_teacher(reference), _teacher(tmp_path))


def test_nonfinite_loss_is_skipped_on_every_rank(tmp_path: Path) -> None:
    _run(_torchrun(2, f"out={tmp_path}", "batch_size=2", "zero_stage=2", "epochs=1", "nan_at_step=3"))
    state = _teacher(tmp_path)
    assert state["skipped"] == 1
    assert all(torch.isfinite(v).all() for v in state["teacher"].values())


@pytest.mark.gpu
def test_fp16_overflow_is_owned_by_the_loss_scaler(tmp_path: Path) -> None:
    """fp16: an overflow must reach DeepSpeed's dynamic loss scaler, which halves the scale and
    skips that step; training goes on. (The engine's own non-finite check sees loss-scaled
    gradients and must stay out of the way, else the scale never drops.) CUDA only: DeepSpeed's
    CPU accelerator has no fp16."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"fp16": {"hysteresis": 1, "initial_scale_power": 16}}))  # halve on the first overflow
    _run([sys.executable, SCRIPT, f"out={tmp_path}", "epochs=1", "precision=fp16", "nan_at_step=3",
          "--deepspeed_config", str(ds)])
    state = _teacher(tmp_path)
    assert state["skipped"] >= 1
    assert state["loss_scale"] <= 2.0**15, f"the loss scale never dropped: {state['loss_scale']}"
    assert all(torch.isfinite(v).all() for v in state["teacher"].values() if v.is_floating_point())
    assert max(_losses(tmp_path)) == 12, "training must go on to the last step"


def test_nonfinite_loss_stops_with_a_clear_message(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, SCRIPT, f"out={tmp_path}", "epochs=1", "nan_at_step=2", "on_nonfinite=stop"],
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "non-finite loss at step 2" in proc.stderr and "on_nonfinite=stop" in proc.stderr
