"""Benchmark of view generation: the plain diffusers eager loop vs every runnable backend of our
:class:`~genssl.generators.samplers.GuidedSampler`, on the same E-LDM, autoencoder, scheduler, steps,
guidance, batch and seeds; plus a sample-quality proxy of DPM-Solver++ (20 steps) against DDIM (50).

What is timed: one call = embeddings ``[B, E]`` → uint8 images ``[B, H, W, 3]`` on the host
(condition tokens, ``steps`` guided UNet steps, autoencoder decode, copy to the host), after
``--warmup`` untimed calls; the median of ``--repeats`` calls is reported, as views/s = B / median.

* ``diffusers_eager`` (the baseline): the loop every diffusers pipeline runs —
  ``scheduler.set_timesteps``; per step ``cat([x, x])`` → ``scale_model_input`` → ``unet(...).sample`` →
  ``chunk`` → ``ε_u + w(ε_c − ε_u)`` → ``scheduler.step``; latents kept in the UNet's dtype (as the
  pipelines do), then ``vae.decode``.
* ``ours_<backend>``: ``GuidedSampler(..., backend=<backend>)`` for each of ``eager``, ``compile``,
  ``cudagraphs``, ``tensorrt`` that can run here (the others are recorded as skipped with the reason).
  The scheduler arithmetic stays in float32, the UNet step runs in ``--dtype``.

Every variant gets its own copy of the UNet in ``--dtype`` on the device (the master E-LDM stays on
the host); the autoencoder is shared, in ``--ae-dtype`` (default: ``--dtype`` on CUDA, as diffusers
pipelines run their VAE, fp32 on the CPU). ``decode_only`` times the autoencoder decode of one batch
alone, so the share of the UNet loop in a call can be read off. Peak memory (CUDA): ``torch.cuda.max_memory_allocated``
during the timed calls minus what was allocated before the variant was built (so: its UNet copy,
activations and scratch); TensorRT's own allocations are outside torch's allocator and show only in
``device_used_gb`` (``total − free`` after the calls, all processes). On the CPU no memory is reported.

Quality proxy (``quality`` in the JSON; same E-LDM, embeddings and seeds, ``--dtype``, eager step):
the reference is DDIM with ``--reference-steps`` (50) steps. For each candidate — DPM-Solver++ 2M with
``--quality-steps`` (20) steps, and DDIM with the same 20 steps for context — it reports

* ``pixel_mae``: mean absolute difference to the reference images, grey levels (0–255);
* ``latent_rmse``: RMS difference of the final latents (before decoding);
* with ``--encoder``: ``feature_cos``, the mean cosine similarity of the encoder embeddings
  ``normalize(f0(x))`` of paired images, and ``feature_frechet``, the Fréchet distance between the
  Gaussian statistics of the two sets' embeddings (FID's formula on the SSL encoder's features; with
  fewer samples than feature dimensions it is biased upwards — compare values at the same n only).

``ddim_reference_vs_2x`` (DDIM 50 vs DDIM 100) shows how converged the reference itself is. Lower
distance = closer to the 50-step DDIM solution of the same ODE; the proxy is meaningful for a
trained E-LDM (``--eldm``), and measures solver agreement, not realism.

Usage::

    python -m genssl.bench.generate                      # defaults: 256² images -> 32² latents, 20 steps, w=2,
                                                         # bf16, batch 64 (needs a CUDA GPU to be reasonable)
    python -m genssl.bench.generate --eldm runs/eldm256 --embeddings CACHE.safetensors --encoder runs/dino
    python -m genssl.bench.generate --quick              # tiny random models on the CPU (proves the script)

Writes ``bench/results/<YYYY-MM-DD>-<device>-generate.json`` (``...-generate-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from genssl.generators.autoencoder import (AutoencoderConfig, build_autoencoder, decode, load_pretrained_autoencoder,
                                           tiny_autoencoder_config, to_uint8)
from genssl.generators.backends import BACKENDS, backend_unavailable_reason
from genssl.generators.eldm import ELDM, ELDMConfig, load_eldm, tiny_eldm_config
from genssl.generators.samplers import GuidedSampler, _row_generators, make_scheduler

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("diffusers", "tensorrt", "onnxruntime", "deepspeed"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - absent is a fact to record
            out[name] = None
    return out


# ------------------------------------------------------------------------------------------------ models


def build_models(args, device: torch.device):
    """(E-LDM on the host in fp32, autoencoder on ``device`` in ``--ae-dtype``)."""
    if args.eldm:
        from genssl.recipes.eldm import GENERATOR_FILE, resolve_eldm_dir

        d = resolve_eldm_dir(args.eldm)
        eldm = load_eldm(d)
        ae_path = args.autoencoder
        if not ae_path and (d / GENERATOR_FILE).is_file():
            ae_path = json.loads((d / GENERATOR_FILE).read_text())["autoencoder"]["path"]
        if not ae_path:
            raise SystemExit("--eldm without generator.json needs --autoencoder PATH")
        ae = load_pretrained_autoencoder(ae_path)
    else:
        torch.manual_seed(0)
        if args.quick:
            eldm = ELDM(tiny_eldm_config(embed_dim=16, sample_size=args.image_size // 2))
            ae = build_autoencoder(tiny_autoencoder_config())
        else:
            f = 8
            eldm = ELDM(ELDMConfig(embed_dim=384, sample_size=args.image_size // f))  # METHODS §1.3 default UNet
            ae = build_autoencoder(AutoencoderConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                                     sample_size=args.image_size))  # SD-VAE-sized, f = 8
        if args.autoencoder:
            ae = load_pretrained_autoencoder(args.autoencoder)
    return eldm.float().eval(), ae.to(device=device, dtype=DTYPES[args.ae_dtype]).eval()


def embeddings_and_seeds(args, eldm) -> tuple[torch.Tensor, np.ndarray]:
    n = max(args.batch, args.quality_n)
    if args.embeddings:
        from safetensors.torch import load_file

        e = load_file(args.embeddings)["embeddings"][:n].float()
        if len(e) < n:
            e = e.repeat((n + len(e) - 1) // len(e), 1)[:n]
    else:
        g = torch.Generator().manual_seed(0)
        e = torch.nn.functional.normalize(torch.randn(n, eldm.config.embed_dim, generator=g), dim=-1)
    return e, np.arange(n, dtype=np.int64) + 12345


# ------------------------------------------------------------------------------------------------ variants


class DiffusersLoop:
    """The baseline: the classifier-free-guidance loop of diffusers' pipelines, UNet and latents in ``dtype``."""

    name = "diffusers_eager"

    def __init__(self, eldm: ELDM, ae, scheduler: str, steps: int, guidance: float, device, dtype):
        self.eldm, self.ae, self.scheduler, self.steps, self.guidance = eldm, ae, scheduler, steps, guidance
        self.device, self.dtype = device, dtype
        self.unet = copy.deepcopy(eldm.unet).to(device=device, dtype=dtype).eval()
        self.latent_shape = (eldm.config.latent_channels, eldm.config.sample_size, eldm.config.sample_size)

    def initial_latents(self, seeds) -> torch.Tensor:
        """The same initial noise per seed as ``GuidedSampler.initial_latents`` (so outputs are comparable)."""
        gens = _row_generators(seeds, stream=1)
        return torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens])

    @torch.inference_mode()
    def __call__(self, embeddings: torch.Tensor, seeds) -> np.ndarray:
        B = len(seeds)
        cond = self.eldm.condition(embeddings)                      # [B, 1, D] (host, fp32)
        uncond = self.eldm.null_tokens(B)
        tokens = torch.cat([uncond, cond]).to(self.device, self.dtype)
        sched = make_scheduler(self.scheduler, self.eldm.config)
        sched.set_timesteps(self.steps, device=self.device)
        latents = self.initial_latents(seeds).to(self.device, self.dtype) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents, latents]), t)
            eps = self.unet(x, t, encoder_hidden_states=tokens).sample
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + self.guidance * (eps_c - eps_u)
            latents = sched.step(eps, t, latents).prev_sample
        return to_uint8(decode(self.ae, latents.float())).cpu().numpy()


def _ours(eldm, ae, backend: str, scheduler: str, steps: int, guidance: float, device, dtype, batch: int,
          cache_dir=None) -> GuidedSampler:
    kw = {"cache_dir": cache_dir} if backend == "tensorrt" and cache_dir else {}
    return GuidedSampler(eldm, ae, scheduler=scheduler, steps=steps, guidance=guidance, backend=backend,
                         device=device, dtype=dtype, max_batch=batch, **kw)


def time_variant(build, run, device: torch.device, repeats: int, warmup: int) -> dict:
    """Build (timed), warm up, then time ``repeats`` calls; memory as in the module docstring."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    obj = build()
    _sync(device)
    out = {"build_s": time.perf_counter() - t0}
    for _ in range(warmup):
        run(obj)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        images = run(obj)
        _sync(device)
        times.append(time.perf_counter() - t)
    out["times_s"] = times
    out["median_s"] = statistics.median(times)
    if device.type == "cuda":
        out["peak_mem_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        free, total = torch.cuda.mem_get_info(device)
        out["device_used_gb"] = (total - free) / 2**30
    else:
        out["peak_mem_gb"] = None
    out["status"] = "ok"
    del obj
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out, images


# ------------------------------------------------------------------------------------------------ quality


@torch.inference_mode()
def _latents_and_images(sampler: GuidedSampler, e: torch.Tensor, seeds: np.ndarray, batch: int):
    lat, img = [], []
    for s in range(0, len(seeds), batch):
        x = sampler.sample_latents(e[s:s + batch], seeds[s:s + batch])
        lat.append(x.float().cpu())
        img.append(sampler.decode(x))
    return torch.cat(lat), np.concatenate(img)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) (float64; the square root from the eigenvalues of ΣaΣb)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(ca @ cb)
    tr_sqrt = float(np.sqrt(np.clip(eig.real, 0, None)).sum())
    return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt)


def quality_proxy(args, eldm, ae, e: torch.Tensor, seeds: np.ndarray, device, dtype) -> dict:
    n = args.quality_n
    e, seeds = e[:n], seeds[:n]
    encoder = None
    if args.encoder:
        from genssl.engine.export import load_encoder
        from genssl.generators.training import encoder_input

        encoder, meta = load_encoder(args.encoder, device)
        spec = encoder_input(meta)
        mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)

    def features(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.interpolate(x, size=(spec.size, spec.size), mode="bilinear", antialias=True,
                                            align_corners=False)
        with torch.inference_mode():
            f = torch.cat([encoder((x[i:i + 64] - mean) / std).float() for i in range(0, len(x), 64)])
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()

    def run(scheduler: str, steps: int):
        sampler = _ours(eldm, ae, "eager", scheduler, steps, args.guidance, device, dtype, args.batch)
        return _latents_and_images(sampler, e, seeds, args.batch)

    ref_lat, ref_img = run("ddim", args.reference_steps)
    ref_feat = features(ref_img) if encoder is not None else None

    def compare(lat, img) -> dict:
        d = {"pixel_mae": float(np.abs(img.astype(np.float64) - ref_img).mean()),
             "latent_rmse": float((lat - ref_lat).pow(2).mean().sqrt())}
        if encoder is not None:
            f = features(img)
            d["feature_cos"] = float((f * ref_feat).sum(1).mean())
            d["feature_frechet"] = _frechet(f, ref_feat)
        return d

    out = {"reference": f"ddim {args.reference_steps} steps", "n": n, "dtype": args.dtype,
           "guidance": args.guidance, "encoder": args.encoder or None}
    out[f"dpmpp_2m_{args.quality_steps}"] = compare(*run("dpmpp_2m", args.quality_steps))
    out[f"ddim_{args.quality_steps}"] = compare(*run("ddim", args.quality_steps))
    out["ddim_reference_vs_2x"] = compare(*run("ddim", 2 * args.reference_steps))
    return out


# ------------------------------------------------------------------------------------------------ main


def _derive(key: str, r: dict, base: dict, images: dict, batch: int) -> None:
    """Adds views/s, the speed-up over the diffusers loop and the image difference to it; prints the line."""
    if r["status"] != "ok":
        print(f"  {key:>16}: {r['status']} ({r.get('reason') or r.get('error')})", flush=True)
        return
    r["views_per_s"] = batch / r["median_s"]
    if key == "decode_only":
        print(f"  {key:>16}: {r['median_s'] * 1e3:.1f} ms/batch (autoencoder decode alone)", flush=True)
        return
    r["speedup_vs_diffusers"] = base["median_s"] / r["median_s"]
    if key in images and key != "diffusers_eager":
        r["mean_abs_diff_grey_vs_diffusers"] = float(np.abs(images[key].astype(np.float64) -
                                                            images["diffusers_eager"]).mean())
    mem = "" if r.get("peak_mem_gb") is None else f", peak +{r['peak_mem_gb']:.2f} GB"
    print(f"  {key:>16}: {r['views_per_s']:8.2f} views/s (median {r['median_s'] * 1e3:.1f} ms/batch, "
          f"x{r['speedup_vs_diffusers']:.2f} vs diffusers{mem}, build {r['build_s']:.1f} s)", flush=True)


def run(args, on_result=None, skip_reason=None) -> dict:
    """The whole benchmark (module docstring). ``on_result(key, result)`` is called as each variant is
    done (bench/run_all.py keeps what finished when its budget stops it); ``skip_reason(backend)``
    may return why a runnable backend is left out this time (a time budget), recorded as skipped."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    eldm, ae = build_models(args, device)
    e, seeds = embeddings_and_seeds(args, eldm)
    eb, sb = e[:args.batch], seeds[:args.batch]
    image_side = eldm.config.sample_size * 2 ** (len(ae.config.block_out_channels) - 1)
    print(f"device {_device_name(device)}: E-LDM {eldm.num_parameters() / 1e6:.1f} M params, latents "
          f"{eldm.config.latent_channels}x{eldm.config.sample_size}², images {image_side}², batch {args.batch}, "
          f"{args.scheduler} {args.steps} steps, w={args.guidance}, {args.dtype}", flush=True)

    results, images = {}, {}

    def done(key: str) -> None:
        _derive(key, results[key], results["diffusers_eager"], images, args.batch)
        if on_result is not None:
            on_result(key, results[key])

    results["diffusers_eager"], images["diffusers_eager"] = time_variant(
        lambda: DiffusersLoop(eldm, ae, args.scheduler, args.steps, args.guidance, device, dtype),
        lambda loop: loop(eb, sb), device, args.repeats, args.warmup)
    done("diffusers_eager")
    z = torch.randn(args.batch, eldm.config.latent_channels, eldm.config.sample_size, eldm.config.sample_size,
                    generator=torch.Generator().manual_seed(1)).to(device)
    results["decode_only"], _ = time_variant(lambda: None, lambda _: to_uint8(decode(ae, z)).cpu().numpy(), device,
                                             args.repeats, args.warmup)
    done("decode_only")
    for backend in args.backends:
        key = f"ours_{backend}"
        reason = backend_unavailable_reason(backend, device) or (skip_reason and skip_reason(backend))
        if reason:
            results[key] = {"status": "skipped", "reason": reason}
        else:
            try:
                results[key], images[key] = time_variant(
                    lambda b=backend: _ours(eldm, ae, b, args.scheduler, args.steps, args.guidance, device, dtype,
                                            args.batch, args.trt_cache),
                    lambda s: s.sample(eb, sb), device, args.repeats, args.warmup)
            except Exception as err:  # noqa: BLE001 - a failing backend is a result, not a crash
                results[key] = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:500]}
        done(key)

    quality = None
    if not args.no_quality:
        quality = quality_proxy(args, eldm, ae, e, seeds, device, dtype)
        for k, v in quality.items():
            if isinstance(v, dict):
                print(f"  quality {k} vs {quality['reference']}: " + ", ".join(f"{m} {x:.4g}" for m, x in v.items()))
    return {
        "benchmark": "view generation: embeddings -> uint8 images (guided sampling + decode)",
        "date": _dt.date.today().isoformat(),
        "device": _device_name(device),
        "device_type": device.type,
        "versions": _versions(),
        "config": {"eldm": args.eldm or "random init", "autoencoder": args.autoencoder or ("from eldm" if args.eldm else "random init"),
                   "eldm_params_m": eldm.num_parameters() / 1e6, "latent_shape": [eldm.config.latent_channels,
                   eldm.config.sample_size, eldm.config.sample_size], "image_size": image_side,
                   "batch": args.batch, "steps": args.steps, "scheduler": args.scheduler, "guidance": args.guidance,
                   "dtype": args.dtype, "ae_dtype": args.ae_dtype, "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
                   "embeddings": args.embeddings or "random unit vectors"},
        "results": results,
        "quality": quality,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random models on the CPU (proves the script)")
    p.add_argument("--eldm", default="", help="E-LDM run dir / eldm folder (default: a random-init METHODS-size E-LDM)")
    p.add_argument("--autoencoder", default="", help="diffusers autoencoder folder (default: the E-LDM's, or random init)")
    p.add_argument("--embeddings", default="", help="embedding cache .safetensors (key 'embeddings'); default random")
    p.add_argument("--encoder", default="", help="encoder run dir / .safetensors for the feature metrics of the quality proxy")
    p.add_argument("--image-size", type=int, default=None, help="random-init models: image side (latent = side/8)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--scheduler", choices=("ddim", "dpmpp_2m"), default="dpmpp_2m")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="UNet dtype (default bf16; fp32 with --quick)")
    p.add_argument("--ae-dtype", choices=sorted(DTYPES), default=None,
                   help="autoencoder dtype (default: --dtype on CUDA, fp32 on the CPU)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--quality-n", type=int, default=None, help="images of the quality proxy")
    p.add_argument("--quality-steps", type=int, default=None, help="steps of the candidates (DPM-Solver++ and DDIM)")
    p.add_argument("--reference-steps", type=int, default=None, help="DDIM steps of the reference")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--trt-cache", default=None, help="TensorRT engine cache folder")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    a = p.parse_args(argv)
    q = a.quick
    a.image_size = a.image_size or (16 if q else 256)
    a.batch = a.batch or (4 if q else 64)
    a.steps = a.steps or (4 if q else 20)
    a.dtype = a.dtype or ("fp32" if q else "bf16")
    on_cuda = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    a.ae_dtype = a.ae_dtype or (a.dtype if on_cuda else "fp32")
    # compile takes ~30-60 s per model on 2 CPU cores: --quick leaves it out unless asked for
    a.backends = a.backends or (["eager"] if q else list(BACKENDS))
    a.repeats = a.repeats or (2 if q else 5)
    a.warmup = (1 if q else 2) if a.warmup is None else a.warmup
    a.quality_n = a.quality_n or (4 if q else 64)
    a.quality_steps = a.quality_steps or (4 if q else 20)
    a.reference_steps = a.reference_steps or (8 if q else 50)
    return a


def main(argv=None) -> Path:
    args = parse_args(argv)
    report = run(args)
    report["config"]["out_dir"] = str(args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['date']}-{_slug(report['device'])}-generate" + ("-quick" if args.quick else "")
    path = args.out_dir / f"{stem}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
