"""Shared pytest wiring: fixtures for the real components live in tests/harness and are loaded here."""

pytest_plugins = [
    "tests.harness.kube_fixtures",
    "tests.harness.s3_fixtures",
]
