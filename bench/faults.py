"""Kill -9 battery: every stage of the main job survives SIGKILL anywhere and converges to the same result.

    python bench/faults.py                        # both chains below, ~10 min on 2 CPU cores
    python bench/faults.py --chains dino          # recipes/dino.py only (~2 min)
    python bench/faults.py --table                # rewrite docs/RELIABILITY.md from the latest JSON

For each recipe (``recipes/dino_gensis.py``: stage-1 DINO, autoencoder, latent caches, E-LDM, view
generation, Gen-DINO; ``recipes/dino.py``) and tiny settings (`GENSIS_KEYS`, `DINO_KEYS`: 72 built-in
images, 8 steps per training stage, a checkpoint every 2 steps), the battery

1. runs the command once, uninterrupted (the baseline);
2. runs the same command in another folder as a *chain*: each fault of the recipe's list, in order, is
   injected into one process (it dies by SIGKILL at that point); the next process, the same command,
   resumes and is killed at the next fault; a last plain process must finish (exit 0);
3. compares what each stage made (encoder / autoencoder / E-LDM weights, every array of the view
   store, eval.json numbers) with the baseline's: bitwise, else the largest difference.

Per fault it records whether the point was reached, what the rerun did (resumed at step S, skipped a
finished stage, regenerated N sources) and what was lost (steps done but not checkpointed; sources
generated but not marked done). The faults of one stage run in sequence on one folder, so equality
is per stage (the first differing stage names the culprit; ``--faults`` runs a chain of the named
faults only, e.g. ``--chains gensis --faults eldm:ckpt-write:6``, to isolate one).

How a fault is injected. ``python bench/faults.py --child STAGE:POINT[:AT] SCRIPT KEY=VALUE...`` runs
SCRIPT as ``__main__`` (as ``python SCRIPT`` would) after wrapping one function so that the process
sends itself SIGKILL at that point (`arm`); nothing in genssl changes, and a normal run is never
affected. ``ext-step`` is the exception: a plain process killed from outside (this script's parent
side) as soon as the stage's metrics.jsonl shows step AT, at whatever instruction it is then on.
Points (STAGE is the stage's folder under ``out=``, ``.`` for recipes/dino.py):

  step         inside DeepSpeedEngine.step of 1-based step AT: gradients computed, not applied
  ckpt-write   while writing the DeepSpeed file of the step-AT checkpoint (first 64 KiB on disk)
  ckpt-rename  step-AT checkpoint renamed into place, ``checkpoints/latest`` not yet updated
  trained      training finished (final checkpoint written), before evaluation and export
  exported     the stage's model folder / encoder written, before the rest of the stage
  stage-before everything of the stage written but its stage.json
  stage-after  stage.json written, before the next stage starts (gen_dino: before out/eval.json)
  cache        the latent cache's per-rank parts written, before they are assembled
  gen-write    source AT's staged views written and fsynced (with its group's), its done flag not yet set
  views-done   the view store complete (generation stage returned), before Gen-DINO starts

Writes ``bench/results/<date>-faults-<device>.json`` (device, versions, settings, per fault: stage,
point, outcome, steps lost, per-stage equality) and rewrites the table of docs/RELIABILITY.md from the
newest result of each chain run with its full list of faults (a ``--faults`` run changes no table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "RELIABILITY.md"
TABLE_BEGIN, TABLE_END = "<!-- faults-table:begin -->", "<!-- faults-table:end -->"
NOT_REACHED = 3  # the child's exit status when its fault point never came

TINY_DATA = "data=builtin:shapes?size=32&per_class=6&val_per_class=3"
DINO_KEYS = [TINY_DATA, "epochs=2", "batch_size=16", "patch_size=8", "crops.global_size=32", "crops.local_size=16",
             "crops.n_local=2", "eval.size=32", "num_workers=1", "log.progress=false", "log.every_steps=1",
             "ckpt.every_steps=2"]
GENSIS_KEYS = DINO_KEYS + [
    "generator.epochs=2", "generator.batch_size=16", "generator.eldm.sample_every=0", "generator.ckpt.every_steps=2",
    "generator.ae.epochs=2", "generator.ae.batch_size=16", "generator.ae.ckpt.every_steps=2",
    "generator.ae.log.every_steps=1", "generation.steps=2", "generation.batch_size=8", "generation.shard_size=16",
    "generation.report=false"]

# (stage folder, point, at): in the order a run meets them; each is met by the process after the previous kill.
GENSIS_FAULTS = [
    ("dino", "ckpt-write", 6), ("dino", "stage-before", None),
    ("eldm/ae", "step", 3), ("eldm/ae", "exported", None),
    ("eldm", "cache", "latents"), ("eldm", "ckpt-write", 6), ("eldm", "stage-after", None),
    ("views.zarr", "gen-write", 10), ("views.zarr", "views-done", None),
    ("gen_dino", "ext-step", 3), ("gen_dino", "ckpt-rename", 8), ("gen_dino", "stage-after", None),
]
DINO_FAULTS = [(".", "step", 3), (".", "ext-step", 4), (".", "ckpt-write", 6), (".", "ckpt-rename", 8),
               (".", "trained", None), (".", "exported", None)]
CHAINS = {"dino": ("recipes/dino.py", DINO_KEYS, DINO_FAULTS), "gensis": ("recipes/dino_gensis.py", GENSIS_KEYS, GENSIS_FAULTS)}
# What each stage leaves, compared with the baseline's (safetensors: tensors; json: numbers; zarr: arrays).
ARTIFACTS = {
    "dino": {".": ["encoder.safetensors", "eval.json"]},
    "gensis": {"dino": ["dino/encoder.safetensors", "dino/eval.json"],
               "eldm/ae": ["eldm/ae/autoencoder/diffusion_pytorch_model.safetensors"],
               "eldm": ["eldm/eldm/eldm.safetensors"], "views.zarr": ["views.zarr"],
               "gen_dino": ["gen_dino/encoder.safetensors", "gen_dino/eval.json"], "final": ["eval.json"]},
}


# ------------------------------------------------------------------------------------------------ child side


def _die(what: str) -> None:
    print(f"faults: SIGKILL at {what}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _DieAfter:
    """A file for torch.save that dies once ``limit`` bytes are on disk: a checkpoint file half written."""

    def __init__(self, fh, limit: int, what: str):
        self.fh, self.limit, self.what, self.n = fh, limit, what, 0

    def write(self, data) -> int:
        n = self.fh.write(data)
        self.n += n
        if self.n >= self.limit:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            _die(self.what)
        return n

    def flush(self) -> None:
        self.fh.flush()


def _wrap(owner, name: str, make) -> None:
    setattr(owner, name, make(getattr(owner, name)))


def arm(stage_dir: Path, point: str, at) -> None:
    """Wrap the one function where ``point`` lies so that this process dies there in ``stage_dir``."""
    import deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine as ds_ckpt
    import deepspeed.runtime.engine as ds_engine
    import torch

    from genssl.data import viewstore
    from genssl.engine import checkpoint, pipeline, pretrain
    from genssl.generators import autoencoder as gen_autoencoder
    from genssl.recipes import autoencoder, eldm

    what = f"{stage_dir.name or stage_dir}:{point}" + (f":{at}" if at is not None else "")
    state = {"run_dir": None, "saving": None}
    here = lambda path: Path(path).resolve() == stage_dir  # noqa: E731

    def manager_init(orig):
        def init(self, run_dir, *args, **kwargs):
            orig(self, run_dir, *args, **kwargs)
            state["run_dir"] = Path(run_dir).resolve()
        return init

    def manager_save(orig):
        def save(self, engine, step, *args, **kwargs):
            state["saving"] = step if here(self.dir.parent) else None
            try:
                return orig(self, engine, step, *args, **kwargs)
            finally:
                state["saving"] = None
        return save

    _wrap(checkpoint.CheckpointManager, "__init__", manager_init)
    _wrap(checkpoint.CheckpointManager, "save", manager_save)
    if point == "step":
        def step(orig):
            def wrapped(self, *args, **kwargs):
                if state["run_dir"] == stage_dir and self.global_steps == at - 1:  # steps done before this one
                    _die(what)
                return orig(self, *args, **kwargs)
            return wrapped
        _wrap(ds_engine.DeepSpeedEngine, "step", step)
    elif point == "ckpt-write":
        def ds_save(orig):
            def wrapped(self, state_dict, path):
                if state["saving"] == at:
                    with open(path, "wb") as fh:
                        torch.save(state_dict, _DieAfter(fh, 1 << 16, what), _use_new_zipfile_serialization=False)
                return orig(self, state_dict, path)
            return wrapped
        _wrap(ds_ckpt.TorchCheckpointEngine, "save", ds_save)
    elif point == "ckpt-rename":
        def marker(orig):
            def wrapped(path, text):
                if state["saving"] == at and Path(path).name == "latest":
                    _die(what)
                return orig(path, text)
            return wrapped
        _wrap(checkpoint, "write_text_atomic", marker)
    elif point == "trained":
        def fit(orig):
            def wrapped(cfg, dist, student, objective, loader, run_dir, *args, **kwargs):
                result = orig(cfg, dist, student, objective, loader, run_dir, *args, **kwargs)
                if here(run_dir):
                    _die(what)
                return result
            return wrapped
        for module in (pretrain, autoencoder, eldm):
            _wrap(module, "fit", fit)
    elif point == "exported":
        def after(orig, folder_of):
            def wrapped(*args, **kwargs):
                result = orig(*args, **kwargs)
                if here(folder_of(*args)):
                    _die(what)
                return result
            return wrapped
        _wrap(autoencoder, "_save_folder", lambda orig: after(orig, lambda ae, folder, meta: Path(folder).parent))
        _wrap(pretrain, "save_encoder", lambda orig: after(orig, lambda backbone, out, *rest: out))
    elif point in ("stage-before", "stage-after"):
        def mark(orig):
            def wrapped(folder, *args, **kwargs):
                if point == "stage-before" and here(folder):
                    _die(what)
                orig(folder, *args, **kwargs)
                if here(folder):
                    _die(what)
            return wrapped
        _wrap(pipeline, "mark_finished", mark)
    elif point == "cache":
        def cache_save(orig):
            def wrapped(self, tensors):
                if self.name == at:
                    _die(what)
                return orig(self, tensors)
            return wrapped
        _wrap(gen_autoencoder.LatentCache, "save", cache_save)
    elif point == "gen-write":
        def stage(orig):  # write_sources: staging files durable, then the done flags (schema 2 view store)
            def wrapped(self, files, *args, **kwargs):
                result = orig(self, files, *args, **kwargs)
                if at in [i for i, _ in files]:
                    _die(what)
                return result
            return wrapped
        _wrap(viewstore.ViewStore, "_stage", stage)
    elif point == "views-done":
        def views(orig):
            def wrapped(*args, **kwargs):
                result = orig(*args, **kwargs)
                _die(what)
                return result
            return wrapped
        _wrap(pipeline, "stage_views", views)  # before the recipe imports it
    else:
        raise ValueError(f"unknown fault point {point!r}")


def parse_fault(spec: str) -> tuple[str, str, object]:
    stage, point, *rest = spec.split(":")
    at = rest[0] if rest else None
    return stage, point, int(at) if at and at.isdigit() else at


def child(spec: str, script: str, args: list[str]) -> None:
    import runpy

    stage, point, at = parse_fault(spec)
    out = next(a.split("=", 1)[1] for a in args if a.startswith("out="))
    arm((Path(out) / stage).resolve(), point, at)
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)
    runpy.run_path(script, run_name="__main__")
    print(f"faults: {spec} was never reached", file=sys.stderr, flush=True)
    sys.exit(NOT_REACHED)


# ------------------------------------------------------------------------------------------------ parent side


def _env(cache: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GENSSL_CACHE=str(cache))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _last_step(metrics: Path) -> int | None:
    if not metrics.is_file():
        return None
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    try:
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (ValueError, KeyError):
        return None  # a line cut by the kill


def _complete_checkpoint(stage: Path) -> int | None:
    steps = [int(p.name[4:]) for p in (stage / "checkpoints").glob("step*") if (p / "COMPLETE").is_file()]
    return max(steps) if steps else None


def run(script: str, keys: list[str], out: Path, cache: Path, fault: tuple | None, timeout: int) -> dict:
    """One process of the command (``fault`` armed, or killed from outside for ``ext-step``)."""
    cmd = [sys.executable, script, *keys, f"out={out}"]
    if fault is not None and fault[1] != "ext-step":
        stage, point, at = fault
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{stage}:{point}" + (f":{at}" if at is not None else ""),
               *cmd[1:]]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    started = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        start = fh.tell()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=_env(cache))
        if fault is not None and fault[1] == "ext-step":
            metrics = out / fault[0] / "metrics.jsonl"
            while proc.poll() is None and time.perf_counter() - started < timeout:
                if (_last_step(metrics) or 0) >= fault[2]:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.01)
        try:
            rc = proc.wait(timeout=max(1, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:  # not a fault: our SIGKILL must not read as one
            proc.kill()
            proc.wait()
            rc = "timeout"
    text = log.read_text()[start:]
    return {"rc": rc, "seconds": round(time.perf_counter() - started, 1), "output": text}


def progress(out: Path, fault: tuple) -> dict:
    """What the killed process left of its stage: steps logged, newest complete checkpoint, sources done."""
    stage = out / fault[0]
    if fault[0] == "views.zarr":
        from genssl.data.viewstore import open_view_store

        try:
            store = open_view_store(stage, "r")
            return {"sources_done": int(store.n_done()), "sources": len(store)}
        except Exception as exc:  # noqa: BLE001 - reported, not fatal: the rerun must cope
            return {"store": f"unreadable: {exc}"}
    return {"steps_logged": _last_step(stage / "metrics.jsonl"), "checkpoint": _complete_checkpoint(stage)}


RESUMED = re.compile(r"resumed from (\S+)/checkpoints/step\d+ at step (\d+)/(\d+)")
WROTE = re.compile(r"(\S+): wrote (\d+) source\(s\)")
# a pipeline stage skipped by engine/pipeline.finished, or the autoencoder reused by recipes/autoencoder.py
FINISHED = re.compile(r"(?:^|autoencoder: )(\S+?)(?:/autoencoder)?:? (?:finished earlier|is already trained)", re.M)


def rerun_outcome(out: Path, fault: tuple, left: dict, output: str) -> dict:
    """What the next process did about the stage the fault hit."""
    stage = (out / fault[0]).resolve()
    if fault[0] == "views.zarr":
        wrote = [int(m.group(2)) for m in WROTE.finditer(output) if Path(m.group(1)).resolve() == stage]
        if wrote:
            lost = wrote[0] - (left.get("sources", 0) - left.get("sources_done", 0))
            return {"outcome": f"verified the store, regenerated the {wrote[0]} source(s) not done",
                    "lost": f"{max(lost, 0)} source(s) redone; views of the killed group recomputed"}
        if f"{fault[0]}: complete" in output or "nothing to do" in output:
            return {"outcome": "store complete: generation skipped", "lost": "nothing"}
        return {"outcome": "generation not rerun?", "lost": "?"}
    resumed = [(int(m.group(2)), int(m.group(3))) for m in RESUMED.finditer(output)
               if Path(m.group(1)).resolve() == stage]
    if resumed:
        step, total = resumed[0]
        logged = left.get("steps_logged") or 0
        what = "training complete: no step rerun" if step == total else f"resumed at step {step}/{total}"
        return {"outcome": what, "resumed_at": step, "steps_lost": max(logged - step, 0),
                "lost": f"{max(logged - step, 0)} step(s)" + ("; evaluation/export redone" if step == total else "")}
    finished = [m.group(1) for m in FINISHED.finditer(output)]
    if any(Path(f).resolve() == stage for f in finished):
        return {"outcome": "stage finished: skipped", "steps_lost": 0, "lost": "nothing"}
    if fault[0] == "eldm" and fault[1] == "cache":
        return {"outcome": "latent cache recomputed", "steps_lost": 0, "lost": "the latent cache (seconds)"}
    if left.get("checkpoint") is None:
        return {"outcome": "started afresh (no checkpoint yet)", "steps_lost": left.get("steps_logged") or 0,
                "lost": f"{left.get('steps_logged') or 0} step(s)"}
    return {"outcome": "no resume message found", "lost": "?"}


# ------------------------------------------------------------------------------------------------ comparison


def _numbers(obj, prefix: str = "") -> dict[str, float]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() if key != "config" for k, v in _numbers(value, f"{prefix}{key}.").items()}
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix.rstrip("."): float(obj)}
    return {}


def compare(base: Path, other: Path) -> dict:
    """``{"equal": bool, "max_abs_diff": float, "what": ...}`` for one artifact (file or view store)."""
    import numpy as np

    if not base.exists() or not other.exists():
        return {"equal": False, "max_abs_diff": None, "what": f"missing: {base if not base.exists() else other}"}
    if base.suffix == ".safetensors":
        from safetensors.numpy import load_file

        a, b = load_file(str(base)), load_file(str(other))
        if a.keys() != b.keys():
            return {"equal": False, "max_abs_diff": None, "what": "different tensors"}
        diffs = [float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)), initial=0.0)) for k in a]
        equal = all(np.array_equal(a[k], b[k]) for k in a)
        return {"equal": equal, "max_abs_diff": max(diffs, default=0.0), "what": f"{len(a)} tensors"}
    if base.suffix == ".json":
        a, b = _numbers(json.loads(base.read_text())), _numbers(json.loads(other.read_text()))
        if a.keys() != b.keys():
            return {"equal": False, "max_abs_diff": None, "what": f"different keys: {sorted(a.keys() ^ b.keys())}"}
        diff = max((abs(a[k] - b[k]) for k in a), default=0.0)
        return {"equal": diff == 0.0, "max_abs_diff": diff, "what": f"{len(a)} numbers"}
    from genssl.data.viewstore import open_view_store

    a, b = open_view_store(base, "r"), open_view_store(other, "r")
    ra, rb = a.read_range(0, len(a)), b.read_range(0, len(b))
    diffs = {k: float(np.max(np.abs(ra[k].astype(np.float64) - rb[k].astype(np.float64)), initial=0.0)) for k in ra}
    equal = ra.keys() == rb.keys() and all(np.array_equal(ra[k], rb[k]) for k in ra)
    return {"equal": equal, "max_abs_diff": max(diffs.values(), default=0.0),
            "what": f"{len(a)} sources, arrays {sorted(ra)}"}


# ------------------------------------------------------------------------------------------------ battery


def run_chain(name: str, work: Path, timeout: int, faults: list | None = None, keys: list[str] | None = None,
              log=print) -> dict:
    """Baseline, then the chain of ``faults`` (default: the recipe's list), then the comparison; the
    chain's record. ``keys`` replace the recipe's tiny settings (tests use even smaller ones)."""
    script, default_keys, default_faults = CHAINS[name]
    faults = default_faults if faults is None else faults
    keys = default_keys if keys is None else keys
    base, chain = work / f"{name}_baseline", work / f"{name}_chain"
    t0 = time.perf_counter()
    baseline = run(script, keys, base, work / f"{name}_cache_baseline", None, timeout)
    if baseline["rc"] != 0:
        raise RuntimeError(f"the uninterrupted {script} failed (rc {baseline['rc']}):\n{baseline['output'][-4000:]}")
    log(f"{name}: baseline {baseline['seconds']} s")
    records, processes = [], []
    for n, fault in enumerate([*faults, None]):
        result = run(script, keys, chain, work / f"{name}_cache_chain", fault, timeout)
        processes.append({"fault": list(fault) if fault else None, "rc": result["rc"], "seconds": result["seconds"]})
        if records:  # this process is the rerun after the previous fault
            records[-1].update(rerun_outcome(chain, faults[n - 1], records[-1]["left"], result["output"]))
        if fault is None:
            ok = result["rc"] == 0
            log(f"{name}: final rerun rc {result['rc']} ({result['seconds']} s)")
            if not ok:
                log(result["output"][-4000:])
            break
        killed = result["rc"] == -signal.SIGKILL
        record = {"stage": fault[0], "point": fault[1], "at": fault[2], "killed": killed, "seconds": result["seconds"],
                  "left": progress(chain, fault) if killed else {}}
        if not killed:
            record["outcome"] = ("point never reached" if result["rc"] in (0, NOT_REACHED) else
                                 f"timed out after {timeout} s" if result["rc"] == "timeout" else
                                 f"the rerun FAILED (rc {result['rc']})")
            record["error_tail"] = result["output"][-3000:]
            log(f"{name}: {fault}: {record['outcome']}\n{record['error_tail']}")
        else:
            log(f"{name}: {fault}: killed after {result['seconds']} s, left {record['left']}")
        records.append(record)
        if not killed:
            break
    comparisons = {stage: {Path(p).name: compare(base / p, chain / p) for p in paths}
                   for stage, paths in ARTIFACTS[name].items()}
    for record in records:
        stage_cmp = comparisons.get(record["stage"], {})
        record["equal"] = bool(stage_cmp) and all(c["equal"] for c in stage_cmp.values())
        record["max_abs_diff"] = max((c["max_abs_diff"] or 0.0 for c in stage_cmp.values()), default=None)
    final_ok = processes[-1]["rc"] == 0 and processes[-1]["fault"] is None
    return {"recipe": script, "keys": keys, "baseline_s": baseline["seconds"], "faults": records,
            "processes": processes, "final_rerun_ok": final_ok, "comparisons": comparisons,
            "all_equal": final_ok and all(c["equal"] for s in comparisons.values() for c in s.values()),
            "seconds": round(time.perf_counter() - t0, 1)}


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def versions() -> dict:
    import deepspeed
    import nvidia.dali
    import torch
    import zarr

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "dali": nvidia.dali.__version__,
            "zarr": zarr.__version__, "python": platform.python_version()}


def _cell(value) -> str:
    return "-" if value is None else str(value)


def format_chain(chain: dict, doc: dict, source: str) -> str:
    verdict = "every artifact bitwise equal to the uninterrupted run" if chain["all_equal"] else "**DIFFERENCES**"
    lines = [f"**`{chain['recipe']}`** — {len(chain['faults'])} kills, final rerun "
             f"{'finished' if chain['final_rerun_ok'] else '**FAILED**'}; {verdict}. Measured {doc['date']} on "
             f"{doc['device']}, OMP_NUM_THREADS=1 (`{source}`; uninterrupted run {chain['baseline_s']} s, the "
             f"chain's {len(chain['processes'])} processes {chain['seconds']} s in all, on a shared machine).\n",
             "| stage | point | at | killed | left at the kill | the rerun | lost | stage output vs uninterrupted |",
             "|---|---|---|---|---|---|---|---|"]
    for f in chain["faults"]:
        left = ", ".join(f"{k} {v}" for k, v in f.get("left", {}).items()) or "-"
        eq = "bitwise equal" if f.get("equal") else f"max diff {_cell(f.get('max_abs_diff'))}"
        lines.append(f"| {f['stage']} | {f['point']} | {_cell(f['at'])} | {'yes' if f['killed'] else 'NO'} | {left} | "
                     f"{f.get('outcome', '-')} | {f.get('lost', '-')} | {eq} |")
    lines += ["", "| artifact | compared | result |", "|---|---|---|"]
    for stage, items in chain["comparisons"].items():
        for item, c in items.items():
            res = "bitwise equal" if c["equal"] else f"differs (max abs diff {_cell(c['max_abs_diff'])})"
            lines.append(f"| {stage}/{item} | {c['what']} | {res} |")
    return "\n".join(lines) + "\n"


def write_table() -> None:
    """docs/RELIABILITY.md's table: for each chain, its newest run with the full list of faults."""
    newest: dict[str, tuple] = {}
    for path in sorted((REPO / "bench" / "results").glob("*-faults-*.json"), key=lambda p: p.stat().st_mtime):
        doc = json.loads(path.read_text())
        if doc.get("default_faults", True):
            for name, chain in doc["chains"].items():
                newest[name] = (chain, doc, str(path.relative_to(REPO)))
    body = "\n".join(format_chain(*newest[name]) for name in CHAINS if name in newest)
    text = DOC.read_text()
    text = text[:text.index(TABLE_BEGIN)] + f"{TABLE_BEGIN}\n{body}{TABLE_END}" + text[text.index(TABLE_END) + len(TABLE_END):]
    DOC.write_text(text)
    print(f"wrote the table of {DOC}")


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", default="dino,gensis", help="comma-separated: dino, gensis")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one, removed)")
    parser.add_argument("--faults", default=None, help="STAGE:POINT[:AT],... instead of each chain's list")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per process")
    parser.add_argument("--table", action="store_true", help="only rewrite docs/RELIABILITY.md from the latest JSON")
    args = parser.parse_args(argv)
    results_dir = REPO / "bench" / "results"
    if args.table:
        return write_table()
    from genssl.engine.atomic import write_json_atomic

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="genssl-faults-"))
    started = time.perf_counter()
    faults = [parse_fault(f) for f in args.faults.split(",")] if args.faults else None
    chains = {name: run_chain(name, work, args.timeout, faults) for name in args.chains.split(",")}
    stamp = datetime.date.today().isoformat()
    doc = {"bench": "faults", "date": stamp, "device": device(), "versions": versions(), "command": " ".join(sys.argv),
           "env": {"OMP_NUM_THREADS": "1"}, "seconds": round(time.perf_counter() - started, 1), "chains": chains}
    doc["default_faults"] = not args.faults
    results = results_dir / f"{stamp}-faults-{device()}.json"
    results = results.with_name(f"{results.stem}-{int(time.time())}.json") if results.exists() else results
    write_json_atomic(results, doc)
    print(f"wrote {results}")
    if not args.faults:  # docs/RELIABILITY.md shows each chain's full list of faults
        write_table()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    if not all(c["all_equal"] for c in chains.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
