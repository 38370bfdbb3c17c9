"""callq's SQL as package data: the migrations and the local auth shim.

``migrations`` and ``local`` are symbolic links to ``supabase/migrations`` and
``supabase/local`` in the repository (the Supabase CLI's source of truth), so the files a wheel
carries are the very files the CLI pushes: there is no copy to drift. Building the wheel
follows the links; ``tests/integration/test_package.py`` checks the wheel's files against the
repository's.
"""

from __future__ import annotations

import os
from pathlib import Path


def sql_root() -> Path:
    """The directory holding ``migrations/`` and ``local/``: ``$CALLQ_SUPABASE_DIR`` if set."""
    env = os.environ.get("CALLQ_SUPABASE_DIR")
    return Path(env) if env else Path(__file__).resolve().parent
