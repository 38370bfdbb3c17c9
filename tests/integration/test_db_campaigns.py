"""Campaigns in the database: schedule_calls (per-row errors, idempotent re-upload, limits over a
batch and across concurrent batches, all or nothing, one NOTIFY) and its equivalence with
schedule_call, row by row."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from .dbutil import Conn, as_role, connect, make_template, make_user, one, schedule

Result = tuple[int, uuid.UUID | None, str | None, str | None, bool]


def make_campaign(conn: Conn, user: uuid.UUID, template: uuid.UUID, status: str = "draft") -> Any:
    return one(conn, "SELECT create_campaign(%s, %s, 'Spring', %s)", (user, template, status))


def upload(conn: Conn, campaign: Any, rows: Any, all_or_nothing: bool = False) -> list[Result]:
    return conn.execute(  # type: ignore[return-value]
        "SELECT idx, queue_id, sqlstate, message, existing FROM schedule_calls(%s, %s, %s)",
        (campaign, Jsonb(rows), all_or_nothing),
    ).fetchall()


def contact(i: int, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"name": f"Contact {i}", "phone": f"+1555{i:07d}"}
    row.update(kw)
    return row


def queued(conn: Conn, campaign: Any) -> int:
    return int(one(conn, "SELECT count(*) FROM call_queue WHERE campaign_id = %s", (campaign,)))


# -- every row checked as schedule_call checks it ----------------------------------------------

PAST = (datetime.now(UTC) - timedelta(days=1)).isoformat()
FUTURE = (datetime.now(UTC) + timedelta(days=1)).isoformat()
FIELDS: dict[str, list[Any]] = {
    "name": ["Ann", "  ", "x" * 201, None],
    "phone": ["+15551230001", "+442071234567", "555", "+0551234567", None],
    "email": [None, "a@example.com", "not-an-email"],
    "priority": [None, 1, 10, 0, 11],
    "variables": [None, {"a": 1}, [1]],
    "metadata": [None, {"s": "x"}, "text"],
    "external_id": [None, None, "k1", "k2", "k1", "x" * 201],
    "scheduled_time": [None, PAST, FUTURE],
    "template": ["own", "own", "public_of_other", "private_of_other", "missing"],
}
row_strategy = st.fixed_dictionaries({k: st.sampled_from(v) for k, v in FIELDS.items()})


class World:
    """One user with a small plan (3 calls left), a campaign and templates to pick from."""

    def __init__(self, conn: Conn) -> None:
        self.user = make_user(conn, call_limit=4)
        other = make_user(conn)
        self.templates = {
            "own": make_template(conn, self.user),
            "public_of_other": make_template(conn, other, public=True),
            "private_of_other": make_template(conn, other),
            "missing": uuid.uuid4(),
        }
        schedule(conn, self.user, self.templates["own"])  # one pending call
        self.campaign = make_campaign(conn, self.user, self.templates["own"])


def _batch_row(row: dict[str, Any], world: World) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k != "template" and v is not None}
    if row["template"] != "own":
        out["template_id"] = str(world.templates[row["template"]])
    return out


def _one_by_one(conn: Conn, world: World, rows: list[dict[str, Any]]) -> list[Result]:
    got: list[Result] = []
    seen: set[uuid.UUID] = set()
    for i, row in enumerate(rows, 1):
        try:
            with conn.transaction():
                qid = schedule(
                    conn,
                    world.user,
                    world.templates[row["template"]],
                    recipient_name=row["name"],
                    recipient_phone=row["phone"],
                    recipient_email=row["email"],
                    priority=row["priority"],
                    custom_variables=Jsonb(row["variables"]) if row["variables"] else None,
                    metadata=Jsonb(row["metadata"]) if row["metadata"] is not None else None,
                    idempotency_key=row["external_id"],
                    scheduled_time=row["scheduled_time"],
                )
            got.append((i, qid, None, None, qid in seen))
            seen.add(qid)
        except psycopg.Error as exc:
            got.append((i, None, exc.sqlstate, exc.diag.message_primary, False))
    return got


def _shape(results: list[Result]) -> list[tuple[Any, ...]]:
    """Ids replaced by the index of the row that first returned them."""
    first: dict[uuid.UUID, int] = {}
    out = []
    for idx, qid, code, message, existing in results:
        if qid is not None:
            first.setdefault(qid, idx)
        out.append((idx, first.get(qid) if qid else None, code, message, existing))
    return out


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=st.lists(row_strategy, min_size=1, max_size=12))
def test_a_batch_answers_each_row_as_schedule_call_would(
    conn: Conn, rows: list[dict[str, Any]]
) -> None:
    world = getattr(conn, "_world", None)
    if world is None:
        world = World(conn)
        conn._world = world  # type: ignore[attr-defined]
    before = queued(conn, world.campaign)
    with conn.transaction(force_rollback=True):
        batch = upload(conn, world.campaign, [_batch_row(r, world) for r in rows])
        inserted = {r[1] for r in batch if r[1] is not None}
        assert queued(conn, world.campaign) - before == len(inserted)
    with conn.transaction(force_rollback=True):
        single = _one_by_one(conn, world, rows)
    assert _shape(batch) == _shape(single)
    for _, _, code, message, _ in batch:
        assert (code is None) == (message is None)
        if code:
            assert code.startswith("CQ") and "+1555" not in message and "Ann" not in message


def test_each_sqlstate_in_one_mixed_batch(conn: Conn) -> None:
    user = make_user(conn, call_limit=6)
    tpl = make_template(conn, user)
    camp = make_campaign(conn, user, tpl)
    rows = [
        contact(1),
        contact(2, phone="12345"),
        contact(3, priority=0),
        contact(4, variables=[1]),
        contact(5, name=" "),
        contact(6, email="nope"),
        contact(7, metadata=[]),
        contact(8, template_id=str(uuid.uuid4())),
        contact(9, external_id=""),
        contact(10, phone_number="+15550000000"),
        "not an object",
        contact(12, scheduled_time="next tuesday"),
        contact(13, template_id="not-a-uuid"),
        contact(14, priority="high"),
        contact(15),
    ]
    got = upload(conn, camp, rows)
    codes = [r[2] for r in got]
    assert codes == [
        None, "CQ005", "CQ006", "CQ007", "CQ009", "CQ009", "CQ010", "CQ004", "CQ041",
        "CQ040", "CQ040", "CQ040", "CQ040", "CQ006", None,
    ]  # fmt: skip
    assert [r[0] for r in got] == list(range(1, 16))
    assert queued(conn, camp) == 2
    # the plan's limit (6, so 4 left) counts only valid rows, in order; later ones get CQ003
    got = upload(conn, camp, [contact(20 + i) for i in range(6)] + [contact(30, phone="1")])
    assert [r[2] for r in got] == [None] * 4 + ["CQ003"] * 3
    assert got[-1][3] == "call_limit_reached: 6 of 6 calls used or pending this period"
    assert one(conn, "SELECT calls_total FROM call_campaigns WHERE id = %s", (camp,)) == 6


def test_reupload_queues_nothing_twice(conn: Conn) -> None:
    user = make_user(conn, call_limit=None)
    tpl = make_template(conn, user)
    camp = make_campaign(conn, user, tpl)
    rows = [contact(i, external_id=f"crm-{i}") for i in range(50)]
    first = upload(conn, camp, rows)
    assert all(r[1] and not r[4] for r in first)
    again = upload(conn, camp, [*rows, contact(99, external_id="crm-99")])
    assert [r[1] for r in again[:50]] == [r[1] for r in first]
    assert all(r[4] for r in again[:50]) and not again[50][4]
    assert queued(conn, camp) == 51
    assert one(conn, "SELECT calls_total FROM call_campaigns WHERE id = %s", (camp,)) == 51
    # the same external id twice in one batch: one call, the second row gets its id
    dup = upload(conn, camp, [contact(1, external_id="x"), contact(2, external_id="x")])
    assert dup[0][1] == dup[1][1] and dup[1][4] and not dup[0][4]
    # another campaign of the same user may call the same contact again
    other = make_campaign(conn, user, tpl)
    assert not upload(conn, other, rows[:1])[0][4]


def test_all_or_nothing_refuses_the_whole_batch(conn: Conn) -> None:
    user = make_user(conn)
    tpl = make_template(conn, user)
    camp = make_campaign(conn, user, tpl)
    got = upload(conn, camp, [contact(1), contact(2, phone="x"), contact(3)], all_or_nothing=True)
    assert [r[2] for r in got] == ["CQ044", "CQ005", "CQ044"]
    assert all(r[1] is None for r in got)
    assert queued(conn, camp) == 0
    got = upload(conn, camp, [contact(1), contact(3)], all_or_nothing=True)
    assert all(r[1] and r[2] is None for r in got)


def test_one_notify_per_batch_and_only_when_due(conn: Conn, db_url: str) -> None:
    user = make_user(conn)
    tpl = make_template(conn, user)
    camp = make_campaign(conn, user, tpl)
    with connect(db_url) as listener:
        listener.execute("LISTEN callq_queue")
        upload(conn, camp, [contact(i, scheduled_time=FUTURE) for i in range(5)])
        assert list(listener.notifies(timeout=0.2, stop_after=1)) == []
        upload(conn, camp, [contact(10 + i) for i in range(20)])
        got = list(listener.notifies(timeout=1, stop_after=5))
        assert [(n.channel, n.payload) for n in got] == [("callq_queue", "")]


def test_batch_level_refusals(conn: Conn) -> None:
    alice = make_user(conn)
    bob = make_user(conn)
    tpl = make_template(conn, alice, public=True)
    camp = make_campaign(conn, alice, tpl)
    for bad in ({"name": "x"}, "[]", None):
        with pytest.raises(psycopg.Error) as err:
            upload(conn, camp, bad)
        assert err.value.sqlstate == "CQ045"
    with pytest.raises(psycopg.Error) as err:
        upload(conn, uuid.uuid4(), [contact(1)])
    assert err.value.sqlstate == "CQ042"
    with as_role(conn, "authenticated", bob):
        with pytest.raises(psycopg.Error) as err:
            upload(conn, camp, [contact(1)])
        assert err.value.sqlstate == "CQ042"  # as if it did not exist
    with as_role(conn, "authenticated", alice):
        assert upload(conn, camp, [contact(1)])[0][1]
    with as_role(conn, "anon", alice), pytest.raises(psycopg.errors.InsufficientPrivilege):
        upload(conn, camp, [contact(1)])
    with as_role(conn, "authenticated", alice), pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT * FROM schedule_calls_core(%s, NULL, %s, '[]')", (alice, tpl))
    assert err.value.sqlstate == "42501"
    conn.execute("UPDATE call_campaigns SET status = 'canceled' WHERE id = %s", (camp,))
    with pytest.raises(psycopg.Error) as err:
        upload(conn, camp, [contact(1)])
    assert err.value.sqlstate == "CQ043"


def test_concurrent_batches_of_one_user_share_the_limit(db_url: str) -> None:
    with connect(db_url) as conn:
        user = make_user(conn, call_limit=100)
        tpl = make_template(conn, user)
        camps = [make_campaign(conn, user, tpl) for _ in range(3)]
    results: list[list[Result]] = []
    barrier = threading.Barrier(3)

    def go(camp: Any, start: int) -> None:
        with connect(db_url) as c:
            barrier.wait()
            results.append(upload(c, camp, [contact(start + i) for i in range(45)]))

    threads = [threading.Thread(target=go, args=(c, i * 100)) for i, c in enumerate(camps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 3
    ok = sum(1 for rs in results for r in rs if r[1])
    refused = [r[2] for rs in results for r in rs if not r[1]]
    assert ok == 100 and refused == ["CQ003"] * 35
    with connect(db_url) as conn:
        assert one(conn, "SELECT count(*) FROM call_queue WHERE user_id = %s", (user,)) == 100


def test_concurrent_same_upload_queues_each_contact_once(db_url: str) -> None:
    with connect(db_url) as conn:
        user = make_user(conn, call_limit=None)
        camp = make_campaign(conn, user, make_template(conn, user))
    rows = [contact(i, external_id=f"e{i}") for i in range(200)]
    results: list[list[Result]] = []
    barrier = threading.Barrier(2)

    def go() -> None:
        with connect(db_url) as c:
            barrier.wait()
            results.append(upload(c, camp, rows))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2
    assert [r[1] for r in results[0]] == [r[1] for r in results[1]]
    assert all(r[1] for r in results[0])
    with connect(db_url) as conn:
        assert queued(conn, camp) == 200
