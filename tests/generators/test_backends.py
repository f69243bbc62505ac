"""Step backends: eager matches guided_eps; unavailable backends fail at start with a useful message."""

from __future__ import annotations

import os

import pytest
import torch

from genssl.generators.backends import (BACKENDS, StepShapes, backend_unavailable_reason,
                                        make_step_backend, runnable_backends)
from genssl.generators.eldm import ELDM, guided_eps, tiny_eldm_config
from genssl.generators.samplers import GuidedSampler

HAS_CUDA = torch.cuda.is_available()
try:
    import tensorrt  # noqa: F401
    HAS_TRT = True
except Exception:
    HAS_TRT = False




@pytest.fixture(scope="module")
def eldm():
    torch.manual_seed(0)
    return ELDM(tiny_eldm_config()).eval()


def test_eager_matches_guided_eps(eldm):
    shapes = StepShapes.from_eldm(eldm, max_batch=4)
    b = make_step_backend("eager", eldm, shapes, "cpu")
    x = shapes.example_inputs(3, "cpu")
    with torch.no_grad():
        ref = guided_eps(eldm.unet, *x)
    torch.testing.assert_close(b(*x), ref)
    assert b.name == "eager" and "eager" in runnable_backends("cpu")


def test_unknown_and_unavailable_backends_fail_at_start(eldm):
    with pytest.raises(ValueError, match="choose one of eager, compile, cudagraphs, tensorrt"):
        make_step_backend("onnx", eldm, device="cpu")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError) as e:
            make_step_backend("cudagraphs", eldm, device="cpu")
        assert "needs a CUDA GPU" in str(e.value) and "use backend=eager" in str(e.value)
    if not (HAS_TRT and HAS_CUDA):
        with pytest.raises(RuntimeError) as e:
            make_step_backend("tensorrt", eldm, device="cpu")
        assert "`tensorrt` package and a CUDA GPU" in str(e.value) and "use backend=eager" in str(e.value)
        # the sampler fails at construction too, not at the first step
        with pytest.raises(RuntimeError, match="tensorrt"):
            GuidedSampler(eldm, None if eldm.config.latent_channels == 3 else _ae(), backend="tensorrt",
                          device="cpu")
    assert backend_unavailable_reason("eager", "cpu") is None
    assert set(BACKENDS) == {"eager", "compile", "cudagraphs", "tensorrt"}


def _ae():
    from genssl.generators.autoencoder import build_autoencoder, tiny_autoencoder_config

    return build_autoencoder(tiny_autoencoder_config())


def test_warmup_failure_is_reported_at_start(eldm):
    bad = StepShapes(latent_channels=5, height=8, width=8, token_dim=32, max_batch=2)   # wrong channels
    with pytest.raises(RuntimeError, match="backend=eager failed its warm-up step"):
        make_step_backend("eager", eldm, bad, "cpu")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GENSSL_TEST_COMPILE") != "1",
                    reason="torch.compile of even the tiny UNet takes 25-55 s on 2 shared CPU cores "
                           "(measured: max |compile − eager| = 2.3e-6); set GENSSL_TEST_COMPILE=1 to run")
def test_compile_backend_matches_eager(eldm):
    shapes = StepShapes.from_eldm(eldm, max_batch=2)
    c = make_step_backend("compile", eldm, shapes, "cpu")
    e = make_step_backend("eager", eldm, shapes, "cpu")
    x = shapes.example_inputs(2, "cpu")
    torch.testing.assert_close(c(*x), e(*x), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cudagraphs_backend_matches_eager(eldm):
    shapes = StepShapes.from_eldm(eldm, max_batch=4)
    g = make_step_backend("cudagraphs", eldm, shapes, "cuda")
    e = make_step_backend("eager", eldm, shapes, "cuda")
    for B in (4, 2, 4):
        x = shapes.example_inputs(B, "cuda")
        torch.testing.assert_close(g(*x), e(*x), atol=1e-4, rtol=1e-4)
