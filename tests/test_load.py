"""scripts/load_test.py, shortened: concurrent clients (greedy answers checked against AR, streams
left mid-way, requests that must be refused) against a distributed SPD server, which serves every
answer right, never answers 5xx, and leaves no process after SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serving import tiny_chat_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"


def test_a_short_load_and_fault_run_meets_the_targets(tmp_path):
    tiny_chat_model(tmp_path / "model")
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "model"), "--clients", "6",
                          "--duration", "10", "--max-tokens", "24", "--threads", "1", "--out", str(out), "--",
                          "--method", "spd", "--distributed", "--stages", "2", "--tree-budget", "4",
                          "--tree-depth", "2", "--tree-topk", "2", "--dtype", "float32", "--max-queue", "4"],
                         capture_output=True, text=True, timeout=600)
    assert out.exists(), run.stderr[-3000:]
    report = json.loads(out.read_text())
    kinds = report["status_by_kind"]
    assert report["served_greedy"] >= 5 and report["wrong_answers"] == 0, report
    assert report["5xx"] == 0 and report["refusals_with_wrong_status"] == 0, report
    assert any(k.startswith("refused:") for k in kinds) and "disconnect" in kinds, report
    assert report["sigterm_exit_code"] == 0 and report["processes_left"] == 0, report
