"""Rank-0 metrics: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard event files in the
run folder, and a progress bar.

TensorBoard (``log.tensorboard``, on by default) gets every number of each ``metrics.jsonl`` record as
the scalar ``train/<key>`` at that record's step (float32, TensorBoard's scalar type), the k-NN /
linear results as ``eval/*`` (engine/pretrain.py), and preview images (`log_image`). Each stage of a
pipeline writes into its own run folder, so ``tensorboard --logdir runs/gensis`` shows the stages
side by side. Writers come from ``torch.utils.tensorboard``, imported only when one is opened.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from genssl.engine.atomic import write_text_atomic

# The run folder -> the writer a MetricsLogger holds open there. TensorBoard follows only the newest
# event file of a folder while it is being written (``--reload_multifile`` is off by default), so an
# image logged during training goes through the training's writer instead of starting a second file.
_OPEN_WRITERS: dict[Path, object] = {}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # CPU: the process's peak resident set
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:
        return 0.0


def _summary_writer(run_dir: str | Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard (~2 s): only when asked for
    except ImportError as e:
        raise ValueError(f"log.tensorboard=true needs the tensorboard package ({e}); pip install tensorboard "
                         "(a genssl dependency), or pass log.tensorboard=false") from e
    return SummaryWriter(str(run_dir), purge_step=purge_step)


@contextlib.contextmanager
def tensorboard_writer(run_dir: str | Path) -> Iterator[object]:
    """The writer open in ``run_dir`` (a running training's), else a new one, closed on exit."""
    writer = _OPEN_WRITERS.get(Path(run_dir).resolve())
    if writer is not None:
        yield writer
        writer.flush()
        return
    writer = _summary_writer(run_dir)
    try:
        yield writer
    finally:
        writer.close()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def log_scalars(run_dir: str | Path, scalars: dict, step: int) -> None:
    """Every number of ``scalars`` (``{tag: value}``) at ``step`` into ``run_dir``'s event files (rank 0 calls it)."""
    with tensorboard_writer(run_dir) as writer:
        for tag, value in scalars.items():
            if _is_number(value):
                writer.add_scalar(tag, value, step)


def log_image(run_dir: str | Path, tag: str, image: np.ndarray, step: int) -> None:
    """An ``[H, W, 3]`` uint8 image (a preview grid, a contact sheet) at ``step`` into ``run_dir``'s event files."""
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, (image.shape, image.dtype)
    with tensorboard_writer(run_dir) as writer:
        writer.add_image(tag, image, step, dataformats="HWC")


class MetricsLogger:
    """Appends to ``metrics.jsonl`` and, with ``tensorboard``, to an event file; on resume, drops
    what lies past the resumed step first.

    A killed run may have logged steps after its last checkpoint; those steps are trained again
    after resume, so their stale lines are removed to keep one line per step. TensorBoard is told
    the same through ``purge_step``: on reading, it hides the older files' events from step
    ``resume_step + 1`` on (also on a fresh start, so a folder trained again from scratch shows one run).
    """

    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, resume_step: int = 0, progress: bool = True,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass  # a line cut by a kill
            write_text_atomic(self.path, "".join(k + "\n" for k in kept))
        self.fh = open(self.path, "a")
        if tensorboard:
            self.writer = _summary_writer(run_dir, purge_step=resume_step + 1)
            _OPEN_WRITERS[Path(run_dir).resolve()] = self.writer
        if progress:
            # Redirected output (logs, CI) gets a line every 30 s instead of a redraw per step.
            self.bar = tqdm(total=total_steps, initial=resume_step, dynamic_ncols=True, desc="train",
                            mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and _is_number(value):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record.get('lr', 0):.2e}",
                                 img_s=f"{record.get('images_per_s', 0):.0f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.writer is not None:
                _OPEN_WRITERS.pop(Path(self.path.parent).resolve(), None)
                self.writer.close()
            if self.bar is not None:
                self.bar.close()
