"""The training loop: DeepSpeed ZeRO around a student, an EMA teacher, schedules, checkpoints.

Method-agnostic: a recipe hands over the student (what DeepSpeed optimises) and an *objective*
(everything else: teacher, loss, its own state). Per step the trainer sets lr / weight decay from
their schedules, asks the objective for the loss, agrees with every rank that loss and gradients
are finite, steps, and — only when the step is kept — updates the EMA teacher and lets the
objective commit its running state (DINO's centre); then it logs and checkpoints.

Who owns overflow: in fp32/bf16 the trainer (a non-finite loss or gradient on any rank skips the
step on every rank). In fp16 DeepSpeed's dynamic loss scaler: gradients are loss-scaled, an
overflow must reach the scaler so it halves the scale and skips the step itself; the trainer then
only reads ``engine.was_step_applied()``.

On more than one rank every BatchNorm of the student and of the objective (the teacher's) is
converted to a synchronised BatchNorm, as DINO does (genssl.models.sync_batchnorm).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterable, Protocol

import torch
from torch import nn

from genssl.engine.checkpoint import CheckpointManager, rng_state, seed_rng, set_rng_state
from genssl.engine.config import (ConfigError, identity_at_world_size, read_deepspeed_json, run_differences,
                                  run_identity, write_config)
from genssl.engine.distributed import DistInfo, any_rank
from genssl.engine.lars import adapts, apply_lars
from genssl.engine.metrics import MetricsLogger, peak_memory_gb
from genssl.engine.run_config import TrainConfig
from genssl.models.schedules import cosine_schedule
from genssl.models.ema import EMATeacher
from genssl.models.sync_batchnorm import convert_sync_batchnorm, has_batchnorm


@dataclasses.dataclass
class Progress:
    """Where training stands; handed to the objective every step."""

    global_step: int
    epoch: int
    step_in_epoch: int
    steps_per_epoch: int
    total_steps: int


class Objective(Protocol):
    teacher: EMATeacher | None  # EMA of the student, updated after every step (None: no EMA)

    def training_loss(self, engine, batch, progress: Progress) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss to back-propagate through ``engine`` (the DeepSpeed-wrapped student) and log terms."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict): ...

    # Optional: ``step_kept()`` applies the running-state updates of the last ``training_loss``
    # (e.g. DINO's centre). The trainer calls it only for steps every rank keeps, so a skipped
    # step leaves no trace in the objective's state.


class Loader(Protocol):
    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def iter_from(self, step: int) -> Iterable: ...


@dataclasses.dataclass
class TrainResult:
    global_step: int
    last_loss: float
    images_per_s: float
    skipped_steps: int


def compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def deepspeed_config(cfg: TrainConfig, dist: DistInfo, user_config: str | None = None) -> dict:
    """Our settings, with a user's DeepSpeed JSON (``--deepspeed_config``) layered on top.

    The file tunes what DeepSpeed alone decides (offload, bucket sizes, overlap, ...); the keys the
    run's config owns (batch size, precision, ZeRO stage, clipping, optimizer, schedules) are refused
    by ``read_deepspeed_json``, so ``cfg`` is never changed here.
    """
    if cfg.precision == "fp16" and dist.device.type != "cuda":
        raise ConfigError("precision=fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16 path); use precision=bf16 or fp32")
    if cfg.precision == "fp16" and cfg.optim.name == "lars":
        raise ConfigError("optim.name=lars does not work with precision=fp16: the trust ratio would see loss-scaled "
                          "gradients; use precision=bf16 or fp32")
    config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if user_config:
        for key, value in read_deepspeed_json(user_config).items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
    return config


def param_groups(student: nn.Module, late_params: set[int], fixed_lr_params: set[int] = frozenset()) -> list[dict]:
    """Groups by {decay, no decay} x {late (frozen in the first epochs)} x {fixed lr (no schedule)}.

    Biases and norm parameters (ndim <= 1) take no weight decay, as in DINO. Only the combinations
    that have parameters become groups.
    """
    groups: dict[tuple[bool, bool, bool], list] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        key = (adapts(name, p), id(p) in late_params, id(p) in fixed_lr_params)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "decay": decay, "late": late, "fixed": fixed, "lr": 0.0, "weight_decay": 0.0}
            for (decay, late, fixed), ps in sorted(groups.items())]


def build_optimizer(groups: list[dict], cfg: TrainConfig, dist: DistInfo) -> torch.optim.Optimizer:
    """``optim.name``: AdamW, SGD with momentum, or LARS (SGD with momentum on gradients that
    `engine.lars.apply_lars` rewrote). All update element-wise, so they stay exact under every ZeRO
    stage (DeepSpeed hands them flat partitions of the parameters)."""
    fused = dist.device.type == "cuda"
    if cfg.optim.name in ("sgd", "lars"):
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.optim.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.optim.betas, fused=fused)


class _GradientWatch:
    """Notices non-finite gradients on this rank during backward, at any ZeRO stage.

    Tensor hooks see each parameter's local gradient before DeepSpeed reduces or partitions it.
    The check is a sum per gradient (one read) kept on the device; one host sync per step.
    """

    def __init__(self, module: nn.Module):
        self.sums: list[torch.Tensor] = []
        self.handles = [p.register_hook(self._hook) for p in module.parameters() if p.requires_grad]

    def _hook(self, grad: torch.Tensor):
        self.sums.append(grad.detach().float().sum())
        return None

    def bad(self) -> torch.Tensor:
        if not self.sums:
            return torch.tensor(False)
        total = torch.stack(self.sums).sum()
        self.sums.clear()
        return ~torch.isfinite(total)


def _zero_gradients(engine) -> None:
    """Replace every gradient by zero before a skipped step (works under every ZeRO stage)."""
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

    for p in engine.module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is not None and engine.zero_optimization_stage() == 0 and not hasattr(p, "_hp_mapping"):
            p.grad.zero_()
            continue
        grad = safe_get_full_grad(p)
        if grad is not None:
            safe_set_full_grad(p, torch.zeros_like(grad))


def fit(cfg: TrainConfig, dist: DistInfo, student: nn.Module, objective: nn.Module, loader: Loader,
        run_dir: str | Path, deepspeed_config_file: str | None = None,
        late_params: Iterable[nn.Parameter] = (), fixed_lr_params: Iterable[nn.Parameter] = ()) -> tuple[object, TrainResult]:
    """Train ``student`` with ``objective`` for ``cfg.epochs`` epochs; returns (engine, result).

    ``late_params`` get lr 0 for the first ``optim.freeze_last_layer_epochs`` epochs (DINO's last
    layer, SwAV's prototypes); ``fixed_lr_params`` keep the peak lr, with neither warm-up nor decay
    (SimSiam's predictor).
    """
    import deepspeed

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ds_config = deepspeed_config(cfg, dist, deepspeed_config_file)
    ckpt = CheckpointManager(run_dir, cfg.ckpt.keep_last, dist)
    tag = ckpt.latest() if cfg.ckpt.resume else None
    if not cfg.ckpt.resume:
        ckpt.set_aside()
    if tag is not None and ckpt.needs_universal(tag):
        ckpt.to_universal(tag)  # written at another world size: DeepSpeed re-partitions its universal form
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    if dist.world_size > 1 and has_batchnorm(student):
        student = convert_sync_batchnorm(student, dist.device)  # keeps parameter objects: late_params stay valid
        objective = convert_sync_batchnorm(objective, dist.device)
    groups = param_groups(student, {id(p) for p in late_params}, {id(p) for p in fixed_lr_params})
    optimizer = build_optimizer(groups, cfg, dist)
    student.to(dist.device)
    objective.to(dist.device)
    engine, optimizer, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    # DeepSpeed makes every rank's student rank 0's; the objective's own state (the EMA teacher, a
    # centre) must start equal on every rank too, whatever each rank's RNG did.
    _broadcast_state(objective, dist)

    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError(f"the data gives no full batch of {cfg.batch_size} per rank on {dist.world_size} rank(s); "
                         "lower batch_size or add images")
    total_steps = cfg.epochs * steps_per_epoch
    global_batch = cfg.batch_size * dist.world_size
    peak_lr = cfg.optim.lr * global_batch / 256
    lr_sched = cosine_schedule(peak_lr, cfg.optim.min_lr, total_steps,
                               warmup_steps=min(total_steps, int(cfg.optim.warmup_epochs * steps_per_epoch)))
    wd_sched = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total_steps)
    momentum_sched = cosine_schedule(cfg.ema.momentum, cfg.ema.momentum_end, total_steps)
    late_until = cfg.optim.freeze_last_layer_epochs * steps_per_epoch

    identity = run_identity(cfg, training_only=True)  # what a checkpoint must match to be resumed
    start_step = 0
    if tag is not None:
        client_state, rank_state = ckpt.load(engine, tag)
        stored = identity_at_world_size(client_state.get("run_identity"), cfg, ckpt.world_size_of(tag), dist.world_size)
        differences = run_differences(stored, cfg, training_only=True)
        if differences:
            length = ("The lr, weight-decay and EMA-momentum schedules span all epochs of a run, so its number of "
                      "epochs cannot change once it has started. " if any(d.startswith("epochs:") for d in differences) else "")
            raise ConfigError(f"{run_dir} holds a checkpoint (step {client_state.get('global_step')}) of a run with other "
                              f"settings: {'; '.join(differences)}. {length}To resume it, rerun with the settings it was started "
                              f"with (recorded in {run_dir / 'config.yaml'}); to start a new run, choose a new out= "
                              "(or ckpt.resume=false to train from scratch here)")
        objective.load_state_dict(client_state["objective"])
        start_step = client_state["global_step"]
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        else:  # another world size: no writing rank's RNG streams belong to this rank; start them afresh
            seed_rng(cfg.seed, start_step, dist.rank)
        if dist.is_main:
            resized = "" if rank_state is not None else (
                f" (written by {ckpt.world_size_of(tag)} ranks, resumed on {dist.world_size}: the same global batch of "
                f"{global_batch} and data position; random augmentations from here on are drawn afresh)")
            print(f"resumed from {ckpt.dir / tag} at step {start_step}/{total_steps}{resized}", flush=True)
    if dist.is_main:  # after the resume check: a refused start leaves the run's own config.yaml
        write_config(cfg, run_dir / "config.yaml")

    logger = MetricsLogger(run_dir, dist.is_main, total_steps, resume_step=start_step, progress=cfg.log.progress,
                           tensorboard=cfg.log.tensorboard)
    loss_scaled = cfg.precision == "fp16"  # DeepSpeed's loss scaler owns overflow (module docstring)
    lars = cfg.optim.name == "lars"
    watch = None if loss_scaled else _GradientWatch(engine.module)

    def save(step: int) -> None:
        client_state = {"global_step": step, "objective": objective.state_dict(), "run_identity": identity}
        ckpt.save(engine, step, client_state, {"rng": rng_state()})

    global_step, skipped, consecutive_skips = start_step, 0, 0
    last_loss, window_images, window_start, rates = float("nan"), 0, time.perf_counter(), []
    start_epoch = start_step // steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch)
        first = start_step - epoch * steps_per_epoch if epoch == start_epoch else 0
        for step_in_epoch, batch in enumerate(loader.iter_from(first), start=first):
            progress = Progress(global_step, epoch, step_in_epoch, steps_per_epoch, total_steps)
            for group in optimizer.param_groups:
                frozen = group["late"] and global_step < late_until
                group["lr"] = 0.0 if frozen else peak_lr if group["fixed"] else float(lr_sched[global_step])
                # LARS folds weight decay into the gradient it rewrites (engine/lars.py)
                group["weight_decay"] = float(wd_sched[global_step]) if group["decay"] and not lars else 0.0

            loss, terms = objective.training_loss(engine, batch, progress)
            if not loss_scaled and any_rank(~torch.isfinite(loss.detach()), dist.device):
                # No backward: nothing reached the optimizer, so skipping is exact.
                skipped, consecutive_skips = _on_nonfinite(cfg, dist, "loss", global_step, skipped, consecutive_skips)
                engine.module.zero_grad(set_to_none=True)
                global_step += 1
                logger.advance()
                continue
            engine.backward(loss)
            gradients_bad = watch is not None and bool(any_rank(watch.bad(), dist.device))
            if gradients_bad:
                skipped, consecutive_skips = _on_nonfinite(cfg, dist, "gradient", global_step, skipped, consecutive_skips)
                _zero_gradients(engine)  # the step then changes no weight (lr 0); Adam moments decay once
                for group in optimizer.param_groups:
                    group["lr"] = 0.0
            elif lars:
                apply_lars(engine.module, float(wd_sched[global_step]), cfg.optim.lars_eta)
            engine.step()
            kept = not gradients_bad and engine.was_step_applied()  # False on an fp16 overflow: the scaler skipped it
            if kept:
                consecutive_skips = 0
                if getattr(objective, "teacher", None) is not None:
                    objective.teacher.update(engine.module, float(momentum_sched[global_step]))
                if hasattr(objective, "step_kept"):
                    objective.step_kept()
            elif loss_scaled:
                skipped += 1  # the loss scaler halved the scale; it raises by itself if the scale cannot drop further
            global_step += 1
            window_images += cfg.batch_size * dist.world_size
            logger.advance()

            if global_step % cfg.log.every_steps == 0 or global_step == total_steps:
                last_loss = _mean_over_ranks(loss.detach().float(), dist)
                elapsed = time.perf_counter() - window_start
                rates.append(window_images / max(elapsed, 1e-9))
                record = {"step": global_step, "epoch": round(global_step / steps_per_epoch, 4), "loss": last_loss,
                          **{k: float(v) for k, v in terms.items()},
                          "lr": float(lr_sched[global_step - 1]), "wd": float(wd_sched[global_step - 1]),
                          "momentum": float(momentum_sched[global_step - 1]),
                          "images_per_s": rates[-1], "mem_gb": peak_memory_gb(dist.device),
                          "skipped_steps": skipped}
                if hasattr(loader, "read_problems"):  # data the loader could not use as asked (docs/DATA.md)
                    record.update(_sum_over_ranks(loader.read_problems(), dist))
                logger.log(record)
                window_images, window_start = 0, time.perf_counter()
            if cfg.ckpt.every_steps and global_step % cfg.ckpt.every_steps == 0 and global_step < total_steps:
                save(global_step)
    if start_step < total_steps or ckpt.latest() is None:
        save(global_step)
    logger.close()
    # The first window includes start-up (compilation, pipeline warm-up); report the median of the rest.
    steady = sorted(rates[1:] or rates)
    images_per_s = steady[len(steady) // 2] if steady else float("nan")
    return engine, TrainResult(global_step, last_loss, images_per_s, skipped)


def _broadcast_state(module: nn.Module, dist: DistInfo) -> None:
    import torch.distributed as tdist

    if dist.world_size > 1:
        for tensor in module.state_dict().values():
            tdist.broadcast(tensor, src=0)


def _mean_over_ranks(value: torch.Tensor, dist: DistInfo) -> float:
    import torch.distributed as tdist

    value = value.reshape(1).clone()
    if dist.world_size > 1:
        tdist.all_reduce(value)
    return float(value) / dist.world_size


def _sum_over_ranks(counts: dict[str, int], dist: DistInfo) -> dict[str, int]:
    """Per-rank counts summed over the ranks (every rank calls this at the same step). A file or
    source met by two ranks in different epochs counts twice."""
    import torch.distributed as tdist

    values = torch.tensor([float(v) for v in counts.values()], dtype=torch.float64, device=dist.device)
    if dist.world_size > 1:
        tdist.all_reduce(values)
    return {k: int(v) for k, v in zip(counts, values.tolist())}


def _on_nonfinite(cfg: TrainConfig, dist: DistInfo, what: str, step: int, skipped: int, consecutive: int) -> tuple[int, int]:
    consecutive += 1
    skipped += 1
    if cfg.on_nonfinite == "stop" or consecutive > cfg.max_skipped_steps:
        reason = ("on_nonfinite=stop" if cfg.on_nonfinite == "stop"
                  else f"{consecutive} consecutive steps were skipped (max_skipped_steps={cfg.max_skipped_steps})")
        raise FloatingPointError(
            f"non-finite {what} at step {step} on at least one rank; stopping ({reason}). Lower optim.lr, use "
            "precision=bf16 or fp32, check the data, and resume from the last checkpoint by rerunning the command.")
    if dist.is_main:
        print(f"warning: non-finite {what} at step {step} on at least one rank; all ranks skip this update", flush=True)
    return skipped, consecutive


__all__ = ["Progress", "Objective", "TrainResult", "fit", "build_optimizer", "deepspeed_config", "compute_dtype", "param_groups"]
