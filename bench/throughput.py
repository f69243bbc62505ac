"""Images/s and peak memory of the DINO training system, on whatever device exists.

    python bench/throughput.py                         # CPU-sized (smoke crops, vit_tiny)
    python bench/throughput.py --preset imagenet       # 2x224 + 8x96 crops, ViT-S/16, bf16 (a GPU)

Three measurements, each the median over repeats (data) or over logging windows after warm-up (train):
  (a) data pipeline alone: DALI vs the PyTorch DataLoader+PIL baseline, same augmentations;
  (b) the training step (real engine: DeepSpeed, EMA teacher, DINO loss) on synthetic input;
  (c) end to end: the DALI pipeline feeding the training step.
Prints a table and writes bench/results/<date>-<device>.json (device, versions, config, results).
On CUDA it also measures the bf16 matmul rate and reports the training step's model FLOP/s against it.
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
from genssl.engine.config import parse_config
from genssl.engine.distributed import setup_distributed
from genssl.engine.trainer import compute_dtype, fit
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


def train_run(cfg, dist, loader, run_dir: str) -> dict:
    student = build_dino_student(cfg.model, cfg.crops.global_size, cfg.patch_size, cfg.dino, cfg.stem_stride)
    objective = DINOObjective(student, cfg.dino, cfg.crops.n_global, cfg.epochs, compute_dtype(cfg.precision))
    reset_peak(dist.device)
    _, result = fit(cfg, dist, student, objective, loader, run_dir, late_params=student.head.last_layer_parameters())
    return {"images_per_s": result.images_per_s, "peak_mem_gb": peak_gb(dist.device)}


def main() -> None:
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
    args = parser.parse_args()

    recipe_preset, data_spec = BENCH_PRESETS[args.preset]
    overrides = [f"preset={recipe_preset}", "log.progress=false", "log.every_steps=5", "ckpt.every_steps=0",
                 "eval.knn=false", f"num_workers={args.workers}", *args.overrides]
    if args.batch_size:
        overrides.append(f"batch_size={args.batch_size}")
    cfg = parse_config(overrides, DINORecipeConfig, PRESETS).config
    dist = setup_distributed()
    device = dist.device
    device_id = dist.local_rank if device.type == "cuda" else None

    spec, bs = cfg.crops, cfg.batch_size
    results: dict = {}
    needs_files = not {"data", "e2e"} <= set(args.skip)
    if needs_files:  # DALI is imported only here: the training-step bench runs without it
        from genssl.data.dali_loader import DaliMultiCropLoader
        from genssl.data.torch_loader import TorchMultiCropLoader

        index = build_index(resolve_data(args.data or data_spec).train)
    if "data" not in args.skip:
        dali = DaliMultiCropLoader(index, spec, bs, 0, 1, cfg.seed, device_id=device_id, num_threads=args.workers)
        torch_loader = TorchMultiCropLoader(index, spec, bs, 0, 1, cfg.seed, num_workers=args.workers)
        results["data_dali"] = time_loader(dali, args.batches, args.repeats, device)
        results["data_torch_pil"] = time_loader(torch_loader, args.batches, args.repeats, device)
        results["data_speedup"] = results["data_dali"]["images_per_s"] / results["data_torch_pil"]["images_per_s"]

    # Steps per "epoch" = args.steps, one epoch: logging windows of 5 steps give the median rate.
    cfg.epochs = 1
    with tempfile.TemporaryDirectory() as tmp:
        if "train" not in args.skip:
            synthetic = SyntheticMultiCropLoader(args.steps * bs, bs, 0, 1, cfg.seed, global_size=spec.global_size,
                                                 local_size=spec.local_size, n_global=spec.n_global, n_local=spec.n_local,
                                                 device=device)
            results["train_step_synthetic"] = train_run(cfg, dist, synthetic, f"{tmp}/train")
            crops = [c.to(compute_dtype(cfg.precision)) for c in next(iter(synthetic.iter_from(0)))[0]]
            student = build_dino_student(cfg.model, spec.global_size, cfg.patch_size, cfg.dino).to(device)
            student = student.to(compute_dtype(cfg.precision))
            flops = step_flops(student, crops)
            results["train_step_synthetic"]["gflop_per_step"] = flops / 1e9
            achieved = flops * results["train_step_synthetic"]["images_per_s"] / bs / 1e12
            results["train_step_synthetic"]["model_tflops"] = achieved
            peak = bf16_matmul_tflops(device)
            if peak:
                results["bf16_matmul_tflops"] = peak
                results["train_step_synthetic"]["fraction_of_bf16_matmul"] = achieved / peak
        if "e2e" not in args.skip:
            n = min(len(index), args.steps * bs)
            dali = DaliMultiCropLoader(index, spec, bs, 0, 1, cfg.seed, device_id=device_id, num_threads=args.workers)
            if len(dali) < 2:
                raise ValueError(f"{len(index)} images give fewer than 2 batches of {bs}; use more data or --batch-size")
            results["end_to_end"] = train_run(cfg, dist, dali, f"{tmp}/e2e")
            results["end_to_end"]["images"] = n

    import deepspeed

    try:
        import nvidia.dali as dali_module

        dali_version = dali_module.__version__
    except ImportError:
        dali_version = None
    record = {
        "date": datetime.date.today().isoformat(), "device": device_name(device), "bench": "throughput",
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "dali": dali_version,
                     "python": platform.python_version()},
        "config": {"preset": args.preset, "data": args.data or data_spec, "model": cfg.model, "patch_size": cfg.patch_size,
                   "precision": cfg.precision, "batch_size": bs, "zero_stage": cfg.zero_stage,
                   "crops": f"{spec.n_global}x{spec.global_size} + {spec.n_local}x{spec.local_size}",
                   "steps": args.steps, "batches": args.batches, "repeats": args.repeats, "workers": args.workers},
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['date']}-{record['device'].replace(' ', '_').replace('/', '_')}.json"
    path.write_text(json.dumps(record, indent=2))

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


if __name__ == "__main__":
    main()
