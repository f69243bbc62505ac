"""Step backends: interchangeable implementations of the guided UNet step
``(latents, t, cond_tokens, uncond_tokens, w) -> ε`` (:func:`genssl.generators.eldm.guided_eps`).

| name         | what                                                          | runs on            |
|--------------|---------------------------------------------------------------|--------------------|
| `eager`      | plain PyTorch                                                 | CPU, CUDA          |
| `compile`    | ``torch.compile`` (CUDA: mode ``max-autotune-no-cudagraphs``)  | CPU (needs a C++ compiler), CUDA |
| `cudagraphs` | the eager step captured in one CUDA graph per batch size       | CUDA               |
| `tensorrt`   | ONNX → TensorRT engine (:mod:`genssl.generators.export`)       | CUDA + `tensorrt`  |

:func:`make_step_backend` fails AT START (``ValueError`` for an unknown name, ``RuntimeError`` for a
backend this machine cannot run) with a message naming the backends that can run here. Every backend
returns float32 ε, whatever its compute dtype.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from genssl.generators.eldm import GuidedStep

__all__ = ["BACKENDS", "StepShapes", "StepBackend", "make_step_backend", "backend_unavailable_reason",
           "runnable_backends"]

BACKENDS = ("eager", "compile", "cudagraphs", "tensorrt")


@dataclass
class StepShapes:
    """Shapes the step is built for: latents ``[B, latent_channels, height, width]``, tokens
    ``[B, 1, token_dim]``, B in ``[min_batch, max_batch]`` (``opt_batch``: the batch tuned for)."""

    latent_channels: int
    height: int
    width: int
    token_dim: int
    max_batch: int = 16
    opt_batch: int | None = None
    min_batch: int = 1

    def __post_init__(self):
        if self.opt_batch is None:
            self.opt_batch = self.max_batch
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"StepShapes: need 1 ≤ min_batch ≤ opt_batch ≤ max_batch, got "
                             f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")

    @classmethod
    def from_eldm(cls, eldm, max_batch: int = 16, **kw) -> "StepShapes":
        c = eldm.config
        return cls(c.latent_channels, c.sample_size, c.sample_size, c.cross_attention_dim,
                   max_batch=max_batch, **kw)

    def example_inputs(self, batch: int, device, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        lat = torch.randn(batch, self.latent_channels, self.height, self.width, generator=g)
        cond = torch.randn(batch, 1, self.token_dim, generator=g)
        unc = torch.randn(1, 1, self.token_dim, generator=g)
        return (lat.to(device, dtype), torch.tensor([500.0], device=device),
                cond.to(device, dtype), unc.to(device, dtype), torch.tensor([2.0], device=device))


class StepBackend:
    """Callable ``(latents, t, cond_tokens, uncond_tokens, w) -> ε float32``."""

    name = "base"

    def __init__(self, fn, device: torch.device, dtype: torch.dtype, name: str):
        self._fn, self.device, self.dtype, self.name = fn, device, dtype, name

    def _prep(self, latents, t, cond, uncond, w):
        dev, dt = self.device, self.dtype
        t = torch.as_tensor(t, device=dev).reshape(-1).to(torch.float32)
        w = torch.as_tensor(w, device=dev).reshape(-1).to(torch.float32)
        return latents.to(dev, dt), t, cond.to(dev, dt), uncond.to(dev, dt), w

    @torch.inference_mode()
    def __call__(self, latents, t, cond_tokens, uncond_tokens, w) -> torch.Tensor:
        return self._fn(*self._prep(latents, t, cond_tokens, uncond_tokens, w)).float()

    def __repr__(self):
        return f"StepBackend({self.name}, device={self.device}, dtype={self.dtype})"


def _step_module(eldm, device, dtype) -> nn.Module:
    unet = eldm.unet
    p = next(unet.parameters())
    if p.device != device or p.dtype != dtype:
        unet = copy.deepcopy(unet).to(device=device, dtype=dtype)  # leave the caller's model untouched
    return GuidedStep(unet).eval()


def backend_unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """``None`` when backend ``name`` can run on ``device`` here, else why not."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"
    if name == "eager":
        return None
    if name == "compile":
        if device.type == "cpu":
            cxx = os.environ.get("CXX", "g++")
            if shutil.which(cxx) is None and shutil.which("c++") is None:
                return "backend=compile on CPU needs a C++ compiler (g++) for torch.compile's inductor"
        return None
    if name == "cudagraphs":
        if device.type != "cuda" or not torch.cuda.is_available():
            return "backend=cudagraphs needs a CUDA GPU"
        return None
    # tensorrt
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except Exception:
        has_trt = False
    if not has_trt or device.type != "cuda" or not torch.cuda.is_available():
        return "backend=tensorrt needs the `tensorrt` package and a CUDA GPU"
    return None


def runnable_backends(device=None) -> list[str]:
    return [b for b in BACKENDS if backend_unavailable_reason(b, device) is None]


def _unavailable(name, device, reason) -> RuntimeError:
    ok = " or ".join(runnable_backends(device))
    return RuntimeError(f"{reason}; here (device={device}) use backend={ok}")


def make_step_backend(name: str, eldm, example_shapes: StepShapes | dict | None = None,
                      device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                      warmup: bool = True, cache_dir: str | os.PathLike | None = None,
                      precision: str | None = None) -> StepBackend:
    """Build the guided step for ``eldm`` with backend ``name``.

    Args:
        example_shapes: :class:`StepShapes` (or a dict of its fields); default from the E-LDM config
            with max_batch 16.
        dtype: compute dtype of eager/compile/cudagraphs (the UNet is copied when it differs from the
            model's own).
        warmup: run the step once at build time (``compile``: so compilation errors surface at start).
        cache_dir, precision: TensorRT engine cache folder and precision (``fp16``/``bf16``/``fp32``;
            default from ``dtype``).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown step backend {name!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reason = backend_unavailable_reason(name, device)
    if reason is not None:
        raise _unavailable(name, device, reason)
    if example_shapes is None:
        shapes = StepShapes.from_eldm(eldm)
    elif isinstance(example_shapes, dict):
        shapes = StepShapes(**example_shapes)
    else:
        shapes = example_shapes

    if name == "tensorrt":
        from genssl.generators.export import TensorRTStep, build_tensorrt_engine, export_guided_step_onnx

        prec = precision or {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
        cache = Path(cache_dir or Path.home() / ".cache" / "genssl" / "trt")
        mh = eldm.model_hash()
        onnx_path = cache / f"guided_step-{mh[:16]}.onnx"
        if not onnx_path.is_file():
            export_guided_step_onnx(eldm, onnx_path, batch=shapes.opt_batch)
        engine = build_tensorrt_engine(onnx_path, precision=prec, min_batch=shapes.min_batch,
                                       opt_batch=shapes.opt_batch, max_batch=shapes.max_batch,
                                       cache_dir=cache, model_hash=mh)
        step = TensorRTStep(engine, device=device)
        backend = StepBackend(step, device, torch.float32, "tensorrt")
    else:
        module = _step_module(eldm, device, dtype)
        if name == "eager":
            backend = StepBackend(module, device, dtype, "eager")
        elif name == "compile":
            mode = "max-autotune-no-cudagraphs" if device.type == "cuda" else None
            compiled = torch.compile(module, mode=mode, dynamic=False)
            backend = StepBackend(compiled, device, dtype, "compile")
        else:
            backend = StepBackend(_CudaGraphStep(module, shapes.token_dim), device, dtype, "cudagraphs")

    if warmup:
        try:
            backend(*shapes.example_inputs(shapes.opt_batch, device, dtype))
        except Exception as e:
            raise RuntimeError(f"backend={name} failed its warm-up step on {device}: "
                               f"{type(e).__name__}: {e}; use backend=eager") from e
    return backend


class _CudaGraphStep:
    """The step captured in one CUDA graph per batch size (static input/output buffers)."""

    def __init__(self, module: nn.Module, token_dim: int):
        self.module = module
        self.graphs: dict[tuple, tuple] = {}

    def _capture(self, latents, t, cond, uncond, w):
        static = [x.clone() for x in (latents, t, cond, uncond, w)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self.module(*static)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.module(*static)
        return graph, static, out

    def __call__(self, latents, t, cond, uncond, w):
        key = tuple(tuple(x.shape) for x in (latents, t, cond, uncond, w))
        if key not in self.graphs:
            self.graphs[key] = self._capture(latents, t, cond, uncond, w)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, (latents, t, cond, uncond, w)):
            dst.copy_(src)
        graph.replay()
        return out.clone()
