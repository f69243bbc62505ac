"""Exit status and output of the recipes (engine/cli.py): a user error is one line
``<recipe>: error: <message>`` on stderr and status 2 with no traceback, on one rank or under the
deepspeed launcher; an internal error keeps its traceback.

Each recipe runs in a fresh process, as a user runs it, and fails before any training: a bad config
key, a data path that does not exist, a val/ class folder that train/ lacks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from genssl.engine import cli
from genssl.tests.helpers import random_vit_encoder

ROOT = Path(__file__).resolve().parents[2]


def _env(cache: Path, **extra: str) -> dict:
    env = dict(os.environ, GENSSL_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GENSSL_TRACEBACK"):
        if key not in extra:
            env.pop(key, None)
    return env


def _run(cmd: list[str], cache: Path, timeout: int = 180, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(cache, **extra), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _assert_user_error(proc: subprocess.CompletedProcess, name: str, *expected: str) -> str:
    """Status 2, no traceback anywhere, exactly one ``name: error:`` line on stderr holding ``expected``."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"status {proc.returncode}:\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{name}: error")]
    assert len(lines) == 1, output[-4000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# the mechanism, on a script of its own


_SCRIPT = """
import json, os, sys
from genssl.engine.cli import run_main

def main():
    kind = sys.argv[-1]  # the deepspeed launcher puts --local_rank=N first
    if kind == "user" or (kind == "rank1_only" and os.environ.get("RANK") == "1"):
        raise ValueError("data=x does not exist; pass an existing folder")
    if kind == "rank1_only":  # rank 0 waits, as in a collective its peer never joins
        import time; time.sleep(120)
    if kind == "missing":
        raise FileNotFoundError("no view store at x; run the generation job first")
    if kind == "builtin":  # a ValueError from a builtin on the program's own data: a bug, not the user's
        return int("not a number")
    if kind == "library":  # a ValueError raised inside a library
        return json.loads("{")
    if kind == "runtime":
        raise RuntimeError("internal invariant broken")
    return 0

run_main(main)
"""


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "tool.py"
    path.write_text(_SCRIPT)
    return path


def test_a_user_error_is_one_line_and_status_2(script, tmp_path):
    proc = _run([sys.executable, str(script), "user"], tmp_path)
    _assert_user_error(proc, "tool", "tool: error: data=x does not exist; pass an existing folder")
    assert proc.stdout == ""
    _assert_user_error(_run([sys.executable, str(script), "missing"], tmp_path), "tool", "no view store at x")


@pytest.mark.parametrize("kind, error", [("builtin", "ValueError: invalid literal for int()"),
                                         ("library", "JSONDecodeError"),
                                         ("runtime", "RuntimeError: internal invariant broken")])
def test_an_internal_error_keeps_its_traceback(script, tmp_path, kind, error):
    proc = _run([sys.executable, str(script), kind], tmp_path)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr and error in proc.stderr
    assert "tool: error" not in proc.stderr


def test_genssl_traceback_shows_a_user_errors_traceback(script, tmp_path):
    proc = _run([sys.executable, str(script), "user"], tmp_path, GENSSL_TRACEBACK="1")
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("tool: error: data=x does not exist; pass an existing folder")


@dataclasses.dataclass
class _Cfg:
    epochs: int = 1


def test_only_genssl_raise_statements_are_user_errors():
    from genssl.data.builtin import resolve_data
    from genssl.engine.config import ConfigError, parse_config

    with pytest.raises(ValueError) as data_error:
        resolve_data("/no/such/folder")
    assert cli.is_user_error(data_error.value)
    with pytest.raises(ConfigError) as config_error:
        parse_config(["nope=1"], _Cfg)
    assert cli.is_user_error(config_error.value)
    with pytest.raises(ValueError) as library_error:
        json.loads("{")
    assert not cli.is_user_error(library_error.value)
    assert not cli.is_user_error(RuntimeError("x")) and not cli.is_user_error(ValueError("never raised"))


def _deepspeed(nproc: int, *args: str) -> list[str]:
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [deepspeed, "--num_gpus", str(nproc), "--master_port", str(port), *args]


@pytest.mark.slow
def test_two_ranks_print_one_line_and_the_launcher_fails(script, tmp_path):
    proc = _run(_deepspeed(2, str(script), "user"), tmp_path, timeout=120)
    line = _assert_user_error(proc, "tool", "data=x does not exist")
    assert "(rank" not in line  # rank 0's line; rank 1 was stopped by the launcher before it printed


@pytest.mark.slow
def test_an_error_of_another_rank_alone_is_printed_with_its_rank(script, tmp_path):
    proc = _run(_deepspeed(2, str(script), "rank1_only"), tmp_path, timeout=120)
    _assert_user_error(proc, "tool", "tool: error (rank 1): data=x does not exist")


# ---------------------------------------------------------------------------------------------
# the recipes


def _jpg(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path, quality=90)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("genssl-cache")


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory) -> Path:
    """train/{a,b}, val/{a,zebra}: val has a class train lacks."""
    root = tmp_path_factory.mktemp("mismatched")
    for split, classes in (("train", ("a", "b")), ("val", ("a", "zebra"))):
        for i, name in enumerate(classes):
            for k in range(2):
                _jpg(root / split / name / f"{k}.jpg", (40 * i + 20 * k, 100, 200))
    return root


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return random_vit_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def eldm(tmp_path_factory) -> Path:
    """An untrained tiny E-LDM run folder: eldm/ (weights + generator.json) and its autoencoder."""
    import torch

    from genssl.generators.autoencoder import autoencoder_hash, build_autoencoder, tiny_autoencoder_config
    from genssl.generators.eldm import ELDM, save_eldm, tiny_eldm_config
    from genssl.recipes.eldm import ELDM_DIR, GENERATOR_FILE

    run = tmp_path_factory.mktemp("eldm_run")
    torch.manual_seed(0)
    ae = build_autoencoder(tiny_autoencoder_config())
    ae.save_pretrained(run / "autoencoder")
    folder = save_eldm(ELDM(tiny_eldm_config()), run / ELDM_DIR)
    generator = {"autoencoder": {"path": str(run / "autoencoder"), "hash": autoencoder_hash(ae)},
                 "data": "builtin:shapes?per_class=2&val_per_class=1&size=32"}
    (folder / GENERATOR_FILE).write_text(json.dumps(generator))
    return run


RECIPES = ["dino", "dino_gensis", "eval_knn", "eval_linear", "generate_views", "autoencoder", "eldm"]


def _recipe(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / f"{name}.py"), *args]


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_a_bad_config_key(name, cache, tmp_path):
    proc = _run(_recipe(name, "bogus_key=1", f"out={tmp_path / 'out'}"), cache)
    _assert_user_error(proc, name, f"{name}: error: unknown key 'bogus_key'", "Valid keys:")


def _data_args(name: str, data: str, tmp_path: Path, encoder: Path, eldm: Path) -> list[str]:
    extra = {"eval_knn": [f"encoder={encoder}"], "generate_views": [f"eldm={eldm}"]}.get(name, [])
    return [f"data={data}", f"out={tmp_path / 'out'}", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dino", "dino_gensis", "eval_knn", "generate_views"])
def test_an_unknown_data_path(name, cache, tmp_path, encoder, eldm):
    missing = tmp_path / "no_such_folder"
    proc = _run(_recipe(name, *_data_args(name, str(missing), tmp_path, encoder, eldm)), cache)
    _assert_user_error(proc, name, f"data '{missing}' is neither an existing folder", "pass a folder of images")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dino", "dino_gensis", "eval_knn", "generate_views"])
def test_a_val_class_unknown_to_train(name, cache, tmp_path, encoder, eldm, mismatched):
    proc = _run(_recipe(name, *_data_args(name, str(mismatched), tmp_path, encoder, eldm)), cache)
    _assert_user_error(proc, name, "class folder(s) ['zebra'] that the train split does not have",
                       "rename or remove ['zebra']")
