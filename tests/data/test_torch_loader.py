"""The torchvision baseline: same contract and same order as the DALI loader."""

from __future__ import annotations

import numpy as np
import torch

from genssl.data.augment import MultiCropSpec
from genssl.data.torch_loader import TorchMultiCropLoader


def test_torch_baseline_contract(shapes, within_normalised_range):
    train, _ = shapes
    spec = MultiCropSpec(global_size=32, local_size=16, n_local=2)
    loader = TorchMultiCropLoader(train, spec, batch_size=8, rank=1, world_size=2, seed=3, num_workers=0)
    loader.set_epoch(2)
    batches = list(loader.iter_from(1))
    assert len(batches) == len(loader) - 1
    crops, idx = batches[0]
    assert [tuple(c.shape) for c in crops] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    assert crops[0].dtype == torch.float32 and within_normalised_range(crops[0], spec.mean, spec.std)
    from genssl.data.dali_loader import epoch_batches
    order = epoch_batches(len(train), 8, 1, 2, 3, 2)
    np.testing.assert_array_equal(torch.cat([i for _, i in batches]).numpy(), order[1:].ravel())
