"""ONNX export of the guided step (parity with onnxruntime); TensorRT build/run where available."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genssl.generators.eldm import ELDM, tiny_eldm_config
from genssl.generators.export import (INPUT_NAMES, OnnxStep, check_onnx_parity, engine_cache_key,
                                      export_guided_step_onnx, tensorrt_unavailable_reason)
from genssl.generators.samplers import GuidedSampler

TRT_REASON = tensorrt_unavailable_reason()




@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    eldm = ELDM(tiny_eldm_config()).eval()
    path = export_guided_step_onnx(eldm, tmp_path_factory.mktemp("onnx") / "step.onnx", batch=2)
    return eldm, path


def test_onnx_parity_dynamic_batch(exported):
    import onnx

    eldm, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 3):                                     # ≠ the export batch of 2
        rep = check_onnx_parity(eldm, path, batch=batch, atol=1e-4)
        print(f"ONNX parity batch={batch}: max abs diff {rep['max_abs_diff']:.2e} "
              f"(max |ε| {rep['max_abs_ref']:.2f})")
        assert rep["ok"] and rep["max_abs_diff"] < 1e-4


def test_onnx_step_drives_the_sampler(exported):
    """The exported graph is a drop-in step: same images as the eager sampler (±1 level)."""
    eldm, path = exported
    e = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    eager = GuidedSampler(eldm, None if eldm.config.latent_channels == 3 else _ae(), steps=3)
    ort = GuidedSampler(eldm, eager.autoencoder, steps=3, backend=OnnxStep(path))
    a, b = eager.sample(e, [5, 6]), ort.sample(e, [5, 6])
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def _ae():
    from genssl.generators.autoencoder import build_autoencoder, tiny_autoencoder_config

    torch.manual_seed(0)
    return build_autoencoder(tiny_autoencoder_config())


def test_engine_cache_key_covers_its_inputs():
    base = dict(model_hash="m", precision="fp16", profile={"min_batch": 1, "opt_batch": 8, "max_batch": 16},
                trt_version="10.7.0", gpu_name="NVIDIA H100", compute_capability=(9, 0))
    k = engine_cache_key(**base)
    for field, other in [("model_hash", "m2"), ("precision", "bf16"), ("trt_version", "10.8.0"),
                         ("gpu_name", "NVIDIA A100"), ("compute_capability", (8, 0)),
                         ("profile", {"min_batch": 1, "opt_batch": 4, "max_batch": 16})]:
        assert engine_cache_key(**{**base, field: other}) != k, field


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is available here: the error path does not apply")
def test_tensorrt_absent_error(exported):
    from genssl.generators.export import TensorRTStep, build_tensorrt_engine

    _, path = exported
    with pytest.raises(RuntimeError, match="tensorrt"):
        build_tensorrt_engine(path)
    with pytest.raises(RuntimeError, match="use backend=eager"):
        TensorRTStep(path)


@pytest.mark.gpu
@pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT path not testable here: {TRT_REASON}")
def test_tensorrt_engine_matches_eager(exported, tmp_path):  # pragma: no cover - needs TensorRT + GPU
    from genssl.generators.backends import StepShapes, make_step_backend
    from genssl.generators.export import TensorRTStep, build_tensorrt_engine

    eldm, path = exported
    engine = build_tensorrt_engine(path, precision="fp16", min_batch=1, opt_batch=2, max_batch=4,
                                   cache_dir=tmp_path, model_hash=eldm.model_hash())
    assert build_tensorrt_engine(path, precision="fp16", min_batch=1, opt_batch=2, max_batch=4,
                                 cache_dir=tmp_path, model_hash=eldm.model_hash()) == engine   # cached
    step = TensorRTStep(engine)
    shapes = StepShapes.from_eldm(eldm, max_batch=4)
    ref = make_step_backend("eager", eldm, shapes, "cuda")
    for B in (1, 3):
        x = shapes.example_inputs(B, "cuda")
        torch.testing.assert_close(step(*x).float(), ref(*x), atol=2e-2, rtol=2e-2)
