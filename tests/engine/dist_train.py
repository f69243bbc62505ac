"""A small, fully real DINO training run for the engine tests (DeepSpeed, EMA teacher, checkpoints).

Run under torchrun / the deepspeed launcher / plain python:
    python tests/engine/dist_train.py out=DIR zero_stage=3 batch_size=4 ...
Uses synthetic multi-crop data (a pure function of (seed, sample index)), so a run on W ranks with
batch B sees the same samples per step as a run on 1 rank with batch W*B. Writes DIR/teacher.pt.
Extra key ``nan_at_step=K`` makes the loss non-finite at global step K (tests the skip/stop path).
The environment variable ``GENSSL_TEST_EXIT_AT_STEP=K`` ends every rank abruptly (exit 17, no
clean-up) when step K+1 is about to be computed: a crash after K steps that leaves the config alone,
so the rerun is the same run (resume tests).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from genssl.data.synthetic import SyntheticMultiCropLoader
from genssl.engine.config import parse_config
from genssl.engine.distributed import cleanup, setup_distributed
from genssl.engine.run_config import TrainConfig
from genssl.engine.trainer import compute_dtype, fit
from genssl.models.objectives import DINOConfig, DINOObjective, build_dino_student


@dataclasses.dataclass
class TestRunConfig(TrainConfig):
    n_samples: int = 48
    nan_at_step: int = -1
    step_sleep: float = 0.0  # seconds per step, to leave a window for the SIGKILL test
    dino: DINOConfig = dataclasses.field(default_factory=lambda: DINOConfig(
        out_dim=64, hidden_dim=32, bottleneck_dim=16, drop_path_rate=0.0))


class NaNInjectingObjective(DINOObjective):
    def __init__(self, *args, nan_at_step: int, step_sleep: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_at_step, self.step_sleep = nan_at_step, step_sleep

    def training_loss(self, engine, batch, progress):
        if progress.global_step == int(os.environ.get("GENSSL_TEST_EXIT_AT_STEP", -1)):
            os._exit(17)
        time.sleep(self.step_sleep)
        loss, terms = super().training_loss(engine, batch, progress)
        if progress.global_step == self.nan_at_step:
            loss = loss * float("nan")
        return loss, terms


def main(argv=None):
    defaults = ["model=vit_tiny", "patch_size=4", "epochs=2", "batch_size=4", "precision=fp32", "log.progress=false",
                "log.every_steps=1", "optim.warmup_epochs=0", "ckpt.every_steps=0", "eval.knn=false"]
    args = parse_config(defaults + list(sys.argv[1:] if argv is None else argv), TestRunConfig)
    cfg = args.config
    dist = setup_distributed(args.local_rank)
    # A different RNG per rank on purpose: the engine must make every rank's student and EMA teacher
    # rank 0's (tests compare against a single process seeded like rank 0).
    torch.manual_seed(cfg.seed + dist.rank)
    student = build_dino_student(cfg.model, 8, cfg.patch_size, cfg.dino)
    objective = NaNInjectingObjective(student, cfg.dino, 2, cfg.epochs, compute_dtype(cfg.precision),
                                      nan_at_step=cfg.nan_at_step, step_sleep=cfg.step_sleep)
    loader = SyntheticMultiCropLoader(cfg.n_samples, cfg.batch_size, dist.rank, dist.world_size, cfg.seed,
                                      global_size=8, local_size=4, n_local=2)
    engine, result = fit(cfg, dist, student, objective, loader, cfg.out, args.deepspeed_config,
                    late_params=student.head.last_layer_parameters())
    # The teacher's targets on one fixed probe, twice: they must not change from call to call (no
    # drop path, no dropout in the teacher) nor differ by rank.
    # (Saved after the weights: a BatchNorm teacher's forward updates its running statistics.)
    optimizer = engine.optimizer
    loss_scale = getattr(optimizer, "loss_scale", getattr(optimizer, "cur_scale", None))  # fp16 only
    state = {"teacher": {k: v.clone() for k, v in objective.teacher.state_dict().items()},
             "center": objective.loss.center, "skipped": result.skipped_steps,
             "loss_scale": float(loss_scale) if loss_scale is not None else None}
    probe = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(123))]
    state["targets"] = [objective.teacher_logits(probe) for _ in range(2)]
    torch.save(state, f"{cfg.out}/teacher.pt" if dist.is_main else f"{cfg.out}/teacher_rank{dist.rank}.pt")
    cleanup()


if __name__ == "__main__":
    main()
