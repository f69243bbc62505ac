"""The epoch order every loader shares: one permutation per epoch, sharded by rank.

The permutation depends only on (seed, epoch). Rank r takes positions r, r+W, r+2W, … of it, in
whole batches; the tail that would leave ranks with unequal step counts is dropped. So batch k of
a W-rank run, taken over all ranks, is exactly batch k of a 1-rank run with W times the batch.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def rank_batches(n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This rank's batches of sample indices for ``epoch`` (drop-last, equal count on every rank)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    steps = n // (batch_size * world_size)
    order = epoch_permutation(n, seed, epoch)[: steps * batch_size * world_size]
    # Global batch k = order[k*B*W:(k+1)*B*W]; this rank's share is every W-th element of it.
    return [order[k * batch_size * world_size:(k + 1) * batch_size * world_size][rank::world_size] for k in range(steps)]


class EpochLoader:
    """The loader protocol's bookkeeping, shared by every loader: the epoch, steps per epoch, and
    this rank's batches. Subclasses set ``n_samples``, ``batch_size``, ``rank``, ``world_size``,
    ``seed`` and ``epoch`` and implement ``iter_from(step)`` (batches ``step..len()-1`` of the epoch)."""

    n_samples: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int = 0

    def init_epochs(self, n_samples: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        """Check and set the sampling fields; an epoch must have at least one step on every rank."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1 or seed < 0:
            raise ValueError(f"need batch_size >= 1 and seed >= 0; got {batch_size}, {seed}")
        if n_samples < batch_size * world_size:
            raise ValueError(f"{n_samples} samples are fewer than one global batch (batch_size={batch_size} x "
                             f"world_size={world_size}): an epoch would have no step; lower the batch size")
        self.n_samples, self.batch_size, self.rank, self.world_size, self.seed = n_samples, batch_size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_samples // (self.batch_size * self.world_size)

    def batches(self) -> np.ndarray:
        """This epoch's ``[steps, B]`` int64 sample indices for this rank (what the loader yields)."""
        batches = rank_batches(self.n_samples, self.batch_size, self.rank, self.world_size, self.seed, self.epoch)
        return np.asarray(batches, dtype=np.int64).reshape(len(batches), self.batch_size)

    def check_step(self, step: int) -> None:
        if not 0 <= step <= len(self):
            raise ValueError(f"step must be in [0, {len(self)}] (steps per epoch), got {step}")

    def iter_from(self, step: int):
        raise NotImplementedError

    def __iter__(self):
        return self.iter_from(0)
