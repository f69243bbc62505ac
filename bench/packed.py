"""Benchmark: one training step of a ViT DINO student, packed multi-crop vs per-resolution (models/packed_vit.py).

:func:`packed_vs_per_resolution` builds one student (ViT backbone + DINO head), copies it, makes the
copy packed (``multicrop=packed``, ``attention=`` as given) and times, for each, a step's forward and
backward over the same crops (``n_global`` × ``global_size``² + ``n_local`` × ``local_size``², batch
``batch_size``). The optimizer update is left out: it is the same for both. Timing: median (and min)
over ``repeats`` steps after ``warmup`` steps, the two variants interleaved so that drift on a shared
machine hits both alike; ``torch.cuda.synchronize`` around each step on a GPU, ``time.perf_counter``.

It returns a JSON-able dict (no file written), the row bench/run_all.py puts in its table::

    {"benchmark", "device", "model", "patch_size", "crops": "2x32+6x16", "batch_size", "dtype",
     "attention": the kernel the packed pass ran ("sdpa" | "xformers"), "threads", "repeats",
     "per_resolution_ms": {"median", "min"}, "packed_ms": {"median", "min"},
     "speedup": per_resolution median / packed median,
     "max_abs_diff": largest |packed − per-resolution| over the student outputs of the first step,
     "tokens_per_sample": S = Σ_i T_i, "attention_scores_per_sample": {"block_diagonal": Σ T_i², "dense_masked": S²}}

``attention_scores_per_sample`` says what the kernels compute: xformers only the diagonal blocks,
sdpa with the explicit mask all S² scores. Sizes: the defaults are the CPU quick setting (the cifar
preset's ViT-Tiny/4 with 2×32 + 6×16 crops); on a GPU, DINO's setting is
``packed_vs_per_resolution(model="vit_small", patch_size=16, global_size=224, local_size=96, n_local=8,
batch_size=64, dtype="bf16", device="cuda")``. ``attention="xformers"`` without xformers or CUDA raises
ValueError (models/packed_vit.py `resolve_attention`); "auto" always runs.

    python -m genssl.bench.packed                 # the CPU quick setting, prints the dict as JSON
    python -m genssl.bench.packed --gpu           # DINO's ViT-S/16 setting on CUDA
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from genssl.models.backbones import build_backbone
from genssl.models.dino import DINOHead, MultiCropWrapper
from genssl.models.packed_vit import resolve_attention, set_multicrop

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


def _step(student, crops, dtype: torch.dtype) -> torch.Tensor:
    """Forward + backward of a DINO-like loss; returns the detached outputs."""
    student.zero_grad(set_to_none=True)
    device = crops[0].device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = student(crops)
    loss = torch.logsumexp(out.float() / 0.1, dim=-1).mean()  # a softmax over prototypes, as DINO's loss
    loss.backward()
    return out.detach().float()


def _timed(student, crops, dtype, device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = _step(student, crops, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3, out


def packed_vs_per_resolution(model: str = "vit_tiny", patch_size: int = 4, global_size: int = 32, local_size: int = 16,
                             n_global: int = 2, n_local: int = 6, batch_size: int = 32, repeats: int = 10,
                             warmup: int = 2, device: str | None = None, attention: str = "auto", dtype: str = "fp32",
                             head_out_dim: int = 4096, seed: int = 0) -> dict:
    """Step time of the ViT student, packed vs per-resolution, on ``device`` (default: CUDA if present); see the
    module docstring for the returned dict."""
    if not model.startswith("vit_"):
        raise ValueError(f"packed multi-crop runs ViTs; got model={model!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kernel = resolve_attention(attention, dev)  # raises for xformers without xformers / CUDA
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not valid; choose one of: {', '.join(DTYPES)}")
    torch.manual_seed(seed)
    backbone = build_backbone(model, img_size=global_size, patch_size=patch_size)
    per_res = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, out_dim=head_out_dim, hidden_dim=1024,
                                                  bottleneck_dim=256)).to(dev)
    packed = set_multicrop(copy.deepcopy(per_res), "packed", attention)
    g = torch.Generator().manual_seed(seed)
    sizes = [global_size] * n_global + [local_size] * n_local
    crops = [torch.randn(batch_size, 3, s, s, generator=g).to(dev) for s in sizes]

    times: dict[str, list[float]] = {"per_resolution": [], "packed": []}
    outputs = {}
    for i in range(warmup + repeats):
        for name, student in (("per_resolution", per_res), ("packed", packed)):  # interleaved
            ms, out = _timed(student, crops, DTYPES[dtype], dev)
            if i == 0:
                outputs[name] = out
            if i >= warmup:
                times[name].append(ms)
    tokens = [1 + (s // patch_size) ** 2 for s in sizes]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "ViT student step (forward+backward): packed multi-crop vs per-resolution",
        "device": _device_name(dev), "model": model, "patch_size": patch_size,
        "crops": f"{n_global}x{global_size}+{n_local}x{local_size}", "batch_size": batch_size, "dtype": dtype,
        "attention": kernel, "threads": torch.get_num_threads(), "repeats": repeats,
        "per_resolution_ms": {"median": round(med["per_resolution"], 3), "min": round(min(times["per_resolution"]), 3)},
        "packed_ms": {"median": round(med["packed"], 3), "min": round(min(times["packed"]), 3)},
        "speedup": round(med["per_resolution"] / med["packed"], 3),
        "max_abs_diff": float((outputs["packed"] - outputs["per_resolution"]).abs().max()),
        "tokens_per_sample": sum(tokens),
        "attention_scores_per_sample": {"block_diagonal": sum(t * t for t in tokens), "dense_masked": sum(tokens) ** 2},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="DINO's ViT-S/16 setting (2x224 + 8x96, batch 64, bf16) on CUDA")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers"])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    sizes = (dict(model="vit_small", patch_size=16, global_size=224, local_size=96, n_local=8, batch_size=64,
                  dtype="bf16", device="cuda", head_out_dim=65536) if args.gpu else {})
    if args.batch_size is not None:
        sizes["batch_size"] = args.batch_size
    result = packed_vs_per_resolution(**sizes, attention=args.attention, repeats=args.repeats)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
