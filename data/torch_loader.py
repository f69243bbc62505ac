"""PyTorch DataLoader + PIL + torchvision.transforms.v2 multi-crop loader.

Benchmark baseline only: this is how DINO's reference code loads data, kept so bench/ can put
the DALI pipeline's images/s next to it. Training uses `genssl.data.dali_loader`. Same API, same
sample order (`epoch_batches`), same augmentation recipe (`MultiCropSpec`) implemented with the
stock torchvision transforms, so its random draws are torch's, not the host parameters the DALI
loader uses: order is reproducible, crops are only reproducible with ``num_workers > 0``
(per-worker seeds derive from (seed, epoch, rank)).
"""

from __future__ import annotations

import io
import math
from typing import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from genssl.data.augment import MultiCropSpec
from genssl.data.dali_loader import epoch_batches
from genssl.data.index import DatasetIndex, read_sample_bytes


def _blur_kernel(size: int, sigma_max: float) -> int:
    k = 2 * math.ceil(3 * sigma_max) + 1
    k = min(k, size if size % 2 else size - 1)
    return max(k, 1)


def dino_transforms(spec: MultiCropSpec) -> list[v2.Transform]:
    """One torchvision pipeline per crop slot (global first), mirroring DINO's DataAugmentationDINO."""
    out = []
    for plan in spec.plans():
        out.append(v2.Compose([
            v2.RandomResizedCrop(plan.size, scale=plan.scale, ratio=spec.ratio, antialias=True),
            v2.RandomHorizontalFlip(spec.flip_p),
            v2.PILToTensor(),
            v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
            v2.RandomGrayscale(spec.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(_blur_kernel(plan.size, spec.blur_sigma[1]), sigma=spec.blur_sigma)],
                           p=plan.blur_p),
            v2.RandomSolarize(threshold=128, p=plan.solarize_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec.mean), list(spec.std)),
        ]))
    return out


class _MultiCropDataset(Dataset):
    def __init__(self, index: DatasetIndex, spec: MultiCropSpec) -> None:
        self.index = index
        self.transforms = dino_transforms(spec)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        with Image.open(io.BytesIO(read_sample_bytes(self.index, i))) as img:  # a file or a WebDataset member
            img = img.convert("RGB")
        return [t(img) for t in self.transforms], i


def _collate(items: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    n_crops = len(items[0][0])
    crops = [torch.stack([it[0][c] for it in items]) for c in range(n_crops)]
    return crops, torch.tensor([it[1] for it in items], dtype=torch.int64)


class TorchMultiCropLoader:
    """Same contract as `DaliMultiCropLoader` (CPU tensors): yields ``(crops, indices)``."""

    def __init__(self, index: DatasetIndex, spec: MultiCropSpec, batch_size: int, rank: int, world_size: int,
                 seed: int, num_workers: int = 2) -> None:
        self.index, self.batch_size = index, batch_size
        self.rank, self.world_size, self.seed, self.num_workers = rank, world_size, seed, num_workers
        self.dataset = _MultiCropDataset(index, spec)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, step: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        if not 0 <= step <= len(self):
            raise ValueError(f"step must be in [0, {len(self)}] (steps per epoch), got {step}")
        order = epoch_batches(len(self.index), self.batch_size, self.rank, self.world_size, self.seed, self.epoch)
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank, step)) & 0x7FFF_FFFF)
        loader = DataLoader(self.dataset, batch_sampler=order[step:].tolist(), num_workers=self.num_workers,
                            collate_fn=_collate, generator=gen, persistent_workers=False,
                            prefetch_factor=4 if self.num_workers > 0 else None)
        return iter(loader)
