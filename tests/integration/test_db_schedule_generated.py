"""Generated bad input for ``schedule_call``: every case is refused with its own SQLSTATE.

Each hypothesis example changes one argument of a valid call into something invalid; the call
must fail with the expected SQLSTATE (class CQ, or class 22 for a value of the wrong type) and
write nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.seed import Seeded, seed_demo

E164 = re.compile(r"\+[1-9][0-9]{6,14}")
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
# Words PostgreSQL may read as (part of) a timestamp: such text is not "malformed".
TIME_WORDS = frozenset(
    {
        "now",
        "today",
        "tomorrow",
        "yesterday",
        "epoch",
        "infinity",
        "allballs",
        "jan",
        "feb",
        "mar",
        "apr",
        "may",
        "jun",
        "jul",
        "aug",
        "sep",
        "oct",
        "nov",
        "dec",
        "mon",
        "tue",
        "wed",
        "thu",
        "fri",
        "sat",
        "sun",
        "z",
        "utc",
        "gmt",
        "am",
        "pm",
        "t",
    }
)
CALL = (
    "SELECT schedule_call(%(user)s::uuid, %(template)s::uuid, %(name)s, %(phone)s, %(email)s,"
    " %(when)s::timestamptz, %(priority)s::int, %(vars)s::jsonb, %(meta)s::jsonb)"
)
Case = tuple[str, dict[str, Any]]


def _is_uuid(s: str) -> bool:
    try:
        uuid.UUID(s)
    except ValueError:
        return False
    return True


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


def _may_be_time(s: str) -> bool:
    low = s.strip().lower()
    return not low or any(ch.isdigit() for ch in low) or any(w in low for w in TIME_WORDS)


def _bad_values() -> st.SearchStrategy[Case]:
    """Cases that need no database ids: malformed phone, priority, JSON, names, types."""
    ascii_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
    any_text = st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        max_size=40,
    )
    non_object = st.one_of(
        st.lists(st.integers(), max_size=3),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=10),
        st.booleans(),
    ).map(json.dumps)
    long_name = st.text(min_size=201, max_size=260, alphabet="abcdefghijklmnopqrstuvwxyz")
    not_uuid = ascii_text.filter(lambda s: not _is_uuid(s))
    return st.one_of(
        any_text.filter(lambda s: not E164.fullmatch(s)).map(lambda s: ("CQ005", {"phone": s})),
        st.just(("CQ005", {"phone": None})),
        st.one_of(st.integers(-(2**31), 0), st.integers(11, 2**31 - 1)).map(
            lambda p: ("CQ006", {"priority": p})
        ),
        non_object.map(lambda v: ("CQ007", {"vars": v})),
        st.one_of(st.text(alphabet=" ", max_size=5), long_name).map(
            lambda s: ("CQ009", {"name": s})
        ),
        st.just(("CQ009", {"name": None})),
        ascii_text.filter(lambda s: not EMAIL.fullmatch(s)).map(lambda s: ("CQ009", {"email": s})),
        non_object.map(lambda v: ("CQ010", {"meta": v})),
        not_uuid.map(lambda s: ("22", {"user": s})),
        not_uuid.map(lambda s: ("22", {"template": s})),
        st.text(alphabet="{[,:\"'}x ", min_size=1, max_size=12)
        .filter(lambda s: not _is_json(s))
        .map(lambda s: ("22", {"vars": s})),
        ascii_text.filter(lambda s: not _may_be_time(s)).map(lambda s: ("22", {"when": s})),
    )


def _bad_ids(capped: Seeded, other: Seeded, nosub: uuid.UUID) -> st.SearchStrategy[Case]:
    """Cases about who calls and with what: unknown user or template, no plan, limit, role."""
    return st.one_of(
        st.uuids().map(lambda u: ("CQ001", {"user": str(u)})),
        st.just(("CQ001", {"user": None})),
        st.just(("CQ002", {"user": str(nosub)})),
        st.just(("CQ003", {"user": str(capped.user_id), "template": str(capped.template_id)})),
        st.uuids().map(lambda u: ("CQ004", {"template": str(u)})),
        st.just(("CQ004", {"template": str(other.template_id)})),
        st.just(("CQ004", {"template": None})),
        st.uuids().map(lambda u: ("CQ008", {"role": str(u)})),
    )


def _attempt(conn: psycopg.Connection[Any], args: dict[str, Any]) -> str | None:
    """Run the call in a transaction that is rolled back; its SQLSTATE, None if accepted."""
    role = args.pop("role")
    try:
        with conn.transaction(force_rollback=True):
            if role is not None:  # an app user acting for someone else
                claims = json.dumps({"sub": role, "role": "authenticated"})
                conn.execute("SET LOCAL ROLE authenticated")
                conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims,))
            conn.execute(CALL, args)
    except psycopg.Error as exc:
        return exc.sqlstate or "none"
    return None


def test_generated_bad_input_is_refused_with_its_sqlstate(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        good = seed_demo(conn, sim_base_url="http://127.0.0.1:9")
        capped = seed_demo(conn, sim_base_url="http://127.0.0.1:9", call_limit=0)
        other = seed_demo(conn, sim_base_url="http://127.0.0.1:9")
        nosub = uuid.uuid4()
        conn.execute(
            "INSERT INTO auth.users (id, email) VALUES (%s, 'nosub@example.com')", (nosub,)
        )
        valid = {"user": str(good.user_id), "template": str(good.template_id)}
        valid |= {"name": "Valid Name", "phone": "+15550001111", "email": None, "when": None}
        valid |= {"priority": 5, "vars": "{}", "meta": "{}", "role": None}
        assert _attempt(conn, dict(valid)) is None  # the base case is valid

        @settings(max_examples=300, database=None, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(st.one_of(_bad_values(), _bad_ids(capped, other, nosub)))
        def refused(case: Case) -> None:
            expected, change = case
            code = _attempt(conn, {**valid, **change})
            assert code is not None, f"accepted: {expected} {change!r}"
            assert code.startswith(expected), f"{code} for {expected}: {change!r}"

        refused()
        assert conn.execute("SELECT count(*) FROM call_queue").fetchone() == (0,)
