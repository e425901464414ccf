"""What the step benchmarks (``qlora_step.py``, ``dpo_step.py``) share: each engine runs in a process of its
own (the script again, with ``--worker``), which prints its result as one ``RESULT <json>`` line; the
orchestrator runs these processes one after the other and keeps a log of what each printed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

#: The line a worker prints its result on.
RESULT_PREFIX = "RESULT "


def print_result(result: dict[str, Any]) -> None:
    """The worker's result, as the one line the orchestrator reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment with the Hub off (every model is a local folder), plus ``extra``."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)


def run_process(cmd: list[str], timeout: float, env: dict[str, str]) -> tuple[dict | None, str, int | str]:
    """Runs one worker process: ``(its result or None, its stdout and stderr, its exit status or
    "timeout")``."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        # What the process printed before it was killed may come back as bytes, whatever text= says.
        out, rc = _text(err.stdout) + _text(err.stderr), "timeout"
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else None
    return result, out, rc


def _text(output: str | bytes | None) -> str:
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


class BenchLog:
    """The run's log file (appended to): ``say`` prints a line and logs it, ``write`` only logs."""

    def __init__(self, path: str | Path) -> None:
        self._file = open(path, "a")  # noqa: SIM115

    def say(self, message: str) -> None:
        print(message, flush=True)
        self.write(message + "\n")

    def write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
