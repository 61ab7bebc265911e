"""status.json writer: TAO's unpadded date/time, field order, redaction, rank gating, JSON lines."""
from __future__ import annotations

import json
from datetime import datetime

import pytest

from tao_cli.engine.status import StatusLogger, format_date, format_time


def test_unpadded_date_and_time_like_tao():
    now = datetime(2025, 3, 5, 14, 7, 3)
    assert (format_date(now), format_time(now)) == ("3/5/2025", "14:7:3")


def test_records_are_json_lines_in_tao_field_order(tmp_path):
    status = StatusLogger(tmp_path / "status.json", redact=("s3cret-key",))
    status.write("STARTED", "Starting Boring train.")
    status.write("RUNNING", "Training loop in progress", epoch=0, step=6, max_epoch=1, max_step=12,
                 time_per_epoch="0:00:01", time_per_step="0:00:00.1", eta="0:00:01")
    status.write("RUNNING", "Eval metrics generated.", kpi={"mIoU": 0.5}, epoch=0, step=6)
    status.write("FAILURE", "bad key s3cret-key")
    lines = (tmp_path / "status.json").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert list(records[0]) == ["date", "time", "status", "verbosity", "message"]
    assert list(records[1])[:7] == ["epoch", "step", "max_epoch", "max_step", "time_per_epoch", "time_per_step", "eta"]
    assert list(records[2]) == ["epoch", "step", "date", "time", "status", "verbosity", "message", "kpi"]
    assert records[3]["message"] == "bad key *****" and status.ended


def test_appends_across_runs_and_rank_gating(tmp_path):
    path = tmp_path / "status.json"
    StatusLogger(path).write("SUCCESS", "one")
    StatusLogger(path).write("SUCCESS", "two")
    StatusLogger(path, enabled=False).write("SUCCESS", "not rank 0")
    assert [json.loads(x)["message"] for x in path.read_text().splitlines()] == ["one", "two"]
    with pytest.raises(ValueError):
        StatusLogger(path).write("DONE", "unknown status")
