"""E-LDM: latent diffusion conditioned on an SSL embedding through ONE cross-attention token
(docs/METHODS.md §1.3).

``ELDM`` = a diffusers ``UNet2DConditionModel`` + a learned map ``e ↦ LayerNorm(Linear(ê))`` from the
L2-normalised embedding ``ê`` to one context token ``[B, 1, cross_attention_dim]`` fed to every
cross-attention. ε-prediction, 1000-step linear β schedule (diffusers ``DDPMScheduler``),
classifier-free guidance learned by replacing ``e`` with the zero vector with p = ``cfg_dropout``.

The unconditional token is ``map(0) = LayerNorm(Linear.bias)``: the zero embedding goes through the
same map, so the "null" token is learned with it (dropped rows in training, ε_u in sampling);
:meth:`ELDM.null_tokens` returns it.

The guided UNet step used by every sampler backend is :func:`guided_eps` / :class:`GuidedStep`:
``cat([x, x]) → UNet(·, t, cat([uncond, cond])) → split → ε_u + w(ε_c − ε_u)``.

The UNet's attention kernel (:func:`set_unet_attention`, ``generation.attention=``): ``sdpa`` is
diffusers' ``AttnProcessor2_0`` (torch SDPA), ``xformers`` its xformers processor (CUDA only), ``auto``
xformers when it is importable and the UNet is on CUDA, else sdpa (models/packed_vit.py
``resolve_attention``, the rule of the ViT's packed multi-crop pass). Both compute the same attention.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from genssl.models.packed_vit import resolve_attention

__all__ = [
    "ELDMConfig", "ELDM", "GuidedStep", "guided_eps", "tiny_eldm_config", "state_hash",
    "save_eldm", "load_eldm", "set_unet_attention",
]


def state_hash(module: nn.Module, config: dict | None = None) -> str:
    """sha256 over the state dict (sorted names, dtypes, shapes and raw bytes) and a JSON config.

    Used as the provenance hash of a generator checkpoint (view store attribute) and as a cache key.
    """
    h = hashlib.sha256()
    if config is not None:
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ELDMConfig:
    """E-LDM architecture and training settings (defaults: a mid-size UNet for 32×32×4 latents)."""

    embed_dim: int = 384                       # SSL embedding size (ViT-S/16: 384)
    latent_channels: int = 4
    sample_size: int = 32                      # latent height = width
    block_out_channels: tuple[int, ...] = (128, 256, 512)
    layers_per_block: int = 2
    cross_attention_dim: int = 512             # width of the single context token
    attention_heads: int = 8                   # diffusers' `attention_head_dim` (= number of heads)
    norm_num_groups: int = 32
    down_block_types: tuple[str, ...] | None = None   # None: cross-attention in all but the last
    up_block_types: tuple[str, ...] | None = None
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    beta_schedule: str = "linear"
    cfg_dropout: float = 0.1

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if self.down_block_types is not None:
            self.down_block_types = tuple(self.down_block_types)
        if self.up_block_types is not None:
            self.up_block_types = tuple(self.up_block_types)
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"ELDMConfig: block_out_channels {self.block_out_channels} must be "
                                 f"multiples of norm_num_groups={self.norm_num_groups}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"ELDMConfig: cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        n = len(self.block_out_channels)
        if self.down_block_types is not None:
            down = self.down_block_types
        else:
            down = tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]) if n > 1 else (
                "CrossAttnDownBlock2D",)
        if self.up_block_types is not None:
            up = self.up_block_types
        else:
            up = tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)) if n > 1 else (
                "CrossAttnUpBlock2D",)
        if len(down) != n or len(up) != n:
            raise ValueError(f"ELDMConfig: {n} block_out_channels need {n} down/up block types, got "
                             f"{len(down)}/{len(up)}")
        self.down_block_types, self.up_block_types = tuple(down), tuple(up)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ELDMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ELDMConfig: unknown keys {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


def tiny_eldm_config(embed_dim: int = 16, sample_size: int = 8, latent_channels: int = 4) -> ELDMConfig:
    """A UNet of ~0.2 M parameters: a forward on [2,4,8,8] takes milliseconds on CPU (tests)."""
    return ELDMConfig(embed_dim=embed_dim, latent_channels=latent_channels, sample_size=sample_size,
                      block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32,
                      attention_heads=2, norm_num_groups=8)


def _timesteps_for(t, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device).reshape(-1)
    return t.expand(n) if t.numel() == 1 else t


def guided_eps(unet: nn.Module, latents: torch.Tensor, t, cond_tokens: torch.Tensor,
               uncond_tokens: torch.Tensor, w) -> torch.Tensor:
    """Classifier-free guided ε in ONE UNet call: ``ε = ε_u + w·(ε_c − ε_u)``.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (``ELDM.unet``).
        latents: ``[B, C, h, w]``.
        t: timestep: a scalar, ``[1]`` or ``[B]`` tensor (any numeric dtype).
        cond_tokens / uncond_tokens: ``[B, 1, D]``; ``uncond_tokens`` may be ``[1, 1, D]`` (broadcast).
        w: guidance scale: float, ``[1]`` or ``[B]`` tensor.
    """
    B = latents.shape[0]
    if uncond_tokens.shape[0] != B:
        uncond_tokens = uncond_tokens.expand(B, -1, -1)
    x = torch.cat([latents, latents], 0)
    tokens = torch.cat([uncond_tokens, cond_tokens], 0).to(latents.dtype)
    tt = _timesteps_for(t, B, latents.device)
    tt = torch.cat([tt, tt], 0)
    eps = unet(x, tt, encoder_hidden_states=tokens, return_dict=False)[0]
    eps_u, eps_c = eps.chunk(2, dim=0)
    w = torch.as_tensor(w, device=latents.device, dtype=eps.dtype).reshape(-1, 1, 1, 1)
    return eps_u + w * (eps_c - eps_u)


def set_unet_attention(unet: nn.Module, attention: str = "auto") -> str:
    """Set every attention processor of a diffusers UNet for ``attention=`` ("auto", "sdpa", "xformers")
    on the UNet's current device; returns the kernel chosen ("sdpa" or "xformers").

    Move the UNet to its device first. xformers runs eager only: the compiled, CUDA-graph and
    TensorRT sampler backends (generators/backends.py) want ``sdpa``.
    """
    backend = resolve_attention(attention, next(unet.parameters()).device)
    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    return backend


class GuidedStep(nn.Module):
    """``nn.Module`` wrapper of :func:`guided_eps` (what is compiled / exported to ONNX)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, latents, t, cond_tokens, uncond_tokens, w):
        return guided_eps(self.unet, latents, t, cond_tokens, uncond_tokens, w)


class ELDM(nn.Module):
    """Latent diffusion model conditioned on one embedding token."""

    def __init__(self, config: ELDMConfig):
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DConditionModel

        self.config = config
        c = config
        self.unet = UNet2DConditionModel(
            sample_size=c.sample_size, in_channels=c.latent_channels, out_channels=c.latent_channels,
            down_block_types=c.down_block_types, up_block_types=c.up_block_types,
            block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
            cross_attention_dim=c.cross_attention_dim, attention_head_dim=c.attention_heads,
            norm_num_groups=c.norm_num_groups,
        )
        self.cond_map = nn.Sequential(nn.Linear(c.embed_dim, c.cross_attention_dim),
                                      nn.LayerNorm(c.cross_attention_dim))
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
            beta_schedule=c.beta_schedule, prediction_type="epsilon", clip_sample=False)

    # ---------------------------------------------------------------- conditioning
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t of the training schedule, float32 ``[num_train_timesteps]`` (on CPU)."""
        return self.noise_scheduler.alphas_cumprod

    def condition(self, e: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Context tokens ``[B, 1, cross_attention_dim]`` for embeddings ``e`` ``[B, embed_dim]``.

        ``e`` is L2-normalised first. Rows where ``drop_mask`` is True use the zero embedding, so their
        token is ``map(0) = LayerNorm(Linear.bias)`` (the learned unconditional token).
        """
        p = self.cond_map[0].weight
        e = torch.as_tensor(e).to(device=p.device, dtype=p.dtype)
        if e.dim() != 2 or e.shape[1] != self.config.embed_dim:
            raise ValueError(f"ELDM.condition: expected embeddings [B, {self.config.embed_dim}], "
                             f"got {tuple(e.shape)}")
        e = F.normalize(e, dim=-1)
        if drop_mask is not None:
            drop_mask = torch.as_tensor(drop_mask, device=e.device).reshape(-1, 1).bool()
            e = torch.where(drop_mask, torch.zeros_like(e), e)
        return self.cond_map(e)[:, None, :]

    def null_tokens(self, batch: int = 1) -> torch.Tensor:
        """The unconditional token ``map(0)``, ``[batch, 1, cross_attention_dim]``."""
        p = self.cond_map[0].weight
        return self.cond_map(torch.zeros(1, self.config.embed_dim, device=p.device, dtype=p.dtype)
                             )[:, None, :].expand(batch, -1, -1)

    # ---------------------------------------------------------------- model
    def unet_eps(self, latents: torch.Tensor, t, tokens: torch.Tensor) -> torch.Tensor:
        tt = _timesteps_for(t, latents.shape[0], latents.device)
        return self.unet(latents, tt, encoder_hidden_states=tokens.to(latents.dtype), return_dict=False)[0]

    def forward(self, latents: torch.Tensor, t, e: torch.Tensor,
                drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ε prediction ``[B, C, h, w]`` for noisy ``latents`` at timesteps ``t`` given embeddings ``e``."""
        return self.unet_eps(latents, t, self.condition(e, drop_mask))

    def set_attention(self, attention: str = "auto") -> str:
        """:func:`set_unet_attention` on this model's UNet; returns "sdpa" or "xformers"."""
        return set_unet_attention(self.unet, attention)

    def guided_step(self) -> GuidedStep:
        return GuidedStep(self.unet)

    def training_loss(self, latents: torch.Tensor, e: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """ε-prediction MSE: ``t ~ U{0..T−1}``, ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε``; the condition is
        dropped (zero embedding) with probability ``cfg_dropout`` per sample.

        ``generator`` (a CPU ``torch.Generator``) makes t, ε and the drop mask reproducible.
        """
        B = latents.shape[0]
        dev = latents.device
        gdev = generator.device if generator is not None else dev
        T = self.config.num_train_timesteps
        t = torch.randint(0, T, (B,), generator=generator, device=gdev).to(dev)
        noise = torch.randn(latents.shape, generator=generator, device=gdev, dtype=torch.float32
                            ).to(device=dev, dtype=latents.dtype)
        drop = (torch.rand((B,), generator=generator, device=gdev) < self.config.cfg_dropout).to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self(noisy, t, e, drop_mask=drop)
        return F.mse_loss(pred.float(), noise.float())

    # ---------------------------------------------------------------- provenance
    def model_hash(self) -> str:
        """sha256 of the state dict bytes + config (the generator hash of a view store)."""
        return state_hash(self, self.config.to_dict())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


_WEIGHTS, _CONFIG = "eldm.safetensors", "eldm.json"


def save_eldm(model: ELDM, directory: str | os.PathLike) -> Path:
    """Write ``eldm.json`` (config + hash) and ``eldm.safetensors`` into ``directory`` (atomic per file)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = d / f".{_WEIGHTS}.tmp{os.getpid()}"
    save_file(state, str(tmp))
    os.replace(tmp, d / _WEIGHTS)
    meta = {"config": model.config.to_dict(), "model_hash": model.model_hash()}
    tmp = d / f".{_CONFIG}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, d / _CONFIG)
    return d


def load_eldm(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ELDM:
    """Load an E-LDM saved by :func:`save_eldm` (``path`` = its folder or the ``.safetensors`` file)."""
    from safetensors.torch import load_file

    p = Path(path)
    d = p.parent if p.suffix == ".safetensors" else p
    if not (d / _CONFIG).is_file() or not (d / _WEIGHTS).is_file():
        raise FileNotFoundError(f"load_eldm: {d} holds no {_CONFIG} + {_WEIGHTS} (written by save_eldm); "
                                f"pass the E-LDM run directory or its {_WEIGHTS}")
    meta = json.loads((d / _CONFIG).read_text())
    model = ELDM(ELDMConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(d / _WEIGHTS), device=str(map_location)))
    return model
