"""schedule_call's input bounds (issue 8, item 5): each refused with its own SQLSTATE, a message
without the content, and nothing written; hypothesis checks random inputs against a model of
the documented limits (supabase/README.md, Security)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .dbutil import Conn, make_template, make_user, one, schedule

MAX_BYTES = 16384
MAX_DEPTH = 4
MAX_KEYS = 200
MAX_KEY_LENGTH = 64


@pytest.fixture
def setup(conn: Conn) -> tuple[uuid.UUID, uuid.UUID]:
    user = make_user(conn, call_limit=None)
    return user, make_template(conn, user)


def refused(conn: Conn, setup: tuple[uuid.UUID, uuid.UUID], **kw: Any) -> psycopg.Error:
    before = one(conn, "SELECT count(*) FROM call_queue")
    with pytest.raises(psycopg.Error) as info, conn.transaction():
        schedule(conn, *setup, **kw)
    assert one(conn, "SELECT count(*) FROM call_queue") == before
    return info.value


BIG = "Z" * (1024 * 1024)


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"custom_variables": json.dumps({"v": BIG})}, "CQ018"),
        ({"metadata": json.dumps({"m": BIG})}, "CQ018"),
        ({"metadata": json.dumps({"a": {"b": {"c": {"d": {"e": 1}}}}})}, "CQ018"),
        ({"custom_variables": json.dumps({f"k{i}": i for i in range(MAX_KEYS + 1)})}, "CQ018"),
        ({"recipient_email": "a" * 250 + "@example.com"}, "CQ018"),
        ({"idempotency_key": "k" * 201}, "CQ041"),  # the campaigns' rule
        ({"custom_variables": json.dumps({"   ": "x"})}, "CQ019"),
        ({"custom_variables": json.dumps({"": "x"})}, "CQ019"),
        ({"custom_variables": json.dumps({"a\u0007b": "x"})}, "CQ019"),
        ({"metadata": json.dumps({"x": [{"k" * 65: 1}]})}, "CQ019"),
        ({"recipient_name": "Eve\u0000".replace("\u0000", "\u001b[2J")}, "CQ019"),
        ({"idempotency_key": "  "}, "CQ019"),
        ({"idempotency_key": "key\nwith newline"}, "CQ019"),
    ],
)
def test_each_bound_has_its_sqlstate(
    conn: Conn, setup: tuple[uuid.UUID, uuid.UUID], kw: dict[str, Any], code: str
) -> None:
    """Before: a 52 MB custom_variables was queued (and sent to the provider)."""
    exc = refused(conn, setup, **kw)
    assert exc.sqlstate == code
    assert "ZZZZ" not in str(exc) and "Eve" not in str(exc) and exc.diag.message_detail is None


def test_limits_are_inclusive(conn: Conn, setup: tuple[uuid.UUID, uuid.UUID]) -> None:
    deep = {"a": {"b": {"c": {"d": "x"}}}}
    keys = {f"k{i}": i for i in range(MAX_KEYS)}
    qid = schedule(
        conn, *setup, custom_variables=json.dumps(keys), metadata=json.dumps(deep),
        idempotency_key="k" * 200, recipient_name="Zoë O'Brien-Łukasz",
    )  # fmt: skip
    assert one(conn, "SELECT metadata FROM call_queue WHERE id = %s", (qid,)) == deep


# --- the model and random inputs --------------------------------------------------------------


def jsonb_bytes(doc: Any) -> int:
    """Bytes of jsonb's text output (", " and ": " separators, UTF-8, JSON escapes)."""
    return len(json.dumps(doc, separators=(", ", ": "), ensure_ascii=False).encode())


def shape(doc: Any, depth: int = 0) -> tuple[int, list[str]]:
    """(deepest level, every key) of a document, as public.jsonb_walk sees it."""
    deepest, keys = depth, []
    children = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    )
    for key, value in children:
        if isinstance(key, str):
            keys.append(key)
        d, k = shape(value, depth + 1)
        deepest, keys = max(deepest, d), keys + k
    return deepest, keys


def bad_key(key: str) -> bool:
    return len(key) > MAX_KEY_LENGTH or key.strip() == "" or any(_control(c) for c in key)


def _control(c: str) -> bool:
    return ord(c) < 0x20 or ord(c) == 0x7F


def expected(variables: Any, metadata: Any) -> str | None:
    """The SQLSTATE the documented limits give, None when the call is accepted."""
    for doc in (variables, metadata):
        if jsonb_bytes(doc) > MAX_BYTES:
            return "CQ018"
        depth, keys = shape(doc)
        if depth > MAX_DEPTH or len(keys) > MAX_KEYS:
            return "CQ018"
        if any(bad_key(k) for k in keys):
            return "CQ019"
    return None


# Text PostgreSQL can hold, without the characters whose class depends on the server's locale
# (non-ASCII controls and spaces); keys are sometimes blank, too long or carry ASCII controls.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), max_size=80)
ODD_KEYS = ["", " ", "\t", "a\nb", "a\x1bb", "del\x7f", "k" * 64, "k" * 65, "name"]
KEYS = st.one_of(TEXT, st.sampled_from(ODD_KEYS))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**9), 10**9), TEXT,
    st.builds(lambda n: "x" * n, st.integers(0, 20000)),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=40,
)
DOCS = st.one_of(
    st.dictionaries(KEYS, VALUES, max_size=8),
    st.dictionaries(st.builds(lambda i: f"k{i}", st.integers(0, 400)), st.integers(), max_size=260),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(variables=DOCS, metadata=DOCS)
def test_random_inputs_follow_the_documented_limits(
    conn: Conn, setup: tuple[uuid.UUID, uuid.UUID], variables: Any, metadata: Any
) -> None:
    want = expected(variables, metadata)
    args = {"custom_variables": json.dumps(variables), "metadata": json.dumps(metadata)}
    with conn.transaction(force_rollback=True):
        if want is None:
            qid = schedule(conn, *setup, **args)
            row = conn.execute(
                "SELECT custom_variables, metadata FROM call_queue WHERE id = %s", (qid,)
            ).fetchone()
            assert row == (variables, metadata)
        else:
            assert refused(conn, setup, **args).sqlstate == want
