"""One definition of "the same run" (engine/config.py::run_identity) for checkpoint resume and for
finished pipeline stages: keys that cannot change results never make a run different, every other
key does, with a message that names it; the number of epochs cannot change on resume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from genssl.engine.config import ConfigError, parse_config, run_differences, run_identity
from genssl.engine.distributed import DistInfo
from genssl.engine.pipeline import finished, mark_finished
from genssl.recipes import dino_gensis
from genssl.recipes.dino_gensis import GenSISConfig

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
DIST_TRAIN = str(Path(__file__).with_name("dist_train.py"))


def gensis(*argv: str) -> GenSISConfig:
    return parse_config(["preset=smoke", *argv], GenSISConfig, dino_gensis.PRESETS).config


# Keys that cannot change results, at the top and nested inside the E-LDM / autoencoder / generation sections.
NOT_RESULTS = ("out=/elsewhere", "log.every_steps=3", "log.progress=false", "num_workers=1", "cache_dir=/tmp/c",
               "ckpt.every_steps=7", "ckpt.keep_last=5", "ckpt.resume=false", "generator.log.every_steps=1",
               "generator.out=/x", "generator.ae.num_workers=1", "generation.progress=false", "generation.num_workers=1")


def test_keys_that_cannot_change_results_leave_the_identity_alone() -> None:
    assert run_identity(gensis(*NOT_RESULTS)) == run_identity(gensis())
    for key in ("out", "log.every_steps", "num_workers", "ckpt.every_steps", "generator.log.progress", "generation.out"):
        assert key not in run_identity(gensis())
    for key in ("epochs", "seed", "data", "optim.lr", "crops.n_local", "generator.optim.lr", "generation.steps", "eval.knn_k"):
        assert key in run_identity(gensis()), key


@pytest.mark.parametrize("change", ["optim.lr=1e-3", "epochs=7", "seed=1", "crops.n_local=3", "generator.eldm.image_size=64",
                                    "generation.steps=3", "eval.knn_k=5"])
def test_every_other_key_makes_another_run_and_is_named(change) -> None:
    key, value = change.split("=")
    differences = run_differences(run_identity(gensis()), gensis(change))
    assert len(differences) == 1 and differences[0].startswith(f"{key}: ") and differences[0].endswith(" now")


def test_a_record_older_than_a_key_matches_while_the_key_keeps_its_default() -> None:
    """A run recorded before ``optim.lars_eta`` existed resumes under the new code while the key keeps
    its default (the behaviour the old code had); set to anything else it is another run."""
    stored = {k: v for k, v in run_identity(gensis()).items() if k != "optim.lars_eta"}
    assert run_differences(stored, gensis()) == []
    assert run_differences(stored, gensis("optim.lars_eta=0.01")) == ["optim.lars_eta: (no such key) there, 0.01 now"]


def test_evaluation_settings_do_not_count_for_a_checkpoint() -> None:
    stored = run_identity(gensis(), training_only=True)
    assert run_differences(stored, gensis("eval.knn_k=5", "eval.size=64", *NOT_RESULTS), training_only=True) == []
    assert run_differences(stored, gensis("optim.lr=1e-3"), training_only=True) == ["optim.lr: 0.01 there, 0.001 now"]


def test_a_finished_stage_is_skipped_from_a_moved_folder_with_other_logging(tmp_path: Path) -> None:
    stage = tmp_path / "run" / "dino"
    stage.mkdir(parents=True)
    mark_finished(stage, gensis(f"out={tmp_path / 'run'}"), {"knn_top1": 12.5}, CPU, started=0.0)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run", moved)
    again = gensis(f"out={moved}", "log.every_steps=1", "num_workers=1", "ckpt.every_steps=3")
    assert finished(moved / "dino", again, CPU)["result"] == {"knn_top1": 12.5}
    with pytest.raises(ConfigError) as err:
        finished(moved / "dino", gensis(f"out={moved}", "optim.lr=1e-3"), CPU)
    assert "optim.lr: 0.01 there, 0.001 now" in str(err.value) and "use a new out=" in str(err.value)


# --- checkpoint resume through the real engine (one process, 2 steps) -------------------------------------------

def _train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, DIST_TRAIN, "epochs=1", "n_samples=8", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_stage_finished_on_other_ranks_counts_at_the_same_global_batch(tmp_path: Path) -> None:
    stage = tmp_path / "dino"
    stage.mkdir()
    four_ranks = DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))
    mark_finished(stage, gensis("batch_size=8"), {"knn_top1": 12.5}, four_ranks, started=0.0)
    assert finished(stage, gensis("batch_size=32"), CPU)["result"] == {"knn_top1": 12.5}  # 4 x 8 = 1 x 32
    with pytest.raises(ConfigError) as err:
        finished(stage, gensis("batch_size=8"), CPU)
    assert "global batch of 32 (8 per rank x 4 ranks)" in str(err.value) and "batch_size=32" in str(err.value)


def test_resume_accepts_a_moved_run_and_refuses_other_epochs(tmp_path: Path) -> None:
    first = _train(f"out={tmp_path / 'run'}")
    assert first.returncode == 0, first.stderr[-3000:]
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run", moved)

    resumed = _train(f"out={moved}", "log.every_steps=2", "num_workers=1", "ckpt.keep_last=3", "eval.knn_k=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2/2" in resumed.stdout

    longer = _train(f"out={moved}", "epochs=2")
    assert longer.returncode != 0
    message = " ".join(longer.stderr.split())
    assert "epochs: 1 there, 2 now" in message and "schedules span all epochs" in message
    assert "choose a new out=" in message
    assert yaml.safe_load((moved / "config.yaml").read_text())["epochs"] == 1  # the run's own settings are kept

    fresh = _train(f"out={moved}", "epochs=2", "ckpt.resume=false")  # a new run here: the old one's checkpoints go aside
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "were moved to" in fresh.stdout and "resumed from" not in fresh.stdout
    assert [p.name for p in moved.glob("checkpoints.replaced-*/step*")] == ["step00000002"]


# --- the E-LDM stage of the pipeline honours --deepspeed_config --------------------------------------------------

@pytest.mark.slow
def test_eldm_stage_hands_the_deepspeed_config_to_its_training(tmp_path: Path) -> None:
    from genssl.engine.export import save_encoder
    from genssl.generators.autoencoder import AutoencoderConfig, build_autoencoder
    from genssl.models.backbones import build_backbone

    torch.manual_seed(0)
    encoder = tmp_path / "run" / "dino"
    encoder.mkdir(parents=True)
    save_encoder(build_backbone("vit_tiny", img_size=32, patch_size=8), encoder, {"eval": {"size": 32}})
    autoencoder = tmp_path / "vae"
    build_autoencoder(AutoencoderConfig(block_out_channels=(16, 32), norm_num_groups=8, sample_size=32)).save_pretrained(
        str(autoencoder), safe_serialization=True)
    cfg = gensis("data=builtin:shapes?per_class=2&val_per_class=1&size=32", f"out={tmp_path / 'run'}",
                 f"cache_dir={tmp_path / 'cache'}", f"generator.autoencoder={autoencoder}", "generator.batch_size=8",
                 "generator.eldm.sample_n=2", "generator.eldm.cache_batch_size=8", "num_workers=1")
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 4}')  # refused by the engine: it shows the file reached fit
    with pytest.raises(ConfigError, match="remove 'train_micro_batch_size_per_gpu'"):
        dino_gensis.stage_eldm(cfg, CPU, encoder, str(ds))
    assert (tmp_path / "run" / "eldm" / "run_inputs.json").is_file()  # it failed inside the E-LDM training
