"""bench/worker_process.py, which the step benchmarks run their engines through: a worker's RESULT line comes
back parsed with its output, and a worker that runs past the limit comes back as "timeout" with what it
printed by then."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from worker_process import BenchLog, offline_env, run_process


def test_a_worker_result_comes_back_parsed():
    code = "from worker_process import print_result; print('loading'); print_result({'engine': 'x', 'loss': 0.5})"
    env = offline_env(PYTHONPATH=str(Path(__file__).resolve().parents[2] / "bench"))
    result, out, rc = run_process([sys.executable, "-c", code], timeout=60, env=env)
    assert rc == 0 and result == {"engine": "x", "loss": 0.5}
    assert "loading" in out and env["HF_HUB_OFFLINE"] == "1"


def test_a_worker_past_its_limit_is_a_timeout_with_its_output():
    code = "import time; print('started', flush=True); time.sleep(60)"
    result, out, rc = run_process([sys.executable, "-c", code], timeout=3, env=offline_env())
    assert (result, rc) == (None, "timeout")
    assert "started" in out


def test_the_log_keeps_what_was_said_and_written(tmp_path, capsys):
    log = BenchLog(tmp_path / "bench.log")
    log.say("| engine |")
    log.write("worker output\n")
    log.close()
    assert capsys.readouterr().out == "| engine |\n"
    assert (tmp_path / "bench.log").read_text() == "| engine |\nworker output\n"
