"""Rank-0 metrics: ``metrics.jsonl`` (one JSON object per logged step) and a progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from genssl.engine.atomic import write_text_atomic


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # CPU: the process's peak resident set
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:
        return 0.0


class MetricsLogger:
    """Appends to ``metrics.jsonl``; on resume, drops lines past the resumed step first.

    A killed run may have logged steps after its last checkpoint; those steps are trained again
    after resume, so their stale lines are removed to keep one line per step.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, resume_step: int = 0, progress: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
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
        if progress:
            # Redirected output (logs, CI) gets a line every 30 s instead of a redraw per step.
            self.bar = tqdm(total=total_steps, initial=resume_step, dynamic_ncols=True, desc="train",
                            mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record.get('lr', 0):.2e}",
                                 img_s=f"{record.get('images_per_s', 0):.0f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.bar is not None:
                self.bar.close()
