"""Shared by the recipe tests: run a recipe as a user would, and check evaluation results."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    """This process's environment for a launched run: one OpenMP thread, unbuffered output, and none
    of the launcher variables a parent run (a test under torchrun) may have set."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in LAUNCHER_VARS:
        env.pop(key, None)
    return env


def run_recipe(cmd: list[str], timeout: int = 600, threads: int = 1) -> str:
    """Run ``cmd`` from the repository root in a clean single-process environment; its output.

    Fails the test with the output's tail when the command fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-8000:]}"
    return out


def assert_accuracies(result: dict, n_test: int) -> None:
    """``result`` (an eval.json entry) scored exactly ``n_test`` queries, and every accuracy in it
    is hits / n_test for a whole number of hits, with top-5 ≥ top-1."""
    assert result["n_test"] == n_test, (result["n_test"], n_test)
    for key in ("knn_top1", "knn_top5", "linear_top1", "linear_top5"):
        if result.get(key) is None:
            continue
        hits = result[key] * n_test / 100
        assert abs(hits - round(hits)) < 1e-3 and 0 <= round(hits) <= n_test, (key, result[key], n_test)
    for metric in ("knn", "linear"):
        if result.get(f"{metric}_top1") is not None:
            assert result[f"{metric}_top5"] >= result[f"{metric}_top1"], metric


def random_vit_encoder(out: Path) -> Path:
    """A randomly initialised ViT-Tiny/8 at 32 px (seed 0), exported into ``out`` like a finished stage-1 run."""
    import torch

    from genssl.engine.export import save_encoder
    from genssl.models.backbones import build_backbone

    torch.manual_seed(0)
    save_encoder(build_backbone("vit_tiny", img_size=32, patch_size=8), out, {"eval": {"size": 32}})
    return out
