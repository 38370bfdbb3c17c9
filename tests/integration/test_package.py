"""callq as an operator installs it: a wheel in a fresh virtualenv, run from another directory.

The wheel is built from a copy of the checkout (nothing is written into the repository) and
installed with ``--no-deps`` into a new virtualenv that borrows this environment's
site-packages for the dependencies, so the test needs no index and takes seconds. Nothing in
the new environment can see the checkout: commands run from an empty directory without
PYTHONPATH, and the test asserts that ``worker`` is imported from the new site-packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_docker import ENTRYPOINT, REPO, ROLES

COMMANDS = ["db", "queue", "demo", "simulate-providers", "webhooks", "metrics", "providers",
            "worker", "beat", "flower"]  # fmt: skip
_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "bench", "tests"
)


@dataclass
class Installed:
    wheel: Path
    bin: Path
    cwd: Path

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL")}
        base["PATH"] = f"{self.bin}:{base.get('PATH', '')}"
        return subprocess.run(
            list(args),
            env={**base, **(env or {})},
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_IGNORE)
    out = root / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    assert "warning" not in build.stderr.lower(), build.stderr  # no packaging warnings
    (wheel,) = out.glob("callq-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    new_site = Path(
        subprocess.check_output([str(venv / "bin" / "python"), "-c", purelib], text=True).strip()
    )
    # The dependencies come from this environment, after the wheel's own files.
    (new_site / "_callq_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    cwd = root / "elsewhere"
    cwd.mkdir()
    yield Installed(wheel, venv / "bin", cwd)


def test_wheel_carries_the_repository_sql_byte_for_byte(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        assert not any(n.startswith(("tests/", "bench/", "supabase/")) for n in names)
        assert "celeryconfig.py" not in names
        for path in [*sorted((REPO / "supabase" / "migrations").glob("*.sql")),
                     REPO / "supabase" / "local" / "auth.sql"]:  # fmt: skip
            packaged = f"callq_sql/{path.parent.name}/{path.name}"
            assert packaged in names, packaged
            assert whl.read(packaged) == path.read_bytes(), packaged
        packaged_sql = {n for n in names if n.startswith("callq_sql/") and n.endswith(".sql")}
        assert len(packaged_sql) == len(list((REPO / "supabase" / "migrations").glob("*.sql"))) + 1


def test_installed_commands_run_from_elsewhere(
    installed: Installed, empty_db_url: str, redis_url: str
) -> None:
    where = installed.run("python", "-c", "import worker, callq_sql; print(worker.__file__)")
    assert where.returncode == 0, where.stderr
    assert str(REPO) not in where.stdout and "site-packages" in where.stdout

    helptext = installed.run("callq", "--help")
    assert helptext.returncode == 0, helptext.stderr
    listed = {line.split()[0] for line in helptext.stdout.splitlines() if line.startswith("    ")}
    assert set(COMMANDS) <= listed, listed

    missing = installed.run("callq", "worker")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "callq: error: DATABASE_URL (or CALLQ_DATABASE_URL) is not set"
    ]
    db = {"DATABASE_URL": empty_db_url}
    for command in (["worker"], ["beat"], ["queue"], ["metrics"]):
        unmigrated = installed.run("callq", *command, env=db)
        lines = unmigrated.stderr.strip().splitlines()
        assert unmigrated.returncode == 2 and len(lines) == 1, (command, unmigrated.stderr)
        assert "run `callq db upgrade`" in lines[0], command

    upgraded = installed.run("callq", "db", "upgrade", env=db)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "applied" in upgraded.stdout and "applied 0" not in upgraded.stdout

    worker_help = installed.run("callq", "worker", "--help")
    assert worker_help.returncode == 0 and "usage" in worker_help.stdout.lower()

    demo = installed.run(
        "callq", "demo", "--calls", "4", "--timeout", "150",
        env={**db, "CALLQ_BROKER_URL": redis_url}, timeout=240,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "provider slots still held: 0" in demo.stdout
    assert "Traceback" not in demo.stderr


@pytest.mark.parametrize("role", ROLES)
def test_every_image_role_starts_from_the_installed_package(
    installed: Installed, role: str
) -> None:
    result = installed.run("sh", str(ENTRYPOINT), role, "--help", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in (result.stdout + result.stderr).lower()
