"""The whole performance table in one command, within a time budget.

    python bench/run_all.py                      # every section, --budget-s 540
    python bench/run_all.py --quick --budget-s 30 --sections losses data

Four sections, each timed against its named baseline on the same device, same inputs:

  losses    fused contrastive loss (Triton) vs the PyTorch eager reference     (bench/losses.py)
  train     ViT student step, packed multi-crop vs per-resolution             (bench/packed.py),
            DINO training step, Gen-DINO training step vs the DINO step       (bench/throughput.py)
  generate  GuidedSampler backends vs the diffusers eager sampling loop       (bench/generate.py)
  data      DALI CPU / GPU pipeline vs PyTorch DataLoader+PIL                 (bench/throughput.py)

Sizes: on a CUDA GPU the papers' (ViT-S/16 2x224 + 8x96 bf16, E-LDM 256² batch 64, ...); on the
CPU, and everywhere with ``--quick``, tiny ones that prove the scripts (``--quick`` also repeats
less: the CI setting). Every row is the median of its repeats; the repeats are in the JSON.

Budget: the clock starts with this process. Each section runs in a child process and gets a share
of what is left (``SHARES``; time a section does not use goes to the later ones). A section whose
usual cost here (``EST_S``) exceeds what is left is skipped with that reason; a child still running
when its share is spent is stopped, and its unfinished rows say so. So the whole run ends within
``--budget-s``. A row that cannot run here (no CUDA, a package not installed) is skipped with the
reason; a row that raised is "failed" with the error.

Writes ``bench/results/<date>-<device>-run-all.json`` (device, load average, versions of torch,
triton, deepspeed, DALI, diffusers, ..., config, budget, rows) and regenerates the table of
docs/PERFORMANCE.md between its ``run_all`` markers from it (``--doc``; ``--no-doc`` leaves it).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

T0 = time.monotonic()  # the budget's clock; only the standard library is imported before it

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
DOC = REPO / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"
SCHEMA = "genssl-bench-run-all/1"

SECTIONS = ("losses", "train", "generate", "data")
TITLES = {"losses": "fused contrastive loss vs the PyTorch eager reference",
          "train": "DINO / Gen-DINO training step; packed vs per-resolution attention",
          "generate": "sampler backends vs the diffusers eager loop",
          "data": "data pipeline (DALI) vs PyTorch DataLoader+PIL"}
BASELINES = {"losses": "PyTorch eager reference", "train": "per-resolution ViT step / DINO step",
             "generate": "diffusers eager loop", "data": "PyTorch DataLoader+PIL"}
REQUIRES = {"losses": ("triton",), "train": ("deepspeed",), "generate": ("diffusers",), "data": ("nvidia.dali",)}
SHARES = {"losses": 0.12, "train": 0.40, "generate": 0.28, "data": 0.20}
# Least time a section needs to measure anything, child start-up included (seconds): "quick"/"cpu"
# from this project's 2-core CPU when lightly loaded; "gpu" estimated for an H100-class GPU.
EST_S = {"quick": {"losses": 15, "train": 30, "generate": 15, "data": 12},
         "cpu": {"losses": 20, "train": 90, "generate": 25, "data": 20},
         "gpu": {"losses": 60, "train": 90, "generate": 120, "data": 60}}
COMPILE_EST_S = {"quick": 120, "cpu": 120, "gpu": 150}  # torch.compile of the UNet, build + calls
DALI_DISTS = ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali")
RESERVE_S = 1.5  # writing the JSON and the doc after the last section
REPEATS = {"quick": 3, "cpu": 5, "gpu": 5}

# The GPU floors and predictions of docs/PERFORMANCE.md ("Floors and predictions").
TARGETS = {"loss.nt_xent.M16384.D256.bf16": "≥ 3× (predicted 4–6×, docs/KERNELS.md)",
           "train.dino": "≥ 30 % of the measured bf16 matmul rate (predicted 30–40 %)",
           "generate.compile": "≥ 2.5×", "generate.cudagraphs": "≥ 2.5×", "generate.tensorrt": "≥ 2.5×",
           "data.dali_gpu": "≥ 5× (predicted 4–6×)"}


# ------------------------------------------------------------------------------------------------ rows


def measurement(name: str, unit: str, repeats: list[float] | None = None, median: float | None = None,
                n: int | None = None, note: str | None = None) -> dict:
    """One side of a row: ``median`` of ``repeats`` (or a median computed elsewhere, with its count ``n``)."""
    if repeats:
        median, n = statistics.median(repeats), len(repeats)
    return {"name": name, "unit": unit, "median": median, "repeats": repeats, "n": n, "note": note}


def speedup(baseline: dict | None, ours: dict | None) -> float | None:
    """> 1: ours is faster. Rates (unit ``.../s``): ours / baseline; times: baseline / ours."""
    if not baseline or not ours or not baseline.get("median") or not ours.get("median"):
        return None
    if baseline["unit"] != ours["unit"]:
        raise ValueError(f"a ratio of {baseline['unit']} and {ours['unit']}")
    rate = ours["unit"].endswith("/s")
    return ours["median"] / baseline["median"] if rate else baseline["median"] / ours["median"]


def new_row(id: str, section: str, what: str, baseline: str | None, ours: str, unit: str, status: str = "pending",
            reason: str | None = None) -> dict:
    """A planned row (its GPU target is set by `Section.plan`, at the full sizes the target is stated for)."""
    return {"id": id, "section": section, "what": what, "status": status, "reason": reason,
            "baseline": measurement(baseline, unit) if baseline else None, "ours": measurement(ours, unit),
            "ratio": None, "target": None, "extra": {}}


def skipped_section_row(section: str, reason: str, status: str = "skipped") -> dict:
    return new_row(section, section, TITLES[section], BASELINES[section], "—", "", status, reason)


# ------------------------------------------------------------------------------------------------ sections (children)


class Section:
    """A child's rows, saved (atomically) after every change so the parent keeps what finished."""

    def __init__(self, name: str, scale: str, deadline: float, rows_file: Path, repeats: int):
        import torch

        self.name, self.scale, self.deadline, self.rows_file, self.repeats = name, scale, deadline, rows_file, repeats
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        if scale == "gpu" and not self.cuda:  # the parent's guess (a driver, a CUDA torch) was wrong
            self.scale = "cpu"
        self.info = {"type": self.device.type, "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
                     "name": torch.cuda.get_device_name(0) if self.cuda else f"cpu {platform.machine()}"}
        self.rows: dict[str, dict] = {}

    def left_s(self) -> float:
        return self.deadline - time.time()

    def plan(self, rows: list[dict]) -> None:
        for r in rows:
            r["target"] = TARGETS.get(r["id"]) if self.scale == "gpu" else None
        self.rows = {r["id"]: r for r in rows}
        self.save()

    def set(self, id: str, **fields) -> None:
        row = self.rows[id]
        row.update(fields)
        if row["status"] == "ok":
            row["ratio"] = speedup(row["baseline"], row["ours"])
        self.save()

    def fail(self, id: str, err: BaseException) -> None:
        traceback.print_exc()
        self.set(id, status="failed", reason=f"{type(err).__name__}: {err}".splitlines()[0][:300])

    def save(self) -> None:
        from genssl.engine.atomic import write_json_atomic

        write_json_atomic(self.rows_file, {"device": self.info, "rows": list(self.rows.values())})


def section_losses(s: Section) -> None:
    import types

    from genssl.bench import losses

    gpu = s.scale == "gpu"
    backend = losses.kernel_backend(s.device)
    interp = backend == "triton-interpreter"
    ours = "fused Triton kernel" + (" in the Triton interpreter (proves the script, not a speed)" if interp else "")
    dtypes = ["bf16"] if gpu else ["fp32"]
    grid = [(16384, 256)] if gpu else [(64, 32)]
    problems = [p for ps in (losses.METHOD_PROBLEMS if gpu else losses.QUICK_METHOD_PROBLEMS).values() for p in ps]
    args = types.SimpleNamespace(repeats=s.repeats, warmup=1, no_reference=False)

    def grid_run(M: int, D: int, dname: str):
        return [losses.bench_one(fn, M, D, losses.DTYPES[dname], s.device, 0.1, s.repeats, 1)
                for fn in (losses.contrastive_loss, losses.contrastive_loss_reference)]

    def method_run(p, dname: str):
        rec = losses.bench_method(p, dname, s.device, args, mm_tflops=float("nan"))
        return rec["kernel"], rec["reference"]

    todo = []  # (row id, what, () -> (kernel record, reference record)) in the records' schema of bench/losses.py
    for dname in dtypes:
        todo += [(f"loss.nt_xent.M{M}.D{D}.{dname}", f"fused contrastive loss fwd+bwd, NT-Xent M=N={M}, D={D}, {dname}",
                  lambda M=M, D=D, dname=dname: grid_run(M, D, dname)) for M, D in grid]
        todo += [(f"loss.{p.method}." + ".".join(f"{k}{v}" for k, v in p.shape.items()) + f".{dname}",
                  f"fused contrastive loss fwd+bwd, {p.name} (M={p.M}, N={p.N}, D={p.D}), {dname}",
                  lambda p=p, dname=dname: method_run(p, dname)) for p in problems]
    rows = [new_row(id, "losses", what, BASELINES["losses"], ours, "ms") for id, what, _ in todo]
    if backend.startswith("reference"):
        for r in rows:
            r.update(status="skipped", reason=f"no Triton path on {s.device.type} (the kernel would be the reference)")
    s.plan(rows)
    if backend.startswith("reference"):
        return
    for id, _, bench in todo:
        try:
            kernel, reference = bench()
        except Exception as err:  # noqa: BLE001 - a failing row is a result
            s.fail(id, err)
            continue
        if kernel["status"] != "ok":
            s.set(id, status="failed", reason=f"the kernel: {kernel.get('error', kernel['status'])}")
            continue
        base = (measurement(BASELINES["losses"], "ms", reference["fwd_bwd_times_ms"]) if reference["status"] == "ok"
                else measurement(BASELINES["losses"], "ms", note="out of memory"))
        s.set(id, status="ok", baseline=base, ours=measurement(ours, "ms", kernel["fwd_bwd_times_ms"]),
              extra={"kernel_backend": backend, "loss_abs_diff": abs(kernel["loss"] - reference.get("loss", kernel["loss"])),
                     "kernel_peak_extra_bytes": kernel.get("peak_extra_bytes")})


def _train_sizes(scale: str) -> dict:
    if scale == "gpu":  # DINO's ViT-S/16 reference setting (recipes/dino.py preset imagenet)
        return {"preset": "imagenet", "overrides": [], "every": 5, "steps": 30,
                "packed": dict(model="vit_small", patch_size=16, global_size=224, local_size=96, n_local=8,
                               batch_size=64, dtype="bf16", head_out_dim=65536)}
    tiny = ["model=vit_tiny", "patch_size=8", "stem_stride=4", "width=64", "crops.global_size=32", "crops.local_size=16",
            "crops.n_local=2", "batch_size=8"]
    every, windows = (1, 3) if scale == "quick" else (2, 5)
    return {"preset": "smoke", "overrides": tiny, "every": every, "steps": every * (windows + 1),
            "packed": dict(model="vit_tiny", patch_size=8, global_size=32, local_size=16, n_local=2, batch_size=8,
                           dtype="fp32", head_out_dim=1024)}


def section_train(s: Section) -> None:
    import inspect

    try:  # first: the packed row needs neither DeepSpeed nor the recipes
        from genssl.bench.packed import packed_vs_per_resolution
    except ImportError as err:
        packed_vs_per_resolution, missing = None, f"bench/packed.py is not importable ({err})"
    from genssl.bench import throughput as tp

    sizes = _train_sizes(s.scale)
    cfg = tp.bench_config(sizes["preset"], 2, [*sizes["overrides"], f"log.every_steps={sizes['every']}"])
    c = cfg.crops
    crops = f"{c.n_global}×{c.global_size} + {c.n_local}×{c.local_size}"
    model = f"{cfg.model}/{cfg.patch_size}" if cfg.model.startswith("vit") else cfg.model
    pk = sizes["packed"]
    pk_crops = f"2×{pk['global_size']} + {pk['n_local']}×{pk['local_size']}"
    rows = [new_row("train.packed", "train", f"ViT student step fwd+bwd, {pk['model']}/{pk['patch_size']}, {pk_crops}, "
                    f"batch {pk['batch_size']}, {pk['dtype']}", "per-resolution (one pass per crop size)",
                    "packed multi-crop (one block-diagonal pass)", "ms"),
            new_row("train.dino", "train", f"DINO training step (real engine: DeepSpeed, EMA teacher), {model}, {crops}, "
                    f"batch {cfg.batch_size}, {cfg.precision}, synthetic input", None, "genssl DINO step", "images/s"),
            new_row("train.gen_dino", "train", "Gen-DINO training step (+ L_dis on interpolated views), same model, "
                    "crops and batch", "DINO step (row above)", "genssl Gen-DINO step", "images/s")]
    s.plan(rows)
    if packed_vs_per_resolution is None:
        s.set("train.packed", status="skipped", reason=missing)
    else:
        try:
            wanted = {**pk, "repeats": s.repeats, "warmup": 1, "device": str(s.device)}
            params = inspect.signature(packed_vs_per_resolution).parameters
            r = packed_vs_per_resolution(**{k: v for k, v in wanted.items() if k in params})
            s.set("train.packed", status="ok",
                  baseline=measurement(rows[0]["baseline"]["name"], "ms", median=r["per_resolution_ms"]["median"],
                                       n=r.get("repeats")),
                  ours=measurement(f"{rows[0]['ours']['name']}, attention={r.get('attention')}", "ms",
                                   median=r["packed_ms"]["median"], n=r.get("repeats")), extra=r)
        except Exception as err:  # noqa: BLE001
            s.fail("train.packed", err)

    from genssl.engine.distributed import setup_distributed

    dist = setup_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        dino = None
        for gen_dino, id in ((False, "train.dino"), (True, "train.gen_dino")):
            try:
                r = tp.train_step(cfg, dist, sizes["steps"], f"{tmp}/{id}", gen_dino=gen_dino)
            except Exception as err:  # noqa: BLE001
                s.fail(id, err)
                continue
            ours = measurement(s.rows[id]["ours"]["name"], "images/s", r["repeats"])
            extra = {"peak_mem_gb": r["peak_mem_gb"], "steps": sizes["steps"], "window_steps": sizes["every"]}
            if not gen_dino:
                dino = ours
                try:
                    extra.update(tp.flops_report(cfg, s.device, ours["median"]))
                    ours["note"] = f"model {extra['model_tflops']:.3g} TFLOP/s" + (
                        f" = {100 * extra['fraction_of_bf16_matmul']:.0f} % of the measured bf16 matmul rate "
                        f"({extra['bf16_matmul_tflops']:.0f} TFLOP/s)" if "fraction_of_bf16_matmul" in extra else "")
                except Exception as err:  # noqa: BLE001 - the rate stands without its FLOP count
                    extra["flops_error"] = str(err)[:200]
                s.set(id, status="ok", ours=ours, extra=extra)
            elif dino is None:
                s.set(id, status="ok", ours=ours, baseline=None, extra=extra)
            else:
                s.set(id, status="ok", ours=ours, baseline={**dino, "name": "DINO step (row above)"}, extra=extra)


def section_generate(s: Section) -> None:
    from genssl.bench import generate
    from genssl.generators.backends import BACKENDS

    flags = (["--quick"] if s.scale != "gpu" else []) + ["--no-quality", "--repeats", str(s.repeats), "--warmup", "1"]
    args = generate.parse_args([*flags, "--backends", *BACKENDS, "--out-dir", tempfile.gettempdir()])
    what = (f"E-LDM sampling, embeddings → uint8 images {args.image_size}², {args.scheduler} {args.steps} steps, "
            f"CFG w={args.guidance:g}, {args.dtype}, batch {args.batch}, random-init "
            f"{'tiny ' if args.quick else 'METHODS-size '}models")
    base_name = BASELINES["generate"]
    s.plan([new_row(f"generate.{b}", "generate", what, base_name, f"GuidedSampler backend={b}", "views/s")
            for b in BACKENDS])
    state = {}

    def views(r: dict) -> list[float]:
        return [args.batch / t for t in r["times_s"]]

    def on_result(key: str, r: dict) -> None:
        if key == "decode_only":
            state["decode_only_s"] = r.get("median_s")
            return
        if key == "diffusers_eager":
            state["base"] = measurement(base_name, "views/s", views(r))
            return
        id = f"generate.{key.removeprefix('ours_')}"
        if r["status"] == "ok":
            extra = {k: r.get(k) for k in ("build_s", "peak_mem_gb", "mean_abs_diff_grey_vs_diffusers")}
            extra["decode_only_s"] = state.get("decode_only_s")
            s.set(id, status="ok", baseline=state["base"], ours=measurement(s.rows[id]["ours"]["name"], "views/s",
                                                                            views(r)), extra=extra)
        else:
            s.set(id, status=r["status"], reason=r.get("reason") or r.get("error"))

    def skip_reason(backend: str) -> str | None:
        need = COMPILE_EST_S[s.scale]
        if backend == "compile" and s.left_s() < need:
            return (f"budget: torch.compile of the UNet takes about {need} s here and the section has "
                    f"{max(0.0, s.left_s()):.0f} s left")
        return None

    generate.run(args, on_result=on_result, skip_reason=skip_reason)


def _data_sizes(scale: str) -> dict:
    if scale == "gpu":  # ImageNet-size JPEGs (the built-in set at 448 px), DINO's crops
        return {"preset": "imagenet", "data": "builtin:shapes?size=448&per_class=100&val_per_class=1", "batches": 10,
                "overrides": []}
    per_class, batches = (8, 3) if scale == "quick" else (30, 5)
    return {"preset": "smoke", "data": f"builtin:shapes?size=64&per_class={per_class}&val_per_class=1",
            "batches": batches, "overrides": ["batch_size=16"]}


def section_data(s: Section) -> None:
    from genssl.bench import throughput as tp
    from genssl.data.builtin import resolve_data
    from genssl.data.index import build_index

    sizes = _data_sizes(s.scale)
    workers = min(8 if s.cuda else 2, os.cpu_count() or 1)
    cfg = tp.bench_config(sizes["preset"], workers, sizes["overrides"])
    c = cfg.crops
    px = re.search(r"size=(\d+)", sizes["data"]).group(1)
    what = (f"data pipeline: JPEG decode + multi-crop augmentation, {c.n_global}×{c.global_size} + "
            f"{c.n_local}×{c.local_size} of {px} px JPEGs, batch {cfg.batch_size}, {workers} threads/workers")
    rows = [new_row("data.dali_cpu", "data", what, BASELINES["data"], "DALI CPU pipeline", "images/s"),
            new_row("data.dali_gpu", "data", what, BASELINES["data"], "DALI GPU pipeline (nvJPEG mixed decode)",
                    "images/s")]
    if not s.cuda:
        rows[1].update(status="skipped", reason="no GPU available")
    s.plan(rows)
    index = build_index(resolve_data(sizes["data"]).train)
    device = s.device
    base = tp.time_loader(tp.torch_loader(index, cfg, workers), sizes["batches"], s.repeats, device)
    base = measurement(BASELINES["data"], "images/s", base["repeats"])
    for id, device_id in (("data.dali_cpu", None), ("data.dali_gpu", 0)):
        if s.rows[id]["status"] != "pending":
            continue
        try:
            r = tp.time_loader(tp.dali_loader(index, cfg, workers, device_id), sizes["batches"], s.repeats, device)
        except Exception as err:  # noqa: BLE001
            s.fail(id, err)
            continue
        s.set(id, status="ok", baseline=base, ours=measurement(s.rows[id]["ours"]["name"], "images/s", r["repeats"]),
              extra={"images": len(index), "data": sizes["data"]})


SECTION_FUNCS = {"losses": section_losses, "train": section_train, "generate": section_generate, "data": section_data}


def child_main(args) -> int:
    s = Section(args.section, args.scale, args.deadline, Path(args.rows_file), args.repeats)
    SECTION_FUNCS[args.section](s)
    return 0


# ------------------------------------------------------------------------------------------------ parent


def versions() -> dict:
    """Installed versions from package metadata (nothing imported, nothing scanned); None where not installed."""
    def v(*dists: str) -> str | None:
        for dist in dists:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    out = {"python": platform.python_version(), "dali": v(*DALI_DISTS)}
    for name in ("torch", "triton", "deepspeed", "diffusers", "timm", "tensorrt", "xformers"):
        out[name] = v(name)
    return out


def device_info() -> dict:
    """What the parent can tell without importing torch (seconds of the budget): the host, and whether a
    CUDA GPU is likely (an NVIDIA driver and a CUDA build of torch). The children, which import torch,
    report the device they ran on (``report["device"]["name"]``; ``cuda`` confirmed there)."""
    torch_version = versions()["torch"] or ""
    driver = Path("/proc/driver/nvidia/version").is_file() or Path("/dev/nvidia0").exists()
    cuda = driver and "+cpu" not in torch_version and os.environ.get("CUDA_VISIBLE_DEVICES") not in ("", "-1")
    return {"type": "cuda" if cuda else "cpu", "name": f"cpu {platform.machine()}", "cores": os.cpu_count(),
            "load_average_start": round(os.getloadavg()[0], 2)}


def missing_package(section: str) -> str | None:
    for mod in REQUIRES[section]:
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} not installed"
        except ModuleNotFoundError:
            return f"{mod} not installed"
    return None


def _stop(proc: subprocess.Popen) -> None:
    """The child's whole process group (DataLoader workers, DALI threads' processes)."""
    for sig, wait in ((signal.SIGTERM, 0.5), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_section(name: str, allot_s: float, scale: str, repeats: int, workdir: Path) -> tuple[list[dict], dict]:
    """Runs section ``name`` in a child for at most ``allot_s`` seconds; its rows and a budget record."""
    start = time.monotonic()
    rows_file, log_file = workdir / f"{name}.rows.json", workdir / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--scale", scale, "--repeats",
           str(repeats), "--deadline", f"{time.time() + allot_s:.3f}", "--rows-file", str(rows_file)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    scratch = workdir / name  # the child's temporary files: removed with the parent's, even if it is stopped
    scratch.mkdir()
    env["TMPDIR"] = str(scratch)
    if name == "losses" and scale != "gpu":
        env.setdefault("TRITON_INTERPRET", "1")  # the fused kernel on the CPU: before triton is imported
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc, stopped = proc.wait(timeout=max(0.1, allot_s - 1.0)), False  # 1 s for stopping it
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc, stopped = proc.returncode, True
    wall = time.monotonic() - start
    why = "the section ended without measuring this row"
    saved = json.loads(rows_file.read_text()) if rows_file.is_file() else {}
    rows = saved.get("rows", [])
    tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    if stopped:
        why = f"budget: the section's share ({allot_s:.0f} s) ran out before this row finished"
    elif rc != 0:
        why = f"the section's process exited with code {rc}: {tail[0][:200]}"
    if stopped or rc != 0:
        end = "\n".join(log_file.read_text(errors="replace").splitlines()[-(10 if stopped else 30):])
        print(f"[{name}] {'stopped' if stopped else 'failed'}; the end of its log:\n{end}", file=sys.stderr)
    for r in rows:
        if r["status"] == "pending":
            r.update(status="skipped" if stopped else "failed", reason=why)
    if not rows:  # the child never got to plan its rows
        rows = [skipped_section_row(name, why if (stopped or rc) else "the section planned no rows",
                                    "skipped" if stopped else "failed")]
    status = "stopped" if stopped else ("ok" if rc == 0 else "failed")
    return rows, {"allotted_s": round(allot_s, 2), "wall_s": round(wall, 2), "status": status, "exit_code": rc,
                  "device": saved.get("device")}


def run(args) -> dict:
    deadline = T0 + args.budget_s - RESERVE_S
    device = device_info()
    scale = "quick" if args.quick else ("gpu" if device["type"] == "cuda" else "cpu")
    repeats = args.repeats or REPEATS[scale]
    report = {"schema": SCHEMA, "date": datetime.date.today().isoformat(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
              "versions": versions(),
              "config": {"budget_s": args.budget_s, "scale": scale, "quick": args.quick, "repeats": repeats,
                         "sections": list(args.sections), "argv": sys.argv[1:]},
              "budget": {"budget_s": args.budget_s, "sections": {}}, "rows": []}
    print(f"bench/run_all.py: {device['name']}, {scale} sizes, {repeats} repeats, budget {args.budget_s:g} s", flush=True)
    todo = [n for n in SECTIONS if n in args.sections]
    with tempfile.TemporaryDirectory(prefix="genssl-run-all-", ignore_cleanup_errors=True) as tmp:
        for i, name in enumerate(todo):
            left = deadline - time.monotonic()
            est = EST_S[scale][name]
            missing = missing_package(name)
            if missing:
                rows, rec = [skipped_section_row(name, missing)], {"status": "skipped", "reason": missing}
            elif est > left:
                why = (f"budget: this section takes about {est} s here and {max(0.0, left):.0f} s of the "
                       f"{args.budget_s:g} s budget were left (raise --budget-s)")
                rows, rec = [skipped_section_row(name, why)], {"status": "skipped", "reason": why}
            else:
                fair = left * SHARES[name] / sum(SHARES[n] for n in todo[i:])
                allot = min(left, max(fair, est))
                print(f"[{name}] up to {allot:.0f} s ...", flush=True)
                rows, rec = run_section(name, allot, scale, repeats, Path(tmp))
                seen = rec.pop("device")
                if seen:  # the device as torch saw it in the child
                    device.update(seen)
                    scale = "cpu" if scale == "gpu" and seen["type"] != "cuda" else scale
            report["rows"] += rows
            report["budget"]["sections"][name] = rec
            for r in rows:
                print(f"[{name}] {row_summary(r)}", flush=True)
    device["load_average_end"] = round(os.getloadavg()[0], 2)
    report["config"]["scale"] = scale
    report["budget"]["wall_s"] = round(time.monotonic() - T0, 2)
    return report


# ------------------------------------------------------------------------------------------------ table


def row_summary(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['what']}: {r['status']} ({r['reason']})"
    ratio = f", {fmt_ratio(r['ratio'])}" if r["ratio"] is not None else ""
    return f"{r['what']}: {_side(r['baseline'])} | {_side(r['ours'])}{ratio}"


def fmt_value(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


def _side(m: dict | None) -> str:
    if not m:
        return "—"
    if m.get("median") is None:
        return f"{m['name']}: {m['note']}" if m.get("note") else m["name"]
    note = f" ({m['note']})" if m.get("note") else ""
    return f"{m['name']}: {fmt_value(m['median'])} {m['unit']}{note}"


def table_row(r: dict) -> str:
    if r["status"] == "ok":
        cells = [r["what"], _side(r["baseline"]), _side(r["ours"]),
                 fmt_ratio(r["ratio"]) if r["ratio"] is not None else "—"]
    else:
        word = "not measured" if r["status"] == "skipped" else "failed"
        cells = [r["what"], r["baseline"]["name"] if r["baseline"] else "—", f"**{word}**: {r['reason']}", "—"]
    cells.append(r["target"] or "—")
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def render(report: dict, json_path: str) -> str:
    d, v = report["device"], report["versions"]
    load = d.get("load_average_start")
    if d["type"] == "cpu":
        shared = (f"shared: load average {load} at the start, {d.get('load_average_end')} at the end"
                  if load is not None and load > 1 else f"load average {load} at the start")
        device = f"**{d['name']}, {d['cores']} cores** ({shared})"
    else:
        device = f"**{d['name']}** (CUDA {d.get('cuda')}, host {d['cores']} cores)"
    installed = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "deepspeed", "dali", "diffusers", "tensorrt",
                                                    "xformers") if v.get(k))
    absent = ", ".join(k for k in ("triton", "deepspeed", "dali", "diffusers", "tensorrt", "xformers") if not v.get(k))
    sizes = {"quick": "quick sizes (`--quick`)", "cpu": "CPU quick sizes", "gpu": "full sizes"}[report["config"]["scale"]]
    lines = [f"Measured by `python bench/run_all.py` on {report['date']}: {device}, {sizes}, "
             f"{report['config']['repeats']} repeats, budget {report['budget']['budget_s']:g} s, wall "
             f"{report['budget']['wall_s']:.0f} s; {installed}" + (f" (not installed: {absent})" if absent else "")
             + f". Numbers: `{json_path}` (medians of the repeats; ratio = speed-up of ours over the baseline, "
             "> 1 = ours faster). GPU targets are the floors and predictions below.", "",
             "| what | baseline | ours | ratio | GPU target |", "|---|---|---|---|---|"]
    lines += [table_row(r) for r in report["rows"]]
    return "\n".join(lines)


def update_doc(doc: Path, block: str) -> None:
    from genssl.engine.atomic import write_text_atomic

    text = doc.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{doc} needs exactly one {BEGIN} ... {END} pair where the table goes; add them, or pass "
                         "--no-doc")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    write_text_atomic(doc, f"{head}{BEGIN}\n{block}\n{END}{tail}")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole run (default 540)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 3 repeats on any device (CI)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--repeats", type=int, default=None, help="repeats per row (default: 3 quick, else 5)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--doc", type=Path, default=DOC, help="the doc whose run_all table is regenerated")
    p.add_argument("--no-doc", action="store_true", help="write the JSON only")
    # a section's child process (internal)
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--scale", choices=tuple(EST_S), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--rows-file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {a.budget_s:g}")
    if a.repeats is not None and a.repeats < 1:
        p.error(f"--repeats must be >= 1, got {a.repeats}")
    return a


def main(argv=None) -> Path | None:
    args = parse_args(argv)
    if args.section:
        child_main(args)
        return None
    report = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    quick = "-quick" if args.quick else ""
    path = args.out_dir / f"{report['date']}-{_slug(report['device']['name'])}-run-all{quick}.json"
    try:
        shown = str(path.resolve().relative_to(REPO))
    except ValueError:
        shown = str(path)
    from genssl.engine.atomic import write_json_atomic

    write_json_atomic(path, report)
    block = render(report, shown)
    if not args.no_doc:
        update_doc(args.doc, block)
        print(f"regenerated the table in {args.doc}")
    print(f"\n{block}\n\nwrote {path} (wall {report['budget']['wall_s']:.1f} s of {args.budget_s:g} s)")
    return path


if __name__ == "__main__":
    main()
