"""Multi-node launching (docs/MULTINODE.md): the SLURM scripts build the commands the page shows, and
a recipe under `torchrun` trains, checkpoints and evaluates, and resumes after one rank is killed.

The SLURM scripts run for real, with `scontrol`, `srun` and `deepspeed` replaced by scripts that record
their arguments (no SLURM here); what they record is compared with the page's command blocks, parsed
the way bash would expand them. The torchrun run is `recipes/dino.py` with tiny settings on 2 gloo
ranks: rank 1 is killed with SIGKILL (a node lost) once a checkpoint is complete, and the same command
run again resumes from that checkpoint and finishes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genssl.tests.helpers import free_port, launch_env

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "MULTINODE.md"
SCRIPTS = {name: ROOT / "scripts" / "slurm" / f"{name}.sbatch" for name in ("deepspeed", "torchrun")}
NODES = ["node1", "node2"]

# 48 train / 24 val built-in images, batch 4 per rank on 2 ranks: 6 steps, a checkpoint every 2.
TINY = ["preset=smoke", "epochs=1", "data=builtin:shapes?size=32&per_class=4&val_per_class=2", "batch_size=4",
        "ckpt.every_steps=2", "eval.linear_epochs=10", "num_workers=1", "log.progress=false", "log.every_steps=1"]
TOTAL_STEPS = 6


# ------------------------------------------------------------------------------------------------ SLURM scripts


def _documented_command(name: str, values: dict[str, str]) -> list[str]:
    """The command of docs/MULTINODE.md's block headed ``# scripts/slurm/<name>.sbatch runs``, its
    variables expanded with ``values`` and split into words as bash does for this simple syntax."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    header = f"# scripts/slurm/{name}.sbatch runs"
    found = [b for b in blocks if b.startswith(header)]
    assert len(found) == 1, f"docs/MULTINODE.md needs one bash block starting with {header!r}"
    lines = [line for line in found[0].splitlines() if not line.lstrip().startswith("#")]
    command = " ".join(line.rstrip("\\").strip() for line in lines)
    expanded = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: values[m.group(1) or m.group(2)], command)
    return shlex.split(expanded)


def _recorder(path: Path, log: Path, stdout: str = "") -> None:
    """An executable that appends its command line (one JSON list per call: its name, then its arguments)
    to ``log`` and prints ``stdout``."""
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n"
                    f"print({stdout!r}, end='')\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_sbatch(name: str, tmp_path: Path) -> tuple[dict[str, list], dict[str, str]]:
    """Run scripts/slurm/<name>.sbatch as SLURM would on the first of two nodes; each recorded
    program's calls, and the values the script was given."""
    bin_dir, venv, calls = tmp_path / "bin", tmp_path / "venv", tmp_path / "calls"
    for folder in (bin_dir, venv / "bin", calls):
        folder.mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    _recorder(bin_dir / "scontrol", calls / "scontrol", stdout="".join(f"{n}\n" for n in NODES))
    for program in ("srun", "deepspeed"):
        _recorder(bin_dir / program, calls / program)
    values = {"GENSSL_DIR": str(ROOT), "PYTHON_ENV": str(venv), "OUT": str(tmp_path / "out"),
              "CACHE": str(tmp_path / "cache"), "DATA": str(tmp_path / "data"), "RECIPE": "recipes/dino_gensis.py",
              "RECIPE_ARGS": "preset=imagenet zero_stage=2", "GPUS_PER_NODE": "8", "MASTER_PORT": "29500"}
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "TMPDIR": str(tmp_path)}
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **values, **slurm}
    proc = subprocess.run(["bash", str(SCRIPTS[name])], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recorded = {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in calls.iterdir()}
    assert recorded["scontrol"] == [["scontrol", "show", "hostnames", "node[1-2]"]]
    return recorded, {**values, **slurm, "HEAD": NODES[0]}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_sbatch_scripts_are_valid_bash(name: str) -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPTS[name])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_sbatch_gpus_per_node_agrees_with_its_sbatch_line(name: str) -> None:
    text = SCRIPTS[name].read_text()
    requested = re.search(r"^#SBATCH --gpus-per-node=(\d+)$", text, flags=re.M).group(1)
    default = re.search(r"^GPUS_PER_NODE=\$\{GPUS_PER_NODE:-(\d+)\}", text, flags=re.M).group(1)
    assert requested == default, f"{name}.sbatch asks SLURM for {requested} GPUs per node but starts {default} ranks"


def test_deepspeed_sbatch_runs_the_documented_command_on_a_hostfile_of_the_job(tmp_path: Path) -> None:
    from deepspeed.launcher.runner import fetch_hostfile

    recorded, values = _run_sbatch("deepspeed", tmp_path)
    hostfile = tmp_path / "genssl-4242.hostfile"
    assert list(fetch_hostfile(str(hostfile)).items()) == [(n, 8) for n in NODES]  # DeepSpeed's own parser
    assert recorded["deepspeed"] == [_documented_command("deepspeed", {**values, "HOSTFILE": str(hostfile)})]
    assert "srun" not in recorded


def test_torchrun_sbatch_runs_the_documented_command_once_per_node(tmp_path: Path) -> None:
    recorded, values = _run_sbatch("torchrun", tmp_path)
    assert recorded["srun"] == [_documented_command("torchrun", values)]
    assert "deepspeed" not in recorded


def test_example_hostfile_is_read_by_deepspeed() -> None:
    from deepspeed.launcher.runner import fetch_hostfile

    assert list(fetch_hostfile(str(ROOT / "scripts" / "hostfile.example")).items()) == [(n, 8) for n in NODES]


# ------------------------------------------------------------------------------------------------ torchrun run


def _complete_checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name[4:]) for p in (out / "checkpoints").glob("step*") if (p / "COMPLETE").is_file())


def _rank_process(launcher, rank: int):
    """The launcher's worker process of ``rank`` (torchrun's children carry RANK in their environment)."""
    for child in launcher.children():
        if child.environ().get("RANK") == str(rank):
            return child
    return None


@pytest.mark.slow
def test_torchrun_recipe_survives_a_lost_rank_and_resumes(tmp_path: Path) -> None:
    import psutil  # a dependency of deepspeed

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "recipes/dino.py", *TINY, f"out={out}"]
    log = tmp_path / "killed.log"  # a file, not a pipe: a pipe nobody reads while we wait could fill and block the run
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=launch_env(), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    launcher = psutil.Process(proc.pid)
    try:
        while not _complete_checkpoints(out):  # a run that hangs is stopped by pytest's timeout (pyproject.toml)
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        victim = _rank_process(launcher, 1)
        assert victim is not None, "rank 1's process was not found among torchrun's children"
        victim.send_signal(signal.SIGKILL)  # a node lost: no clean-up, no message
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:  # the test failed first: torchrun starts each rank in a session of its own
            for process in [*launcher.children(), launcher]:
                process.kill()
            proc.wait()
    first_output = log.read_text()
    assert proc.returncode != 0, "torchrun must fail when a rank dies"
    left = _complete_checkpoints(out)
    assert left[-1] < TOTAL_STEPS and not (out / "eval.json").exists(), \
        f"the kill came after training ({left}); the test did not test resume:\n{first_output[-3000:]}"

    rerun = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-6000:]
    assert f"resumed from {out / 'checkpoints' / f'step{left[-1]:08d}'} at step {left[-1]}/{TOTAL_STEPS}" in output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TOTAL_STEPS + 1)), "metrics.jsonl must hold each step once after the resume"
    assert _complete_checkpoints(out)[-1] == TOTAL_STEPS
    result = json.loads((out / "eval.json").read_text())
    assert result["n_test"] == 12 * 2 and result["knn_top1"] is not None and "random_init" in result
    print(f"killed at checkpoint {left[-1]}, resumed and finished in {time.perf_counter() - started:.0f} s")
