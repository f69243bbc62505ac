"""Autoencoders of the E-LDM (docs/METHODS.md §1.3).

* :func:`build_autoencoder` — the project's own small diffusers ``AutoencoderKL`` (the default when
  the user gives none), trained with :func:`autoencoder_loss` (reconstruction + small KL).
* :func:`load_pretrained_autoencoder` — a user's ``AutoencoderKL`` / ``VQModel`` from a local diffusers
  folder (``config.json`` + weights, or a pipeline folder with a ``vae/`` subfolder).
* :func:`encode` / :func:`decode` — images in [-1, 1] ↔ scaled latents ``(z − shift)·scaling_factor``.
* :class:`LatentCache` — the latents / embeddings of a whole dataset written once to a safetensors
  file keyed by dataset fingerprint + model hash (atomic write, keys checked on load).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from genssl.generators.eldm import state_hash

__all__ = [
    "AutoencoderConfig", "tiny_autoencoder_config", "build_autoencoder", "autoencoder_loss",
    "load_pretrained_autoencoder", "encode", "decode", "to_uint8", "from_uint8", "downsample_factor",
    "set_scaling_factor", "autoencoder_hash", "LatentCache",
]


@dataclass
class AutoencoderConfig:
    """The project's own KL autoencoder (diffusers ``AutoencoderKL``).

    ``len(block_out_channels) − 1`` halvings: (64, 128, 256) maps 128² images to 32² latents.
    """

    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64, 128, 256)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    sample_size: int = 128
    scaling_factor: float = 1.0     # set from data with set_scaling_factor() after training
    kl_weight: float = 1e-6
    mid_block_add_attention: bool = True

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"AutoencoderConfig: block_out_channels {self.block_out_channels} must "
                                 f"be multiples of norm_num_groups={self.norm_num_groups}")


def tiny_autoencoder_config() -> AutoencoderConfig:
    """16² images ↔ 8² × 4 latents, ~60 k parameters (tests)."""
    return AutoencoderConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                             sample_size=16, mid_block_add_attention=False)


def build_autoencoder(config: AutoencoderConfig | None = None):
    """A randomly initialised diffusers ``AutoencoderKL`` described by ``config``."""
    from diffusers import AutoencoderKL

    c = config or AutoencoderConfig()
    n = len(c.block_out_channels)
    return AutoencoderKL(
        in_channels=c.in_channels, out_channels=c.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
        latent_channels=c.latent_channels, norm_num_groups=c.norm_num_groups,
        sample_size=c.sample_size, scaling_factor=c.scaling_factor,
        mid_block_add_attention=c.mid_block_add_attention,
    )


def downsample_factor(ae) -> int:
    """Pixels per latent cell along one side (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(ae.config.block_out_channels) - 1)


def autoencoder_loss(ae, images: torch.Tensor, kl_weight: float = 1e-6, rec: str = "l1",
                     generator: torch.Generator | None = None, return_parts: bool = False):
    """Training loss of a KL autoencoder on ``images`` in [-1, 1]: ``rec(x̂, x) + kl_weight · KL``.

    ``rec`` is ``"l1"`` or ``"l2"`` (mean over pixels); KL is the posterior's KL to N(0, I) summed over
    latent elements, averaged over the batch (the Stable Diffusion convention). The latent is sampled
    from the posterior (``generator`` makes it reproducible). With ``return_parts=True`` returns
    ``(loss, {"rec": ..., "kl": ...})``.
    """
    if rec not in ("l1", "l2"):
        raise ValueError(f"autoencoder_loss: rec must be 'l1' or 'l2', got {rec!r}")
    post = ae.encode(images).latent_dist
    z = post.sample(generator=generator)
    x_hat = ae.decode(z).sample
    r = F.l1_loss(x_hat, images) if rec == "l1" else F.mse_loss(x_hat, images)
    kl = post.kl().mean()
    loss = r + kl_weight * kl
    if return_parts:
        return loss, {"rec": float(r.detach()), "kl": float(kl.detach())}
    return loss


def _is_vq(ae) -> bool:
    return type(ae).__name__ == "VQModel"


def _scale_shift(ae) -> tuple[float, float]:
    sf = getattr(ae.config, "scaling_factor", None)
    sh = getattr(ae.config, "shift_factor", None)
    return (1.0 if sf is None else float(sf)), (0.0 if sh is None else float(sh))


@torch.no_grad()
def encode(ae, images: torch.Tensor, sample: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] → latents ``(z − shift_factor) · scaling_factor``.

    KL autoencoder: the posterior mean (``sample=False``, deterministic — what the latent cache
    stores) or a posterior sample. VQModel: the pre-quantisation latents (quantised again in
    :func:`decode`, diffusers' convention).
    """
    p = next(ae.parameters())
    x = images.to(device=p.device, dtype=p.dtype)
    if _is_vq(ae):
        z = ae.encode(x).latents
    else:
        dist = ae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
    sf, sh = _scale_shift(ae)
    return (z - sh) * sf


@torch.no_grad()
def decode(ae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → images ``[B, 3, H, W]`` clamped to [-1, 1] (float32)."""
    p = next(ae.parameters())
    sf, sh = _scale_shift(ae)
    z = latents.to(device=p.device, dtype=p.dtype) / sf + sh
    x = ae.decode(z).sample
    return x.float().clamp(-1.0, 1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [-1, 1] → ``uint8 [B, H, W, 3]`` (rounded to nearest)."""
    x = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def from_uint8(images) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` (numpy or tensor) → float32 ``[B, 3, H, W]`` in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def set_scaling_factor(ae, images: torch.Tensor) -> float:
    """Set ``ae.config.scaling_factor = 1 / std(latents)`` on a sample of images (unit-variance latents
    for the diffusion model, as Stable Diffusion's 0.18215) and return it."""
    p = next(ae.parameters())
    x = images.to(device=p.device, dtype=p.dtype)
    z = ae.encode(x).latents if _is_vq(ae) else ae.encode(x).latent_dist.mode()
    sf = float(1.0 / z.float().std().clamp_min(1e-6))
    ae.register_to_config(scaling_factor=sf)
    return sf


def autoencoder_hash(ae) -> str:
    """sha256 of the autoencoder's state dict + config (cache key / provenance)."""
    cfg = {k: v for k, v in dict(ae.config).items() if not k.startswith("_")}
    return state_hash(ae, {"class": type(ae).__name__, **cfg})


_SUPPORTED = ("AutoencoderKL", "VQModel")


def load_pretrained_autoencoder(path: str | os.PathLike, torch_dtype: torch.dtype | None = None):
    """Load a user's diffusers ``AutoencoderKL`` or ``VQModel`` from a local folder.

    ``path`` is a folder with ``config.json`` (+ ``diffusion_pytorch_model.safetensors``), or a
    pipeline folder (e.g. a Stable Diffusion snapshot) holding such a folder as ``vae/`` or ``vqvae/``.
    Nothing is downloaded (``local_files_only=True``).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"autoencoder path {str(p)!r} does not exist; pass a local diffusers AutoencoderKL/VQModel "
            f"folder (with config.json), or leave it unset to train the project's own autoencoder")
    if not p.is_dir():
        raise ValueError(f"autoencoder path {str(p)!r} is a file; pass the diffusers model folder that "
                         f"holds config.json and the weights")
    folder = p
    if not (folder / "config.json").is_file():
        for sub in ("vae", "vqvae"):
            if (p / sub / "config.json").is_file():
                folder = p / sub
                break
        else:
            raise ValueError(
                f"{str(p)!r} is not a diffusers model folder: no config.json in it nor in vae/ or vqvae/; "
                f"save the autoencoder with `model.save_pretrained(folder)` and pass that folder")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON: {e}") from e
    cls_name = cfg.get("_class_name")
    if cls_name not in _SUPPORTED:
        raise ValueError(f"{folder} holds a diffusers {cls_name!r}, not one of {_SUPPORTED}; pass the "
                         f"autoencoder's folder (for a pipeline, its vae/ subfolder)")
    import diffusers

    cls = getattr(diffusers, cls_name)
    kw = {"local_files_only": True}
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    try:
        ae = cls.from_pretrained(str(folder), **kw)
    except (OSError, EnvironmentError) as e:
        raise ValueError(f"could not load {cls_name} weights from {folder}: {e}") from e
    return ae.eval()


class LatentCache:
    """One safetensors file of per-dataset tensors (e.g. ``latents`` [N,C,h,w], ``embeddings`` [N,E])
    keyed by the dataset fingerprint and the model hash.

    File: ``<cache_dir>/<name>-<sha256(fingerprint, model_hash)[:16]>.safetensors``; the full keys are
    stored in its metadata and checked on load, so a stale cache is never used. Written once,
    atomically (temporary file, fsync, rename).

    >>> cache = LatentCache(run_dir, fingerprint=index.fingerprint, model_hash=autoencoder_hash(ae))
    >>> tensors = cache.get_or_compute(lambda: {"latents": compute_all_latents()})
    """

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str, model_hash: str,
                 name: str = "latents"):
        self.cache_dir = Path(cache_dir)
        self.name = name
        self.fingerprint = str(fingerprint)
        self.model_hash = str(model_hash)
        key = hashlib.sha256(f"{self.fingerprint}\0{self.model_hash}".encode()).hexdigest()[:16]
        self.path = self.cache_dir / f"{name}-{key}.safetensors"

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        state = {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in tensors.items()}
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        save_file(state, str(tmp), metadata={"fingerprint": self.fingerprint,
                                             "model_hash": self.model_hash})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return self.path

    def load(self) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        if not self.exists():
            raise FileNotFoundError(f"latent cache {self.path} not written yet")
        out = {}
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint or meta.get("model_hash") != self.model_hash:
                raise ValueError(
                    f"latent cache {self.path} was written for fingerprint {meta.get('fingerprint')!r} / "
                    f"model {meta.get('model_hash')!r}, not {self.fingerprint!r} / {self.model_hash!r}; "
                    f"delete it to recompute")
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out

    def get_or_compute(self, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Load the cache, or run ``compute()`` once, save its result and return it."""
        if self.exists():
            return self.load()
        tensors = compute()
        self.save(tensors)
        return {k: torch.as_tensor(v).detach().cpu() for k, v in tensors.items()}
