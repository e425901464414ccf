"""The operator's runtime pieces (no cluster): config from env, CLI overrides, metrics text, JSON logs,
and the torch-free import of every module."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from visionft_operator import config, main
from visionft_operator.controller import logs, metrics

from tests.test_layout import _BLOCK_TORCH

REPO = Path(__file__).resolve().parents[2]


def test_config_from_env() -> None:
    cfg = config.Config.from_env(
        {
            "VISIONFT_TRAINER_IMAGE": "r/t:2",
            "VISIONFT_NAMESPACES": "a, b",
            "VISIONFT_PEERING": "true",
            "VISIONFT_RESYNC_SECONDS": "2.5",
            "VISIONFT_METRICS_PORT": "0",
        }
    )
    assert cfg.trainer_image == "r/t:2"
    assert cfg.namespaces == ["a", "b"]
    assert cfg.peering is True
    assert cfg.resync_seconds == 2.5
    assert cfg.metrics_port == 0


def test_every_setting_is_documented() -> None:
    source = (REPO / "operator/visionft_operator/config.py").read_text().splitlines()
    for name in vars(config.Config()):
        index = next(i for i, line in enumerate(source) if line.strip().startswith(f"{name}:"))
        assert source[index - 1].strip().startswith("#:"), name


def test_cli_overrides_namespaces_and_peering(monkeypatch) -> None:
    monkeypatch.setenv("VISIONFT_NAMESPACES", "x")
    cfg = main.build_config(main.parse_args(["-n", "team-a", "-n", "team-b", "--peering"]))
    assert cfg.namespaces == ["team-a", "team-b"] and cfg.peering
    assert main.build_config(main.parse_args(["-A"])).namespaces == []
    assert main.liveness_url(cfg, None) == "http://0.0.0.0:8080/healthz"


def test_metrics_exposition() -> None:
    reg = metrics.Registry()
    reg.set_phase("a", "x", "Training")
    reg.set_phase("a", "y", "Training")
    reg.set_phase("a", "x", "Succeeded")
    with reg.timed("resource_event"):
        pass
    try:
        with reg.timed("resource_event"):
            raise RuntimeError
    except RuntimeError:
        pass
    text = reg.render()
    assert 'visionft_resources{phase="Training"} 1' in text
    assert 'visionft_resources{phase="Succeeded"} 1' in text
    assert 'visionft_handler_errors_total{handler="resource_event"} 1' in text
    assert 'visionft_handler_duration_seconds_count{handler="resource_event"} 2' in text
    assert "# TYPE visionft_handler_duration_seconds histogram" in text


def test_json_logs() -> None:
    record = logging.makeLogRecord(
        {
            "msg": "hello %s",
            "args": ("x",),
            "levelname": "INFO",
            "name": "t",
            "k8s_ref": {"namespace": "ns", "name": "n", "kind": "VisionFineTune"},
        }
    )
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == "hello x" and entry["namespace"] == "ns" and entry["name"] == "n"


def test_every_operator_module_imports_without_torch() -> None:
    modules = [
        "visionft_operator."
        + ".".join(p.relative_to(REPO / "operator/visionft_operator").with_suffix("").parts)
        for p in (REPO / "operator/visionft_operator").rglob("*.py")
        if p.name != "__init__.py"
    ]
    code = _BLOCK_TORCH + "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "import sys; assert 'torch' not in sys.modules; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_peering_leadership() -> None:
    from datetime import UTC, datetime, timedelta

    from visionft_operator.controller import peering

    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    live = (now - timedelta(seconds=2)).isoformat()
    dead = (now - timedelta(seconds=120)).isoformat()
    status = {
        "me": {"priority": 50, "lifetime": 60, "lastseen": live},
        "high-but-dead": {"priority": 100, "lifetime": 60, "lastseen": dead},
        "low": {"priority": 10, "lifetime": 60, "lastseen": live},
    }
    assert not peering.outranked(status, "me", 50, now=now)
    status["high"] = {"priority": 100, "lifetime": 60, "lastseen": live}
    assert peering.outranked(status, "me", 50, now=now)
    assert peering.outranked({"twin": {"priority": 50, "lifetime": 60, "lastseen": live}}, "me", 50, now=now)
    assert peering.own_priority(7) == 7 and peering.own_priority(0) > 0
