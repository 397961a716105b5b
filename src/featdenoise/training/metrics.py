"""Run metrics: one JSON object per line in ``metrics.jsonl`` and TensorBoard scalars.

Only the main process writes (the caller passes ``enabled=distributed.is_main()``). Each record is
``{"kind": "train"|"eval"|"final"|"epoch"|"resume"|"overfit_check", "epoch": int, "step": int,
"time": unix seconds, ...}``.
"""

from __future__ import annotations

import json
import logging
import os
import time

from featdenoise.runtime import optional

log = logging.getLogger(__name__)


class MetricsLogger:
    """Append metric records to ``run_dir/metrics.jsonl`` and (optionally) TensorBoard."""

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        # TensorBoard is the `tensorboard` extra; without it the metrics still go to metrics.jsonl.
        writer = optional.summary_writer() if enabled and tensorboard else None
        if writer is not None:
            self.writer = writer(os.path.join(run_dir, "tensorboard"))
        elif enabled and tensorboard:
            log.warning("run.tensorboard is on but TensorBoard is not installed (pip install "
                        "'featdenoise[tensorboard]', or set run.tensorboard=false); metrics go to "
                        "%s only", self.path)

    def log(self, kind: str, step: int, epoch: int, values: dict) -> None:
        """Write one record; numbers also go to TensorBoard as ``kind/name``."""
        if not self.enabled:
            return
        record = {"kind": kind, "epoch": epoch, "step": step, "time": round(time.time(), 3)}
        record.update(values)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics(run_dir: str) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl`` (empty list if absent)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
