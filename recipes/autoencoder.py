"""The project's own KL autoencoder for the E-LDM (docs/METHODS.md §1.3), trained on the dataset itself.

    deepspeed recipes/autoencoder.py                                   # CPU-sized run on builtin:shapes
    deepspeed --num_gpus 8 recipes/autoencoder.py preset=imagenet data=/data/imagenet out=runs/ae256
    python recipes/autoencoder.py autoencoder=/models/sd-vae-ft-mse      # a user's model: nothing to train

Writes into ``out=``: config.yaml, metrics.jsonl (loss, rec, kl, lr, images_per_s, mem_gb),
checkpoints/, and ``autoencoder/`` — a diffusers folder (``save_pretrained``: config.json +
diffusion_pytorch_model.safetensors) loadable with
``genssl.generators.autoencoder.load_pretrained_autoencoder`` — plus ``autoencoder/genssl.json``
(hash, image size, scaling factor, data fingerprint, reconstruction error). Rerunning the same command
resumes from the last checkpoint; a finished run is not trained again.

Training: random resized crops (``arch.crop_scale``) and flips at ``arch.image_size`` from the DALI
multi-crop loader (one global crop, no colour augmentation, normalised to [-1, 1]), loss
``L1(x̂, x) + kl_weight·KL`` (``autoencoder_loss``). After training ``scaling_factor`` is set to
1/std of the latents of ``arch.scaling_samples`` training images, so the E-LDM sees unit-variance
latents. ``autoencoder=PATH`` (a local diffusers ``AutoencoderKL``/``VQModel`` folder, or a pipeline
folder with ``vae/``) skips training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch

from genssl.data.augment import MultiCropSpec
from genssl.engine.cli import run_main
from genssl.engine.config import ConfigError, parse_config, run_identity, to_dict
from genssl.engine.distributed import DistInfo, barrier, cleanup, setup_distributed
from genssl.engine.run_config import TrainConfig
from genssl.engine.setup import Data, load_data
from genssl.engine.trainer import compute_dtype, fit
from genssl.generators.autoencoder import (AutoencoderConfig, autoencoder_hash, build_autoencoder,
                                           downsample_factor, load_pretrained_autoencoder)
from genssl.generators.autoencoder_objective import AutoencoderLossModule, AutoencoderObjective, full_fp32_state_dict
from genssl.generators.training import AE_MEAN, AE_STD

AE_DIR = "autoencoder"
META_FILE = "genssl.json"


@dataclasses.dataclass
class AutoencoderArch:
    """Architecture and loss of the project's KL autoencoder (diffusers ``AutoencoderKL``)."""

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (16, 32, 32)  # len-1 halvings: 3 blocks = 4x downsampling
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    mid_block_add_attention: bool = False
    kl_weight: float = 1e-6
    rec: Literal["l1", "l2"] = "l1"
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop area range
    flip_p: float = 0.5
    scaling_samples: int = 256  # training images used to set scaling_factor = 1/std(latents)

    def validate(self) -> None:
        f = 2 ** (len(self.block_out_channels) - 1)
        if self.image_size < 1 or self.image_size % f:
            raise ConfigError(f"arch.image_size={self.image_size} must be a positive multiple of the downsampling "
                              f"factor {f} (2^(len(arch.block_out_channels)-1))")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"arch.block_out_channels={self.block_out_channels} must be multiples of "
                                  f"arch.norm_num_groups={self.norm_num_groups}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"arch.crop_scale={self.crop_scale} must satisfy 0 < lo <= hi <= 1")

    def config(self) -> AutoencoderConfig:
        return AutoencoderConfig(latent_channels=self.latent_channels, block_out_channels=self.block_out_channels,
                                 layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                                 sample_size=self.image_size, kl_weight=self.kl_weight,
                                 mid_block_add_attention=self.mid_block_add_attention)


@dataclasses.dataclass
class AutoencoderRecipeConfig(TrainConfig):
    out: str = "runs/autoencoder"
    autoencoder: str = ""  # a user's pretrained diffusers AutoencoderKL/VQModel folder: skip training
    arch: AutoencoderArch = dataclasses.field(default_factory=AutoencoderArch)


# CPU-sized (the default preset): 32 px images -> 8x8x4 latents, 0.23 M parameters, 150 steps of ~0.2 s (1 thread).
SMOKE = {
    "epochs": 2, "batch_size": 32, "precision": "fp32", "num_workers": 2,
    "arch": {"image_size": 32, "block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
             "mid_block_add_attention": False},
    "optim": {"lr": 2e-2, "min_lr": 1e-4, "warmup_epochs": 0.2, "weight_decay": 0.0, "weight_decay_end": 0.0,
              "clip_grad": 1.0, "freeze_last_layer_epochs": 0},
    "ckpt": {"every_steps": 100}, "log": {"every_steps": 5}, "eval": {"knn": False},
}
PRESETS = {
    "smoke": SMOKE,
    # 256² images -> 32²x4 latents (8x downsampling), Stable-Diffusion-VAE-sized (~84 M parameters).
    "imagenet": {
        "epochs": 10, "batch_size": 16, "precision": "bf16",
        "arch": {"image_size": 256, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                 "norm_num_groups": 32, "mid_block_add_attention": True, "scaling_samples": 1024},
        "optim": {"lr": 2e-4, "min_lr": 1e-6, "warmup_epochs": 0.5, "weight_decay": 0.0, "weight_decay_end": 0.0,
                  "clip_grad": 1.0, "freeze_last_layer_epochs": 0},
        "ckpt": {"every_steps": 2000}, "log": {"every_steps": 50}, "eval": {"knn": False},
    },
}


def presets(cuda: bool | None = None) -> dict[str, dict]:
    """The presets on this machine (``cuda``: default, whether one is visible): on a CUDA machine the
    smoke preset trains in bf16 (a ``precision=`` on the command line still wins)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return {**PRESETS, "smoke": {**SMOKE, "precision": "bf16"}} if cuda else PRESETS


def _log(dist: DistInfo, msg: str) -> None:
    if dist.is_main:
        print(msg, flush=True)


def load_user_autoencoder(path: str, dist: DistInfo):
    """A user's pretrained autoencoder (no training), on ``dist.device``, fp32."""
    try:
        ae = load_pretrained_autoencoder(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"autoencoder={path}: {e}") from None
    return ae.to(dist.device).float().eval()


def autoencoder_folder(out: str | os.PathLike) -> Path:
    return Path(out) / AE_DIR


def _finished(cfg: AutoencoderRecipeConfig, data: Data) -> bool:
    meta = autoencoder_folder(cfg.out) / META_FILE
    if not meta.is_file():
        return False
    info = json.loads(meta.read_text())
    # The same run (engine/config.py::run_identity; eval.* does not count: nothing is evaluated) on the same data.
    return (info.get("run_identity") == run_identity(cfg, training_only=True)
            and info.get("data_fingerprint") == data.train.fingerprint)


def _ae_spec(arch: AutoencoderArch) -> MultiCropSpec:
    """One random resized crop + flip per image, no colour augmentation, normalised to [-1, 1]."""
    return MultiCropSpec(global_size=arch.image_size, local_size=arch.image_size, n_global=1, n_local=0,
                         global_scale=arch.crop_scale, flip_p=arch.flip_p, jitter_p=0.0, grayscale_p=0.0,
                         blur_p_global=(0.0,), blur_p_local=0.0, solarize_p_global=(0.0,), mean=AE_MEAN, std=AE_STD)


def _scaling_images(data: Data, arch: AutoencoderArch, dist: DistInfo, n: int) -> torch.Tensor:
    """The first ``n`` images of a seeded random subset of the training set, centre-cropped, in [-1, 1]."""
    import numpy as np

    from genssl.data.dali_loader import DaliEvalLoader

    rows = np.sort(np.random.default_rng(0).permutation(len(data.train))[:max(1, min(n, len(data.train)))])
    loader = DaliEvalLoader(data.train.subset(rows), arch.image_size, 64, 0, 1,
                            device_id=dist.local_rank if dist.device.type == "cuda" else None,
                            crop_ratio=1.0, mean=AE_MEAN, std=AE_STD)
    return torch.cat([images.cpu() for images, _, _ in loader])


@torch.no_grad()
def _set_scaling_factor(ae, images: torch.Tensor, chunk: int = 32) -> float:
    """``set_scaling_factor`` (1/std of the posterior means) computed in chunks: a 256² batch of 1024
    images through an SD-VAE-sized encoder at once would need tens of GB of activations."""
    p = next(ae.parameters())
    z = torch.cat([ae.encode(x.to(p.device, p.dtype)).latent_dist.mode().float().cpu() for x in images.split(chunk)])
    sf = float(1.0 / z.std().clamp_min(1e-6))  # as generators.autoencoder.set_scaling_factor
    ae.register_to_config(scaling_factor=sf)
    return sf


def _save_folder(ae, folder: Path, meta: dict) -> None:
    """``save_pretrained`` into a temporary sibling, then swap it into place (never half-written)."""
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ae.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    old = folder.with_name(f".{folder.name}.old{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def train_autoencoder(cfg: AutoencoderRecipeConfig, dist: DistInfo, data: Data | None = None,
                      deepspeed_config: str | None = None):
    """Train (or resume, or reuse a finished) project autoencoder; returns ``(ae, folder)`` with ``ae``
    the exported model (fp32, eval, on ``dist.device``, same on every rank) and ``folder`` its diffusers
    folder. With ``cfg.autoencoder`` set, loads that model instead and returns ``(ae, Path(path))``.
    Every rank must call it."""
    if cfg.autoencoder:
        ae = load_user_autoencoder(cfg.autoencoder, dist)
        _log(dist, f"autoencoder: using the pretrained {type(ae).__name__} at {cfg.autoencoder} "
                   f"(hash {autoencoder_hash(ae)[:12]}); nothing to train")
        return ae, Path(cfg.autoencoder)
    data = data or load_data(cfg.data, cfg.cache_dir, dist)
    folder = autoencoder_folder(cfg.out)
    if _finished(cfg, data):
        _log(dist, f"autoencoder: {folder} is already trained with these settings; reusing it")
        return load_pretrained_autoencoder(folder).to(dist.device).eval(), folder

    from genssl.data.dali_loader import DaliMultiCropLoader

    arch = cfg.arch
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    ae = build_autoencoder(arch.config())
    student = AutoencoderLossModule(ae, kl_weight=arch.kl_weight, rec=arch.rec)
    dtype = compute_dtype(cfg.precision)
    objective = AutoencoderObjective(dtype, cfg.seed, dist.rank)
    device_id = dist.local_rank if dist.device.type == "cuda" else None
    loader = DaliMultiCropLoader(data.train, _ae_spec(arch), cfg.batch_size, dist.rank, dist.world_size, cfg.seed,
                                 device_id=device_id, num_threads=max(1, cfg.num_workers))
    _log(dist, f"autoencoder: training {sum(p.numel() for p in ae.parameters()) / 1e6:.2f} M parameters at "
               f"{arch.image_size}px -> latents {arch.latent_channels}x{arch.image_size // downsample_factor(ae)}² "
               f"on {len(data.train)} images, {cfg.epochs} epoch(s) of {len(loader)} step(s)")
    engine, result = fit(cfg, dist, student, objective, loader, cfg.out, deepspeed_config)

    state = full_fp32_state_dict(engine)  # fp32 master weights; collective under ZeRO-3
    del engine, loader
    if dist.is_main:
        final = build_autoencoder(arch.config())
        final.load_state_dict({k[len("ae."):]: v for k, v in state.items() if k.startswith("ae.")})
        final = final.to(dist.device).eval()
        images = _scaling_images(data, arch, dist, arch.scaling_samples)
        sf = _set_scaling_factor(final, images)
        with torch.no_grad():
            x = images[:64]
            errs = [(final.decode(final.encode(b).latent_dist.mode()).sample.clamp(-1, 1) - b).abs().mean()
                    for b in x.to(dist.device).split(16)]
            rec_l1 = float(torch.stack(errs).mean()) * 127.5  # mean absolute error in grey levels
        meta = {"run_identity": run_identity(cfg, training_only=True), "hash": autoencoder_hash(final),
                "image_size": arch.image_size, "downsample_factor": downsample_factor(final), "latent_channels": arch.latent_channels,
                "scaling_factor": sf, "data": cfg.data, "data_fingerprint": data.train.fingerprint,
                "reconstruction_mae_grey_levels": rec_l1, "steps": result.global_step, "config": to_dict(cfg)}
        _save_folder(final.cpu(), folder, meta)
        print(f"autoencoder: wrote {folder} (scaling_factor {sf:.4f}, reconstruction error {rec_l1:.1f} grey "
              f"levels on {len(x)} training images)", flush=True)
    barrier()
    return load_pretrained_autoencoder(folder).to(dist.device).eval(), folder


def main(argv: list[str] | None = None):
    args = parse_config(argv, AutoencoderRecipeConfig, presets(), default_preset="smoke")
    cfg: AutoencoderRecipeConfig = args.config
    dist = setup_distributed(args.local_rank)
    ae, folder = train_autoencoder(cfg, dist, deepspeed_config=args.deepspeed_config)
    cleanup()
    return folder


if __name__ == "__main__":
    run_main(main)
