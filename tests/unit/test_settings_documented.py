"""Every setting the worker reads has a row in the README's configuration table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
# The configuration section's table rows: | `CALLQ_A`, `CALLQ_B` | defaults | meaning |
ROWS = [line for line in README.splitlines() if re.match(r"\| `(CALLQ_|DATABASE_URL)", line)]


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_the_setting_has_a_row_in_the_configuration_table(name: str) -> None:
    env = f"CALLQ_{name.upper()}"
    rows = [row for row in ROWS if re.search(rf"`{env}`", row)]
    assert rows, f"{env} is not in the README's configuration table"
