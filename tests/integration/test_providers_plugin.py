"""A third-party adapter installs as its own package and the registry finds it."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.base import CallRequest, CallState, Provider, ProviderConfig
from providers.errors import ConfigError
from providers.registry import ENTRY_POINT_GROUP, available_types, build_provider, get_adapter

DIST = "callq-test-echo-provider"
TYPE = "callq_test_echo"

MODULE = '''
"""A do-nothing provider used to prove the plug-in path."""
from providers.base import CallHandle, CallState, CallStatus, HealthStatus, WebhookEvent


class EchoProvider:
    def __init__(self, config, client=None):
        self.config = config
        self.client = client

    def create_call(self, req):
        return CallHandle(provider_call_id="echo-" + req.correlation_id, state=CallState.QUEUED)

    def get_call(self, provider_call_id):
        return CallStatus(provider_call_id=provider_call_id, state=CallState.COMPLETED)

    def find_call(self, req, since):
        return None

    def cancel_call(self, provider_call_id):
        return False

    def check_health(self):
        return HealthStatus(ok=True, latency_ms=0.0)

    def parse_webhook(self, headers, body):
        raise NotImplementedError

    def close(self):
        pass
'''


def pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip


def _write_project(root: Path) -> None:
    (root / "callq_test_echo.py").write_text(MODULE)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{DIST}"
        version = "0.0.1"

        [tool.setuptools]
        py-modules = ["callq_test_echo"]

        [project.entry-points."{ENTRY_POINT_GROUP}"]
        {TYPE} = "callq_test_echo:EchoProvider"
        """)
    )


def _write_dist_info(site: Path) -> None:
    """What an installer leaves behind: the module plus a dist-info with entry_points.txt."""
    (site / "callq_test_echo.py").write_text(MODULE)
    info = site / "callq_test_echo_provider-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n{TYPE} = callq_test_echo:EchoProvider\n"
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """pip-install the package into the venv; where the venv cannot build wheels (no ``wheel``
    for this setuptools), put an installed-layout copy on ``sys.path`` instead."""
    root: Path = tmp_path_factory.mktemp("plugin")
    _write_project(root)
    try:
        pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(root))
        how = "pip"
    except subprocess.CalledProcessError:
        site = tmp_path_factory.mktemp("site")
        _write_dist_info(site)
        sys.path.insert(0, str(site))
        how = "sys.path"
    importlib.invalidate_caches()
    try:
        yield how
    finally:
        if how == "pip":
            pip("uninstall", "-y", DIST)
        else:
            sys.path.remove(str(site))
        importlib.invalidate_caches()
        sys.modules.pop("callq_test_echo", None)


def test_registry_finds_installed_plugin(installed: str) -> None:
    assert TYPE in available_types()
    config = ProviderConfig.from_row({"id": "e", "provider_type": TYPE, "api_key": "k"})
    provider = build_provider(config)
    assert isinstance(provider, Provider)
    assert get_adapter(TYPE).__module__ == "callq_test_echo"
    req = CallRequest(correlation_id="a1", to_number="+14155550100")
    assert provider.create_call(req).provider_call_id == "echo-a1"
    assert provider.get_call("x").state is CallState.COMPLETED


def test_builtins_and_unknown_types() -> None:
    assert {"vapi", "synthflow"} <= set(available_types())
    with pytest.raises(ConfigError, match="unknown provider_type"):
        get_adapter("no-such-provider")
