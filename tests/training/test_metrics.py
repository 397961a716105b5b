"""Run metrics: metrics.jsonl always, TensorBoard when its extra is installed."""

from __future__ import annotations

import json
import logging

from featdenoise.runtime import optional
from featdenoise.training import metrics


def test_records_go_to_metrics_jsonl_without_tensorboard(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(optional, "summary_writer", lambda: None)
    with caplog.at_level(logging.WARNING, logger="featdenoise"):
        logger = metrics.MetricsLogger(str(tmp_path), enabled=True, tensorboard=True)
    assert logger.writer is None
    assert any("featdenoise[tensorboard]" in r.getMessage() for r in caplog.records)
    logger.log("train", step=3, epoch=0, values={"loss": 0.5})
    logger.close()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (record["kind"], record["step"], record["loss"]) == ("train", 3, 0.5)


def test_no_warning_when_tensorboard_is_off(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(optional, "summary_writer", lambda: None)
    with caplog.at_level(logging.WARNING, logger="featdenoise"):
        metrics.MetricsLogger(str(tmp_path), enabled=True, tensorboard=False)
    assert not caplog.records
