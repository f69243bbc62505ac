"""Synthetic multi-crop batches: no files, no decoding. For engine tests and the training-step bench.

Every sample's crops are a pure function of (seed, sample index), and the epoch order follows the
same rank-sharded permutation as the real loaders, so a 2-rank run sees exactly the samples of a
1-rank run with twice the batch — what the ZeRO equality tests need.
"""

from __future__ import annotations

import torch

from genssl.data.sampler import EpochLoader


class SyntheticMultiCropLoader(EpochLoader):
    def __init__(self, n_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 global_size: int = 32, local_size: int = 16, n_global: int = 2, n_local: int = 2,
                 device: torch.device | str = "cpu", n_classes: int = 4):
        self.init_epochs(n_samples, batch_size, rank, world_size, seed)
        self.sizes = [global_size] * n_global + [local_size] * n_local
        self.device = torch.device(device)
        self.n_classes = n_classes

    def _sample(self, index: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        # A class-dependent mean makes the data learnable (k-NN on it means something).
        mean = (index % self.n_classes) / self.n_classes - 0.5
        return [torch.randn(3, s, s, generator=g) + mean for s in self.sizes]

    def iter_from(self, step: int = 0):
        self.check_step(step)
        for batch in self.batches()[step:]:
            samples = [self._sample(int(i)) for i in batch]
            crops = [torch.stack([s[c] for s in samples]).to(self.device) for c in range(len(self.sizes))]
            yield crops, torch.from_numpy(batch)
