"""MultiCropSpec validation and the host-side parameter sampler."""

from __future__ import annotations

import numpy as np
import pytest

from genssl.data.augment import (N_PARAMS, P_BRIGHT, P_FLIP, P_HUE, P_SAT, P_SIGMA, P_SOLAR, MultiCropSpec,
                                 random_resized_crop_boxes, sample_multicrop_params)


def test_defaults_are_dino():
    spec = MultiCropSpec()
    plans = spec.plans()
    assert spec.n_crops == 10 and [p.size for p in plans] == [224, 224] + [96] * 8
    assert [p.blur_p for p in plans[:3]] == [1.0, 0.1, 0.5] and [p.solarize_p for p in plans[:3]] == [0.0, 0.2, 0.0]


@pytest.mark.parametrize("kwargs, field", [
    ({"global_size": 0}, "global_size"), ({"n_global": 0}, "n_global"), ({"n_local": -1}, "n_local"),
    ({"global_scale": (0.5, 0.2)}, "global_scale"), ({"local_scale": (0.0, 0.4)}, "local_scale"),
    ({"flip_p": 1.5}, "flip_p"), ({"blur_p_global": (1.0, 2.0)}, "blur_p_global"), ({"hue": 0.7}, "hue"),
    ({"std": (0.2, 0.0, 0.2)}, "std"), ({"mean": (0.5, 0.5)}, "mean"), ({"brightness": -1}, "brightness"),
    ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
])
def test_spec_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MultiCropSpec(**kwargs)


def test_crop_boxes_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    sizes = np.array([[64, 48], [500, 375], [32, 32], [1000, 100]] * 250)
    boxes = random_resized_crop_boxes(rng, sizes, (0.08, 1.0), (3 / 4, 4 / 3))
    assert boxes.shape == (1000, 4) and (boxes >= 0).all() and (boxes <= 1).all()
    h = (boxes[:, 2] - boxes[:, 0]) * sizes[:, 1]
    w = (boxes[:, 3] - boxes[:, 1]) * sizes[:, 0]
    area = h * w / (sizes[:, 0] * sizes[:, 1])
    fits = sizes[:, 0] / sizes[:, 1] < 5  # the 10:1 image always falls back to a clamped centre crop
    assert area[fits].min() > 0.05 and area[fits].max() <= 1.0 + 1e-9
    ratio = w / h
    assert ratio.min() > 3 / 4 * 0.85 and ratio.max() < 4 / 3 * 1.2


def test_params_distribution_and_determinism():
    spec = MultiCropSpec(global_size=32, local_size=16, n_local=2)
    sizes = np.tile([[64, 48]], (4000, 1))
    p = sample_multicrop_params(np.random.default_rng(1), spec, sizes)
    assert p.shape == (4000, 4, N_PARAMS) and p.dtype == np.float32
    np.testing.assert_array_equal(p, sample_multicrop_params(np.random.default_rng(1), spec, sizes))
    assert abs(p[:, :, P_FLIP].mean() - 0.5) < 0.03
    assert abs((p[:, 0, P_SIGMA] > 0).mean() - 1.0) < 1e-9 and abs((p[:, 1, P_SIGMA] > 0).mean() - 0.1) < 0.02
    assert abs(p[:, 1, P_SOLAR].mean() - 0.2) < 0.02 and p[:, [0, 2, 3], P_SOLAR].max() == 0
    assert abs((p[:, :, P_SAT] == 0).mean() - 0.2) < 0.02  # grayscale
    jittered = p[:, :, P_BRIGHT] != 1
    assert abs(jittered.mean() - 0.8) < 0.02
    assert p[:, :, P_BRIGHT].min() >= 0.6 - 1e-6 and p[:, :, P_BRIGHT].max() <= 1.4 + 1e-6
    assert np.abs(p[:, :, P_HUE]).max() <= 36.0 + 1e-4
