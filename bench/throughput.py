"""Images/s and peak memory of the DINO training system, on whatever device exists.

    python bench/throughput.py                         # CPU-sized (smoke crops, vit_tiny)
    python bench/throughput.py --preset imagenet       # 2x224 + 8x96 crops, ViT-S/16, bf16 (a GPU)

Three measurements, each the median over repeats (data) or over logging windows after warm-up (train):
  (a) data pipeline alone: DALI vs the PyTorch DataLoader+PIL baseline, same augmentations;
  (b) the training step (real engine: DeepSpeed, EMA teacher, DINO loss) on synthetic input;
  (c) end to end: the DALI pipeline feeding the training step.
Prints a table and writes bench/results/<date>-<device>.json (device, versions, config, results).
On CUDA it also measures the bf16 matmul rate and reports the training step's model FLOP/s against it.

The pieces are functions for bench/run_all.py: `bench_config`, `time_loader` (+ `dali_loader`,
`torch_loader`), `train_step` (DINO or, with ``gen_dino=True``, Gen-DINO on synthetic batches that
carry interpolated views: docs/METHODS.md §1.6) and `flops_report`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from genssl.data.builtin import resolve_data
from genssl.data.index import build_index
from genssl.data.synthetic import SyntheticMultiCropLoader
from genssl.engine.atomic import write_json_atomic
from genssl.engine.config import parse_config
from genssl.engine.distributed import setup_distributed
from genssl.engine.trainer import compute_dtype, fit
from genssl.models.gendino import GenDINOConfig, GenDINOObjective
from genssl.models.objectives import DINOObjective, build_dino_student
from genssl.recipes.dino import PRESETS, DINORecipeConfig

BENCH_PRESETS = {
    # name: (recipe preset, data spec). ImageNet-size JPEGs: the built-in set rendered at 448 px.
    "smoke": ("smoke", "builtin:shapes?size=64&per_class=100&val_per_class=1"),
    "imagenet": ("imagenet", "builtin:shapes?size=448&per_class=100&val_per_class=1"),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.processor() or platform.machine()}-{os.cpu_count()}cores"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS


def bf16_matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float | None:
    """The device's measured bf16 matmul rate (the denominator of every utilisation figure)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def bench_config(preset: str = "smoke", workers: int = 2, overrides: list[str] | tuple = ()) -> DINORecipeConfig:
    """The recipe config of a bench preset: no progress bar, checkpoint, k-NN or TensorBoard; logging
    windows of 5 steps (the training step's repeats); ``overrides`` are recipe ``key=value``s."""
    recipe_preset, _ = BENCH_PRESETS[preset]
    keys = [f"preset={recipe_preset}", "log.progress=false", "log.every_steps=5", "log.tensorboard=false",
            "ckpt.every_steps=0", "eval.knn=false", f"num_workers={workers}", *overrides]
    return parse_config(keys, DINORecipeConfig, PRESETS).config


# ------------------------------------------------------------------------------------------------ (a) data


def dali_loader(index, cfg, workers: int, device_id: int | None):
    from genssl.data.dali_loader import DaliMultiCropLoader  # DALI only where the data is measured

    return DaliMultiCropLoader(index, cfg.crops, cfg.batch_size, 0, 1, cfg.seed, device_id=device_id,
                               num_threads=workers)


def torch_loader(index, cfg, workers: int):
    from genssl.data.torch_loader import TorchMultiCropLoader

    return TorchMultiCropLoader(index, cfg.crops, cfg.batch_size, 0, 1, cfg.seed, num_workers=workers)


def time_loader(loader, batches: int, repeats: int, device: torch.device) -> dict:
    """Median images/s over ``repeats`` passes of ``batches`` batches (first batch of each pass = warm-up)."""
    rates = []
    for r in range(repeats):
        loader.set_epoch(r)
        it = iter(loader.iter_from(0))
        next(it)
        start, n = time.perf_counter(), 0
        for _ in range(batches):
            crops, idx = next(it)
            n += len(idx)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(n / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "repeats": rates}


# ------------------------------------------------------------------------------------------------ (b) train


class SyntheticGenSISLoader(SyntheticMultiCropLoader):
    """Gen-DINO batches without files: the multi-crop batch plus an interpolated view ``interp`` and the
    partner's global crop ``partner`` (both ``[B, 3, G, G]``) and the weight ``alpha`` ``[B]`` —
    the fields of `genssl.data.gensis_loader.GenSISBatch` that `GenDINOObjective` reads."""

    def iter_from(self, step: int = 0):
        for crops, idx in super().iter_from(step):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx[0]))
            shape = crops[0].shape
            yield {"crops": crops, "indices": idx,
                   "interp": torch.randn(shape, generator=g).to(self.device),
                   "partner": torch.randn(shape, generator=g).to(self.device),
                   "alpha": torch.rand(shape[0], generator=g)}


def synthetic_loader(cfg, steps: int, device: torch.device, gen_dino: bool = False) -> SyntheticMultiCropLoader:
    spec = cfg.crops
    cls = SyntheticGenSISLoader if gen_dino else SyntheticMultiCropLoader
    return cls(steps * cfg.batch_size, cfg.batch_size, 0, 1, cfg.seed, global_size=spec.global_size,
               local_size=spec.local_size, n_global=spec.n_global, n_local=spec.n_local, device=device)


def _window_rates(run_dir: str) -> list[float]:
    """images/s of each logging window but the first (start-up: compilation, warm-up)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["images_per_s"] for line in lines if line.strip()]
    return rates[1:] or rates


def train_run(cfg, dist, loader, run_dir: str, gen_dino: bool = False) -> dict:
    """One `fit` of one epoch over ``loader``: ``images_per_s`` is the median of the logging windows
    after the first (``repeats``); peak memory as `peak_gb`."""
    student = build_dino_student(cfg.model, cfg.crops.global_size, cfg.patch_size, cfg.dino, cfg.stem_stride, cfg.width)
    dtype = compute_dtype(cfg.precision)
    if gen_dino:
        objective = GenDINOObjective(student, cfg.dino, cfg.crops.n_global, cfg.epochs, dtype, GenDINOConfig())
    else:
        objective = DINOObjective(student, cfg.dino, cfg.crops.n_global, cfg.epochs, dtype)
    reset_peak(dist.device)
    fit(cfg, dist, student, objective, loader, run_dir, late_params=student.head.last_layer_parameters())
    rates = _window_rates(run_dir)
    return {"images_per_s": statistics.median(rates), "repeats": rates, "peak_mem_gb": peak_gb(dist.device)}


def train_step(cfg, dist, steps: int, run_dir: str, gen_dino: bool = False) -> dict:
    """The training step on synthetic input for ``steps`` steps (one epoch; ``cfg.epochs`` is set to 1)."""
    cfg.epochs = 1
    return train_run(cfg, dist, synthetic_loader(cfg, steps, dist.device, gen_dino), run_dir, gen_dino)


def step_flops(student, crops: list[torch.Tensor]) -> float:
    """Model FLOPs of one student forward+backward plus the teacher's forward on the global crops."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        student(crops).float().sum().backward()
    student.zero_grad(set_to_none=True)
    fwd_bwd = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        student(crops[:2])
    return fwd_bwd + counter.get_total_flops()


def flops_report(cfg, device: torch.device, images_per_s: float) -> dict:
    """GFLOP per DINO step (`step_flops`), the model TFLOP/s at ``images_per_s`` and, on CUDA, its
    fraction of the measured bf16 matmul rate."""
    spec, dtype = cfg.crops, compute_dtype(cfg.precision)
    crops = [c.to(dtype) for c in next(iter(synthetic_loader(cfg, 1, device).iter_from(0)))[0]]
    student = build_dino_student(cfg.model, spec.global_size, cfg.patch_size, cfg.dino, cfg.stem_stride,
                                 cfg.width).to(device=device, dtype=dtype)
    flops = step_flops(student, crops)
    out = {"gflop_per_step": flops / 1e9, "model_tflops": flops * images_per_s / cfg.batch_size / 1e12}
    peak = bf16_matmul_tflops(device)
    if peak:
        out["bf16_matmul_tflops"] = peak
        out["fraction_of_bf16_matmul"] = out["model_tflops"] / peak
    return out


def versions() -> dict:
    import deepspeed

    try:
        import nvidia.dali as dali_module

        dali_version = dali_module.__version__
    except ImportError:
        dali_version = None
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "dali": dali_version,
            "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(BENCH_PRESETS), default="smoke")
    parser.add_argument("--data", default=None, help="data spec (default: built-in shapes at the preset's size)")
    parser.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default: the preset's)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per measurement")
    parser.add_argument("--batches", type=int, default=10, help="loader batches per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 2))
    parser.add_argument("--skip", nargs="*", default=[], choices=["data", "train", "e2e"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides, e.g. model=vit_base precision=fp32")
    args = parser.parse_args(argv)

    data_spec = args.data or BENCH_PRESETS[args.preset][1]
    overrides = [*args.overrides] + ([f"batch_size={args.batch_size}"] if args.batch_size else [])
    cfg = bench_config(args.preset, args.workers, overrides)
    dist = setup_distributed()
    device = dist.device
    device_id = dist.local_rank if device.type == "cuda" else None

    spec, bs = cfg.crops, cfg.batch_size
    results: dict = {}
    if not {"data", "e2e"} <= set(args.skip):
        index = build_index(resolve_data(data_spec).train)
    if "data" not in args.skip:
        results["data_dali"] = time_loader(dali_loader(index, cfg, args.workers, device_id), args.batches,
                                           args.repeats, device)
        results["data_torch_pil"] = time_loader(torch_loader(index, cfg, args.workers), args.batches, args.repeats,
                                                device)
        results["data_speedup"] = results["data_dali"]["images_per_s"] / results["data_torch_pil"]["images_per_s"]

    # Steps per "epoch" = args.steps, one epoch: logging windows of 5 steps give the median rate.
    cfg.epochs = 1
    with tempfile.TemporaryDirectory() as tmp:
        if "train" not in args.skip:
            results["train_step_synthetic"] = train_step(cfg, dist, args.steps, f"{tmp}/train")
            flops = flops_report(cfg, device, results["train_step_synthetic"]["images_per_s"])
            if "bf16_matmul_tflops" in flops:
                results["bf16_matmul_tflops"] = flops.pop("bf16_matmul_tflops")
            results["train_step_synthetic"].update(flops)
        if "e2e" not in args.skip:
            n = min(len(index), args.steps * bs)
            dali = dali_loader(index, cfg, args.workers, device_id)
            if len(dali) < 2:
                raise ValueError(f"{len(index)} images give fewer than 2 batches of {bs}; use more data or --batch-size")
            results["end_to_end"] = train_run(cfg, dist, dali, f"{tmp}/e2e")
            results["end_to_end"]["images"] = n

    record = {
        "date": datetime.date.today().isoformat(), "device": device_name(device), "bench": "throughput",
        "versions": versions(),
        "config": {"preset": args.preset, "data": data_spec, "model": cfg.model, "patch_size": cfg.patch_size,
                   "precision": cfg.precision, "batch_size": bs, "zero_stage": cfg.zero_stage,
                   "crops": f"{spec.n_global}x{spec.global_size} + {spec.n_local}x{spec.local_size}",
                   "steps": args.steps, "batches": args.batches, "repeats": args.repeats, "workers": args.workers},
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['date']}-{record['device'].replace(' ', '_').replace('/', '_')}.json"
    write_json_atomic(path, record)

    print(f"\n{record['device']} | {record['config']['model']} {record['config']['crops']} | batch {bs} | {cfg.precision}")
    print(f"{'measurement':32s} {'images/s':>10s} {'peak GB':>8s}")
    for name, r in results.items():
        if isinstance(r, dict) and "images_per_s" in r:
            print(f"{name:32s} {r['images_per_s']:10.1f} {r.get('peak_mem_gb', float('nan')):8.2f}")
    if "data_speedup" in results:
        print(f"DALI / DataLoader+PIL: {results['data_speedup']:.2f}x")
    if "fraction_of_bf16_matmul" in results.get("train_step_synthetic", {}):
        print(f"training step: {results['train_step_synthetic']['model_tflops']:.1f} TFLOP/s = "
              f"{100 * results['train_step_synthetic']['fraction_of_bf16_matmul']:.1f} % of measured bf16 matmul "
              f"({results['bf16_matmul_tflops']:.0f} TFLOP/s)")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
