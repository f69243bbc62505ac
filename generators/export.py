"""Export of the guided UNet step: ONNX (+ onnxruntime parity check) and TensorRT engines.

ONNX graph (:func:`export_guided_step_onnx`), one call = one classifier-free-guided ε:

| input           | shape               | dtype   |
|-----------------|---------------------|---------|
| `latents`       | [batch, C, h, w]    | float32 |
| `timestep`      | [1]                 | float32 |
| `cond_tokens`   | [batch, 1, D]       | float32 |
| `uncond_tokens` | [1, 1, D]           | float32 |
| `guidance`      | [1]                 | float32 |
| output `eps`    | [batch, C, h, w]    | float32 |

``batch`` is a dynamic axis. :func:`check_onnx_parity` runs the file in onnxruntime (CPU) at a batch
different from the export batch and reports the max abs difference to PyTorch.

TensorRT (:func:`build_tensorrt_engine`, :class:`TensorRTStep`) is written against TensorRT 10's
documented Python API (``trt.Builder``, ``OnnxParser.parse_from_file``, optimization profiles,
``build_serialized_network``, ``Runtime.deserialize_cuda_engine``, ``IExecutionContext`` with
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``). **It has not been run in this
repository's CI** (no TensorRT, no GPU there); its tests skip with a reason when ``tensorrt`` is absent.
Engines are cached under a key of (model hash, TensorRT version, GPU name and compute capability,
precision, optimization profile, input shapes).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from genssl.generators.eldm import GuidedStep

__all__ = [
    "INPUT_NAMES", "OUTPUT_NAME", "export_guided_step_onnx", "check_onnx_parity", "OnnxStep",
    "tensorrt_unavailable_reason", "engine_cache_key", "build_tensorrt_engine", "TensorRTStep",
]

INPUT_NAMES = ("latents", "timestep", "cond_tokens", "uncond_tokens", "guidance")
OUTPUT_NAME = "eps"


def _example_inputs(eldm, batch: int, seed: int = 0, t: float = 500.0, w: float = 2.0):
    c = eldm.config
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, c.latent_channels, c.sample_size, c.sample_size, generator=g)
    e = torch.randn(batch, c.embed_dim, generator=g)
    with torch.no_grad():
        cond = eldm.condition(e).float().cpu()
        unc = eldm.null_tokens(1).float().cpu()
    return lat, torch.tensor([t]), cond, unc, torch.tensor([w])


def export_guided_step_onnx(eldm, onnx_path: str | os.PathLike, batch: int = 2, opset: int = 17) -> Path:
    """Export ``GuidedStep(eldm.unet)`` (float32, CPU copy) to ``onnx_path`` with a dynamic batch axis.

    Uses the TorchScript exporter (``dynamo=False``): with torch 2.14 the dynamo exporter specialised
    the batch axis of diffusers' UNet to the example batch (seen here), the TorchScript one keeps it
    dynamic. The file is written to a temporary name and renamed (atomic).
    """
    import copy

    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    unet = copy.deepcopy(eldm.unet).float().cpu().eval()
    step = GuidedStep(unet).eval()
    args = _example_inputs(eldm, batch)
    tmp = onnx_path.with_name(f".{onnx_path.stem}.tmp{os.getpid()}.onnx")
    dyn = {"latents": {0: "batch"}, "cond_tokens": {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], opset_version=opset,
                  do_constant_folding=True)
        torch.onnx.export(step, args, str(tmp), dynamo=False, dynamic_axes=dyn, **kw)
    os.replace(tmp, onnx_path)
    return onnx_path


class OnnxStep:
    """The exported step run by onnxruntime (a CPU reference / fallback): same call signature as a
    step backend; returns float32 torch tensors."""

    def __init__(self, onnx_path: str | os.PathLike, providers: list[str] | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), so,
                                            providers=providers or ["CPUExecutionProvider"])

    def __call__(self, latents, t, cond_tokens, uncond_tokens, w) -> torch.Tensor:
        def np32(x):
            return np.ascontiguousarray(torch.as_tensor(x).detach().float().cpu().numpy())

        feeds = {"latents": np32(latents), "timestep": np32(t).reshape(1),
                 "cond_tokens": np32(cond_tokens), "uncond_tokens": np32(uncond_tokens)[:1],
                 "guidance": np32(w).reshape(1)}
        (out,) = self.session.run([OUTPUT_NAME], feeds)
        return torch.from_numpy(out)


def check_onnx_parity(eldm, onnx_path: str | os.PathLike, batch: int = 3, atol: float = 1e-4,
                      seed: int = 1, raise_on_fail: bool = True) -> dict:
    """Run the ONNX file in onnxruntime and PyTorch (float32, CPU) on random inputs of batch ``batch``.

    Returns ``{"max_abs_diff", "max_abs_ref", "atol", "batch", "ok", "ort_seconds", "torch_seconds"}``;
    raises ``AssertionError`` when ``max_abs_diff > atol`` and ``raise_on_fail``.
    """
    import copy

    args = _example_inputs(eldm, batch, seed=seed, t=321.0, w=2.5)
    step = GuidedStep(copy.deepcopy(eldm.unet).float().cpu().eval())
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = step(*args)
        t1 = time.perf_counter()
    ort_step = OnnxStep(onnx_path)
    t2 = time.perf_counter()
    out = ort_step(*args)
    t3 = time.perf_counter()
    diff = float((out - ref).abs().max())
    report = {"max_abs_diff": diff, "max_abs_ref": float(ref.abs().max()), "atol": atol, "batch": batch,
              "ok": diff <= atol, "torch_seconds": t1 - t0, "ort_seconds": t3 - t2}
    if raise_on_fail and not report["ok"]:
        raise AssertionError(f"ONNX parity failed for {onnx_path}: max abs diff {diff:.3g} > atol {atol:g} "
                             f"(batch {batch})")
    return report


# ---------------------------------------------------------------------------------------- TensorRT
def tensorrt_unavailable_reason() -> str | None:
    """``None`` when TensorRT can build/run here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:
        return f"the `tensorrt` package is not installed ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is visible"
    return None


def _require_tensorrt():
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"TensorRT engines need the `tensorrt` package and a CUDA GPU: {reason}; "
                           f"use backend=eager or compile (or cudagraphs on a GPU)")
    import tensorrt as trt

    return trt


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def engine_cache_key(model_hash: str, precision: str, profile: dict, trt_version: str,
                     gpu_name: str, compute_capability: tuple[int, int] | str) -> str:
    """sha256 over everything that makes a serialized engine valid: the model, TensorRT's version, the
    GPU (name + compute capability), the precision and the optimization profile (+ input shapes)."""
    blob = json.dumps({"model": model_hash, "precision": precision, "profile": profile,
                       "tensorrt": trt_version, "gpu": gpu_name, "cc": list(compute_capability)
                       if not isinstance(compute_capability, str) else compute_capability},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_tensorrt_engine(onnx_path: str | os.PathLike, precision: str = "fp16", min_batch: int = 1,
                          opt_batch: int = 8, max_batch: int = 16,
                          cache_dir: str | os.PathLike | None = None, model_hash: str | None = None,
                          workspace_gb: float = 8.0, verbose: bool = False) -> Path:
    """Build (or reuse from ``cache_dir``) a serialized TensorRT engine of the exported step.

    One optimization profile: the dynamic batch dimension of every input ranges over
    ``min_batch ≤ opt_batch ≤ max_batch``; other dimensions are static. ``precision``: ``fp16`` or
    ``bf16`` (reduced-precision kernels allowed, I/O stays float32) or ``fp32`` (TF32 allowed).
    Returns the engine path (``<cache_dir>/guided_step-<key[:20]>.engine`` + ``.json`` sidecar).
    """
    trt = _require_tensorrt()
    if precision not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"precision must be fp16, bf16 or fp32, got {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 ≤ min_batch ≤ opt_batch ≤ max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    onnx_path = Path(onnx_path)
    cache = Path(cache_dir) if cache_dir is not None else onnx_path.parent
    cache.mkdir(parents=True, exist_ok=True)

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)          # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    shapes = {}
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = list(inp.shape)
        if any(d < 0 for d in dims[1:]):
            raise RuntimeError(f"input {inp.name} has dynamic non-batch dims {dims}; only the batch "
                               f"axis may be dynamic")
        if dims[0] < 0:
            shapes[inp.name] = ([min_batch] + dims[1:], [opt_batch] + dims[1:], [max_batch] + dims[1:])
        else:
            shapes[inp.name] = (dims, dims, dims)
    profile_desc = {"min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch,
                    "shapes": {k: v[1] for k, v in sorted(shapes.items())}}

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    key = engine_cache_key(model_hash or _file_sha256(onnx_path), precision, profile_desc,
                           trt.__version__, props.name, (props.major, props.minor))
    engine_path = cache / f"guided_step-{key[:20]}.engine"
    if engine_path.is_file():
        return engine_path

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (mn, op, mx) in shapes.items():
        profile.set_shape(name, tuple(mn), tuple(op), tuple(mx))
    config.add_optimization_profile(profile)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    tmp = engine_path.with_name(f".{engine_path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(bytes(serialized))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, engine_path)
    meta = {"onnx": str(onnx_path), "model_hash": model_hash, "precision": precision,
            "profile": profile_desc, "tensorrt": trt.__version__, "gpu": props.name,
            "compute_capability": [props.major, props.minor],
            "build_seconds": time.perf_counter() - t0}
    engine_path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return engine_path


class TensorRTStep:
    """Runs a serialized engine of the guided step on torch CUDA tensors (no copies to the host):
    ``set_input_shape`` + ``set_tensor_address`` per input, an output allocated with torch, then
    ``execute_async_v3`` on the current torch CUDA stream."""

    def __init__(self, engine_path: str | os.PathLike, device: torch.device | str = "cuda"):
        trt = _require_tensorrt()
        self.trt = trt
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with open(engine_path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path} (built by another TensorRT "
                               f"version or for another GPU?); delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
             else self.outputs).append(name)
        if tuple(self.inputs) != INPUT_NAMES or self.outputs != [OUTPUT_NAME]:
            # the ONNX parser keeps graph input order; be tolerant but explicit
            missing = set(INPUT_NAMES) - set(self.inputs)
            if missing or OUTPUT_NAME not in self.outputs:
                raise RuntimeError(f"engine {engine_path} has I/O {self.inputs} -> {self.outputs}, "
                                   f"expected {list(INPUT_NAMES)} -> [{OUTPUT_NAME}]")
        self._dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n))
                        for n in self.inputs + self.outputs}

    def _torch_dtype(self, dt):
        trt = self.trt
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                 trt.DataType.INT32: torch.int32, trt.DataType.INT8: torch.int8,
                 trt.DataType.BOOL: torch.bool}
        for attr, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
            if hasattr(trt.DataType, attr):
                table[getattr(trt.DataType, attr)] = tdt
        return table[dt]

    def __call__(self, latents, t, cond_tokens, uncond_tokens, w) -> torch.Tensor:
        dev = self.device
        feeds = {"latents": latents, "timestep": torch.as_tensor(t).reshape(1),
                 "cond_tokens": cond_tokens, "uncond_tokens": uncond_tokens[:1],
                 "guidance": torch.as_tensor(w).reshape(1)}
        keep = []
        for name in self.inputs:
            x = feeds[name].to(device=dev, dtype=self._dtypes[name]).contiguous()
            keep.append(x)                                   # alive until the launch is enqueued
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        out_shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        out = torch.empty(out_shape, device=dev, dtype=self._dtypes[OUTPUT_NAME])
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        stream = torch.cuda.current_stream(dev)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        # inputs in `keep` are consumed on `stream`; torch's caching allocator only reuses their memory
        # for work ordered after this point on the same stream, so no synchronisation is needed here.
        return out
