"""The Docker image's entry commands: every role the Dockerfile and compose file name exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
ROLES = [
    "worker",
    "beat",
    "flower",
    "webhooks",
    "simulator",
    "migrate",
    "queue",
    "demo",
    "metrics",
    "providers",
]


def entry(*args: str) -> subprocess.CompletedProcess[str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("role", ROLES)
def test_every_role_starts_its_command(role: str) -> None:
    result = entry(role, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in (result.stdout + result.stderr).lower()


def test_compose_services_use_known_roles_and_the_dockerfile_is_non_root() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "worker", "beat", "flower", "simulator"} <= set(
        services
    )
    for name, service in services.items():
        if service.get("image") == "callq:latest" or "build" in service:
            assert service["command"][0] in ROLES, name
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "\nUSER callq" in dockerfile and "callq-entrypoint" in dockerfile
