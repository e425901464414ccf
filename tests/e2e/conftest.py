"""Fixtures of the end-to-end tests: a control plane whose apiserver keeps an audit log, and an S3 server
whose only identity has planted, unique credentials.

Both are the harness's real components (tests/harness), started per module rather than shared with the
rest of the session, because each needs one setting the shared ones don't have:

- `audited_control_plane`: `ControlPlane` with `--audit-policy-file`/`--audit-log-path` added to the
  apiserver, so that a test can prove from the apiserver's own record who read Secrets and who wrote a
  resource's status (the harness's launcher has no audit option; this subclass only appends flags);
- `planted_credentials` and `planted_s3`: `SeaweedS3(credentials=...)` with values made for this module,
  so that a leak check can search every log and object for them and know a hit is a leak (a value the
  S3 server really accepts, not a dummy that only looks like a secret).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.kube import ControlPlane
from tests.harness.kube_fixtures import run_control_plane
from tests.harness.s3 import S3Credentials, SeaweedS3
from tests.harness.s3_fixtures import run_s3

#: What the apiserver records (first matching rule wins), at Metadata level (never request bodies, so the
#: audit log itself holds no secret):
#: - every request on Secrets, by anyone;
#: - nothing else from the controller manager's own ServiceAccounts (kube-system), which are busy;
#: - every other request made with a ServiceAccount token (the operator's and the trainer's);
#: - every request on VisionFineTunes and their status, by anyone.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "resources": [{"group": "", "resources": ["secrets"]}]},
        {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
        {
            "level": "Metadata",
            "resources": [
                {"group": "visionft.io", "resources": ["visionfinetunes", "visionfinetunes/status"]}
            ],
        },
        {"level": "None"},
    ],
}


class AuditedControlPlane(ControlPlane):
    """The harness's control plane, with an apiserver audit log (JSON lines) at `audit_log`."""

    @property
    def audit_log(self) -> Path:
        return self.work_dir / "audit.log"

    def _argv(self, name: str) -> list[str]:
        argv = super()._argv(name)
        if name == "kube-apiserver":
            policy = self.work_dir / "audit-policy.json"
            policy.write_text(json.dumps(AUDIT_POLICY))
            argv += [
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",  # each record is written before the response: no lag
            ]
        return argv

    def audit_events(self) -> list[dict[str, Any]]:
        """The audit records written so far (stage ResponseComplete or Panic)."""
        if not self.audit_log.exists():
            return []
        events = []
        for line in self.audit_log.read_text(errors="replace").splitlines():
            if line.strip():
                event = json.loads(line)
                if event.get("stage") in ("ResponseComplete", "Panic"):
                    events.append(event)
        return events


@pytest.fixture(scope="module")
def audited_control_plane() -> Iterator[AuditedControlPlane]:
    """A control plane of this module's own, with the apiserver audit log on; fails when not built."""
    yield from run_control_plane(AuditedControlPlane(gpu_nodes=1), "audited test control plane")


@pytest.fixture(scope="module")
def planted_credentials() -> S3Credentials:
    """S3 credentials made for this module: unique strings that appear nowhere unless leaked.

    Letters and digits only (the access key travels in SigV4's Credential= field, where `/` is a
    separator), long and random enough that no accidental match is possible.
    """
    return S3Credentials(
        access_key="VFTPLANTEDAK" + secrets.token_hex(8).upper(),
        secret_key="vftPlantedSecret" + secrets.token_hex(16),
    )


@pytest.fixture(scope="module")
def planted_s3(planted_credentials: S3Credentials) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server whose only identity is `planted_credentials`."""
    yield from run_s3(
        lambda: SeaweedS3(credentials=planted_credentials), "S3 server (SeaweedFS, planted identity)"
    )
