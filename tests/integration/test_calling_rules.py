"""Calling rules against real PostgreSQL: zones, windows, do-not-call, consent, attempt caps.

Time comes from the test clock (calling_settings.test_now, read by callq_now()); expected local
times are computed independently with Python's zoneinfo.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from models.queries import GATE_AND_LOAD

from .dbutil import (
    SHIPPED_CALLING_RULES,
    Conn,
    as_role,
    as_role_committed,
    connect,
    make_provider,
    make_template,
    make_user,
    one,
    schedule,
    set_clock,
    slots,
)

REPO = Path(__file__).resolve().parents[2]

NEW_YORK = "+12125550100"
HONOLULU = "+18085550100"
LONDON = "+442079460000"
SYDNEY = "+61291234567"
TOKYO = "+81312345678"
NORTH_DAKOTA = "+17015550100"  # area code 701: America/Denver and America/North_Dakota/Center


def local(zone: str, text: str) -> datetime:
    """An aware instant from a local wall time 'YYYY-MM-DD HH:MM' in ``zone``."""
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone))


@dataclass
class World:
    conn: Conn
    user: uuid.UUID
    plan: uuid.UUID
    template: uuid.UUID
    provider: uuid.UUID

    def schedule(self, phone: str, **kw: Any) -> uuid.UUID:
        return schedule(self.conn, self.user, self.template, recipient_phone=phone, **kw)

    def claim(self, n: int = 50) -> dict[uuid.UUID, uuid.UUID]:
        rows = self.conn.execute(
            "SELECT queue_id, assignment_id FROM claim_and_assign_calls(%s, 'test', 60)", (n,)
        ).fetchall()
        return {r[0]: r[1] for r in rows}

    def gate(self, aid: uuid.UUID) -> bool:
        return bool(one(self.conn, "SELECT mark_call_dialing(%s)", (aid,)))

    def row(self, qid: uuid.UUID) -> dict[str, Any]:
        cur = self.conn.execute(
            "SELECT status, scheduled_time, hold_reason, last_error, attempts, recipient_timezones"
            " FROM call_queue WHERE id = %s",
            (qid,),
        )
        names = [d.name for d in cur.description or []]
        values = cur.fetchone()
        assert values is not None
        return dict(zip(names, values, strict=True))


@pytest.fixture
def conn(db_url: str) -> Any:
    with connect(db_url) as c:
        c.execute(SHIPPED_CALLING_RULES)
        yield c


@pytest.fixture
def w(conn: Conn) -> World:
    user = make_user(conn, call_limit=None)
    plan = one(conn, "SELECT plan_id FROM user_subscriptions WHERE user_id = %s", (user,))
    return World(conn, user, plan, make_template(conn, user), make_provider(conn, max_calls=100))


def sqlstate(conn: Conn, query: str, params: Any = None) -> str | None:
    try:
        with conn.transaction():
            conn.execute(query, params)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


# --- shipped defaults, zone data ---------------------------------------------------------------


def test_a_fresh_database_ships_the_federal_window_and_three_attempts(empty_db_url: str) -> None:
    from models.migrate import upgrade

    upgrade(empty_db_url)
    with connect(empty_db_url) as conn:
        rules = conn.execute(
            "SELECT scope, days, start_time::text, end_time::text, excluded_dates, is_active"
            " FROM calling_windows"
        ).fetchall()
        assert rules == [("default", [1, 2, 3, 4, 5, 6, 7], "08:00:00", "21:00:00", [], True)]
        assert one(conn, "SELECT default_attempts_per_24h FROM calling_settings") == 3
        assert one(conn, "SELECT test_now FROM calling_settings") is None
        # what the rules' tests put back is what a fresh database has
        conn.execute(SHIPPED_CALLING_RULES)
        assert conn.execute(
            "SELECT start_time::text, end_time::text FROM calling_windows"
        ).fetchall() == [("08:00:00", "21:00:00")]
        assert one(conn, "SELECT callq_now() = now()")


def test_the_zone_migration_is_generated_from_the_installed_phonenumbers() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_phone_zones.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_number_zones_hold_every_zone_libphonenumber_gives(conn: Conn) -> None:
    """Random valid numbers of every region and type (near each example number): the SQL lookup
    holds every zone libphonenumber answers (never fewer, or the window would be loosened).
    Numbers of another length than the region's fixed lines under the same prefix (a few
    short codes) are answered as the fixed lines: scripts/gen_phone_zones.py says why."""
    import random

    import phonenumbers
    from phonenumbers import PhoneNumberType, timezone

    rng = random.Random(10)
    numbers: list[tuple[str, set[str]]] = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        fixed = phonenumbers.example_number_for_type(region, PhoneNumberType.FIXED_LINE)
        for kind in (
            PhoneNumberType.FIXED_LINE,
            PhoneNumberType.MOBILE,
            PhoneNumberType.TOLL_FREE,
            PhoneNumberType.VOIP,
            PhoneNumberType.PREMIUM_RATE,
        ):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            digits = ("0" if example.italian_leading_zero else "") + str(example.national_number)
            if fixed is not None and len(str(fixed.national_number)) != len(
                str(example.national_number)
            ):
                continue
            for _ in range(8):
                keep = max(1, len(digits) - rng.randint(0, 6))
                tail = "".join(rng.choice("0123456789") for _ in range(len(digits) - keep))
                e164 = f"+{example.country_code}{digits[:keep]}{tail}"
                number = phonenumbers.parse(e164)
                expected = set(timezone.time_zones_for_number(number)) - {"Etc/Unknown"}
                if phonenumbers.is_valid_number(number) and expected:
                    numbers.append((e164, expected))
    assert len(numbers) > 2000
    got = dict(
        conn.execute(
            "SELECT n, phone_timezones(n) FROM unnest(%s::text[]) n", ([n for n, _ in numbers],)
        ).fetchall()
    )
    wrong = [(n, sorted(z)) for n, z in numbers if not z <= set(got[n] or ())]
    assert wrong == []
    # mobiles are not geographic: an Australian mobile may be in Perth as well as Sydney
    assert len(one(conn, "SELECT phone_timezones('+61412345678')")) == 8
    zones = {
        NEW_YORK: ["America/New_York"],
        HONOLULU: ["Pacific/Honolulu"],
        LONDON: ["Europe/London"],
        SYDNEY: ["Australia/Sydney"],
        TOKYO: ["Asia/Tokyo"],
        NORTH_DAKOTA: ["America/Denver", "America/North_Dakota/Center"],
    }
    for phone, expected_zones in zones.items():
        assert sorted(one(conn, "SELECT phone_timezones(%s)", (phone,))) == expected_zones
    # an unassigned area code gets every zone of the country: the strictest reading
    assert len(one(conn, "SELECT phone_timezones('+15551234567')")) > 30
    # every zone of the data is one the server can convert
    assert (
        one(
            conn,
            "SELECT count(*) FROM phone_prefix_zones, unnest(zones) z"
            " WHERE z NOT IN (SELECT name FROM calling_timezones)",
        )
        == 0
    )


def test_schedule_call_stores_the_given_or_derived_zones(w: World) -> None:
    q1 = w.schedule(NEW_YORK)
    q2 = w.schedule(NEW_YORK, recipient_timezone="Asia/Tokyo")
    q3 = w.schedule(NORTH_DAKOTA)
    assert w.row(q1)["recipient_timezones"] == ["America/New_York"]
    assert w.row(q2)["recipient_timezones"] == ["Asia/Tokyo"]
    assert sorted(w.row(q3)["recipient_timezones"]) == [
        "America/Denver",
        "America/North_Dakota/Center",
    ]
    # a row written without schedule_call gets its zones from the trigger
    w.conn.execute(
        "INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone)"
        " VALUES (%s, %s, 'R', %s)",
        (w.user, w.template, LONDON),
    )
    assert one(
        w.conn, "SELECT recipient_timezones FROM call_queue WHERE recipient_phone = %s", (LONDON,)
    ) == ["Europe/London"]


@pytest.mark.parametrize(
    ("phone", "zone", "code"),
    [
        (NEW_YORK, "Mars/Olympus_Mons", "CQ021"),
        (NEW_YORK, "abc+3", "CQ021"),  # a POSIX spec PostgreSQL would accept, not an IANA name
        (NEW_YORK, "", "CQ021"),
        ("+80012345678", None, "CQ023"),  # international freephone: no zone known
    ],
)
def test_schedule_call_refuses_unknown_zones(
    w: World, phone: str, zone: str | None, code: str
) -> None:
    query = (
        "SELECT schedule_call(p_user_id => %s, p_template_id => %s, p_recipient_name => 'R',"
        " p_recipient_phone => %s, p_recipient_timezone => %s)"
    )
    try:
        with w.conn.transaction():
            w.conn.execute(query, (w.user, w.template, phone, zone))
        pytest.fail("accepted")
    except psycopg.Error as exc:
        assert exc.sqlstate == code
        assert phone not in str(exc)
    assert one(w.conn, "SELECT count(*) FROM call_queue") == 0
    # the same number with a valid zone is accepted
    w.schedule(phone, recipient_timezone="Europe/Paris")


# --- windows -----------------------------------------------------------------------------------


def test_only_calls_inside_their_window_are_claimed_the_rest_wait_for_the_opening(
    w: World,
) -> None:
    now = datetime(2026, 7, 15, 12, 0, tzinfo=UTC)
    set_clock(w.conn, now)
    ids = {phone: w.schedule(phone) for phone in (NEW_YORK, HONOLULU, LONDON, SYDNEY, TOKYO)}
    claimed = w.claim()
    # New York 08:00 (the window opens at 08:00), London 13:00: claimed.
    assert set(claimed) == {ids[NEW_YORK], ids[LONDON]}
    # Honolulu 02:00, Sydney 22:00, Tokyo 21:00 (the end is exclusive): moved, still queued.
    expected = {
        HONOLULU: local("Pacific/Honolulu", "2026-07-15 08:00"),
        SYDNEY: local("Australia/Sydney", "2026-07-16 08:00"),
        TOKYO: local("Asia/Tokyo", "2026-07-16 08:00"),
    }
    for phone, opening in expected.items():
        row = w.row(ids[phone])
        assert (row["status"], row["hold_reason"]) == ("queued", "calling_window"), phone
        assert row["scheduled_time"] == opening, phone
    assert all(w.gate(aid) for aid in claimed.values())
    # a second claim at the same moment finds nothing due
    assert w.claim() == {}
    # at Tokyo's opening (the last of the three), the three are claimed
    set_clock(w.conn, expected[TOKYO])
    assert set(w.claim()) == {ids[TOKYO], ids[HONOLULU], ids[SYDNEY]}


def test_a_number_spanning_two_zones_must_be_inside_the_window_in_both(w: World) -> None:
    # 07:30 in Denver is 08:30 in North Dakota's Central zone: closed in Denver
    set_clock(w.conn, local("America/Denver", "2026-02-10 07:30"))
    q = w.schedule(NORTH_DAKOTA)
    assert w.claim() == {}
    assert w.row(q)["scheduled_time"] == local("America/Denver", "2026-02-10 08:00")
    # 20:30 in Denver is 21:30 in Central: closed there; next: 08:00 Denver (09:00 Central)
    set_clock(w.conn, local("America/Denver", "2026-02-10 20:30"))
    w.conn.execute("UPDATE call_queue SET scheduled_time = callq_now() WHERE id = %s", (q,))
    assert w.claim() == {}
    assert w.row(q)["scheduled_time"] == local("America/Denver", "2026-02-11 08:00")
    set_clock(w.conn, local("America/Denver", "2026-02-10 19:59"))
    w.conn.execute("UPDATE call_queue SET scheduled_time = callq_now() WHERE id = %s", (q,))
    assert set(w.claim()) == {q}


def oracle_open(zones: list[str], rules: list[tuple[Any, ...]], at: datetime) -> bool:
    """Independent check: every rule open in every zone (rules: days, start, end, excluded)."""
    for zone in zones:
        t = at.astimezone(ZoneInfo(zone))
        for days, start, end, excluded in rules:
            if t.isoweekday() not in days or t.date() in excluded:
                return False
            if not (start <= t.time().replace(tzinfo=None) < end):
                return False
    return True


def _rules(conn: Conn) -> list[tuple[Any, ...]]:
    rows = conn.execute(
        "SELECT days, start_time, end_time, excluded_dates FROM calling_windows WHERE is_active"
    ).fetchall()
    return [(set(d), s, e, set(x)) for d, s, e, x in rows]


@pytest.mark.parametrize(
    ("zone", "day", "start"),
    [
        ("America/New_York", "2026-03-08", "02:30"),  # spring forward: 02:30 does not exist
        ("America/New_York", "2026-11-01", "01:30"),  # fall back: 01:30 happens twice
        ("Australia/Sydney", "2026-04-05", "02:30"),  # southern autumn: 02:30 happens twice
        ("Australia/Sydney", "2026-10-04", "02:30"),  # southern spring: 02:30 does not exist
    ],
)
def test_windows_around_daylight_saving_changes(w: World, zone: str, day: str, start: str) -> None:
    """Every 30 minutes for 30 hours around the change, with a window opening in the changed
    hour: a call is claimed exactly when the oracle says the window is open, and a held call
    waits for the first open moment."""
    w.conn.execute("UPDATE calling_windows SET start_time = %s, end_time = '23:30'", (start,))
    rules = _rules(w.conn)
    begin = datetime.fromisoformat(day).replace(tzinfo=ZoneInfo(zone)) - timedelta(hours=3)
    for step in range(30 * 2):
        at = (begin + timedelta(minutes=30 * step)).astimezone(UTC)
        set_clock(w.conn, at)
        q = w.schedule(NEW_YORK, recipient_timezone=zone)
        claimed = w.claim()
        assert (q in claimed) == oracle_open([zone], rules, at), at
        if q in claimed:
            assert w.gate(claimed[q])
        else:
            opening = w.row(q)["scheduled_time"]
            assert opening > at and oracle_open([zone], rules, opening), (at, opening)
            assert not oracle_open([zone], rules, opening - timedelta(minutes=1)), (at, opening)
        w.conn.execute("DELETE FROM call_queue")


def test_spring_forward_opening_inside_the_missing_hour(w: World) -> None:
    w.conn.execute("UPDATE calling_windows SET start_time = '02:30', end_time = '21:00'")
    set_clock(w.conn, local("America/New_York", "2026-03-08 01:00"))
    q = w.schedule(NEW_YORK)
    assert w.claim() == {}
    opening = w.row(q)["scheduled_time"]
    # 02:30 does not exist that night; the call waits until the first open moment after it
    assert opening.astimezone(ZoneInfo("America/New_York")).hour == 3
    assert oracle_open(["America/New_York"], _rules(w.conn), opening)


def test_the_strictest_rule_wins_by_scope(w: World) -> None:
    conn = w.conn
    other = make_user(conn, call_limit=None)
    other_tpl = make_template(conn, other)
    # plan: 08:00-20:00, no Sundays; user: not on 2026-07-14; template: from 10:00
    conn.execute(
        "INSERT INTO calling_windows (scope, plan_id, start_time, end_time, days)"
        " VALUES ('plan', %s, '08:00', '20:00', '{1,2,3,4,5,6}')",
        (w.plan,),
    )
    conn.execute(
        "INSERT INTO calling_windows (scope, user_id, start_time, end_time, excluded_dates)"
        " VALUES ('user', %s, '00:00', '24:00', '{2026-07-14}')",
        (w.user,),
    )
    conn.execute(
        "INSERT INTO calling_windows (scope, template_id, start_time, end_time)"
        " VALUES ('template', %s, '10:00', '24:00')",
        (w.template,),
    )
    ny = "America/New_York"
    cases = [
        ("2026-07-13 20:30", False, "2026-07-15 10:00"),  # Monday after 20:00; 14th excluded
        ("2026-07-15 09:30", False, "2026-07-15 10:00"),  # before the template's 10:00
        ("2026-07-15 10:00", True, None),
        ("2026-07-19 12:00", False, "2026-07-20 10:00"),  # Sunday
    ]
    for when, open_now, opening in cases:
        set_clock(conn, local(ny, when))
        q = w.schedule(NEW_YORK)
        q_other = schedule(conn, other, other_tpl, recipient_phone=NEW_YORK)
        claimed = w.claim()
        assert (q in claimed) == open_now, when
        # the other user (other plan, template) has only the default rule
        assert q_other in claimed, when
        if opening:
            assert w.row(q)["scheduled_time"] == local(ny, opening), when
        conn.execute("DELETE FROM call_queue")
    # an inactive rule no longer restricts
    conn.execute("UPDATE calling_windows SET is_active = false WHERE scope <> 'default'")
    set_clock(conn, local(ny, "2026-07-19 12:00"))
    q = w.schedule(NEW_YORK)
    assert q in w.claim()


def test_a_claim_fills_its_batch_past_calls_outside_their_window(w: World) -> None:
    set_clock(w.conn, datetime(2026, 7, 15, 12, 0, tzinfo=UTC))  # Tokyo 21:00, London 13:00
    night = [w.schedule(TOKYO, priority=1) for _ in range(12)]
    day = [w.schedule(LONDON, priority=9) for _ in range(5)]
    claimed = w.claim(5)
    assert set(claimed) == set(day)
    assert all(w.row(q)["hold_reason"] == "calling_window" for q in night)
    assert slots(w.conn, w.provider) == (5, 95)
    # get_next_call_in_queue applies the same rule
    w.conn.execute(
        "UPDATE call_queue SET scheduled_time = callq_now() WHERE id = ANY(%s)", (night,)
    )
    later = w.schedule(LONDON, priority=9)
    assert one(w.conn, "SELECT queue_id FROM get_next_call_in_queue()") == later


def test_a_window_that_closes_while_the_call_is_claimed_sends_it_back(w: World) -> None:
    ny = "America/New_York"
    set_clock(w.conn, local(ny, "2026-07-15 20:59"))
    q = w.schedule(NEW_YORK)
    (aid,) = w.claim().values()
    assert slots(w.conn, w.provider) == (1, 99)
    set_clock(w.conn, local(ny, "2026-07-15 21:00"))
    assert w.gate(aid) is False
    row = w.row(q)
    assert (row["status"], row["hold_reason"], row["attempts"]) == ("queued", "calling_window", 0)
    assert row["scheduled_time"] == local(ny, "2026-07-16 08:00")
    assert slots(w.conn, w.provider) == (0, 100)
    state = w.conn.execute(
        "SELECT state, error FROM call_assignments WHERE id = %s", (aid,)
    ).fetchone()
    assert state == ("released", "calling_window")
    assert one(w.conn, "SELECT count(*) FROM contact_attempts") == 0
    # the gate never opens twice for the same assignment
    assert w.gate(aid) is False
    set_clock(w.conn, local(ny, "2026-07-16 08:00"))
    (aid2,) = w.claim().values()
    assert w.gate(aid2)
    assert w.row(q)["hold_reason"] is None


def test_a_retry_is_placed_in_the_next_opening(w: World) -> None:
    ny = "America/New_York"
    set_clock(w.conn, local(ny, "2026-07-15 20:57"))
    q = w.schedule(NEW_YORK)
    (aid,) = w.claim().values()
    assert w.gate(aid)
    # busy: the backoff (4-6 min) lands after 21:00, so the retry waits for 08:00
    assert one(w.conn, "SELECT handle_failed_call(%s, 'busy')", (aid,)) == "retry_scheduled"
    row = w.row(q)
    assert (row["status"], row["hold_reason"]) == ("queued", "calling_window")
    assert row["scheduled_time"] == local(ny, "2026-07-16 08:00")
    retry = w.conn.execute("SELECT reason, next_attempt_at FROM call_retries").fetchone()
    assert retry == ("busy", local(ny, "2026-07-16 08:00"))


# --- do-not-call -------------------------------------------------------------------------------


def test_do_not_call_refuses_at_schedule_time(w: World) -> None:
    conn = w.conn
    other = make_user(conn, call_limit=None)
    with as_role_committed(conn, "authenticated", w.user):
        listed = one(conn, "SELECT add_do_not_call(%s, 'asked us to stop')", (NEW_YORK,))
        # idempotent
        assert one(conn, "SELECT add_do_not_call(%s)", (NEW_YORK,)) == listed
    assert conn.execute("SELECT user_id, reason FROM do_not_call").fetchall() == [
        (w.user, "asked us to stop")
    ]
    code = sqlstate(conn, "SELECT schedule_call(%s, %s, 'R', %s)", (w.user, w.template, NEW_YORK))
    assert code == "CQ020"
    # another tenant's list does not apply to the other user
    schedule(conn, other, make_template(conn, other), recipient_phone=NEW_YORK)
    # the global list applies to everyone; an expired entry to no one
    conn.execute("INSERT INTO do_not_call (phone, user_id) VALUES (%s, NULL)", (LONDON,))
    conn.execute(
        "INSERT INTO do_not_call (phone, user_id, expires_at)"
        " VALUES (%s, NULL, now() - interval '1 day')",
        (TOKYO,),
    )
    assert (
        sqlstate(conn, "SELECT schedule_call(%s, %s, 'R', %s)", (w.user, w.template, LONDON))
        == "CQ020"
    )
    w.schedule(TOKYO)
    assert one(conn, "SELECT count(*) FROM call_queue WHERE recipient_phone <> %s", (TOKYO,)) == 1
    with as_role(conn, "authenticated", w.user):
        assert sqlstate(conn, "SELECT add_do_not_call('555')") == "CQ005"


def test_a_number_listed_while_its_call_is_claimed_is_never_dialed(w: World) -> None:
    set_clock(w.conn, datetime(2026, 7, 15, 16, 0, tzinfo=UTC))
    q = w.schedule(NEW_YORK)
    (aid,) = w.claim().values()
    with as_role_committed(w.conn, "authenticated", w.user):
        one(w.conn, "SELECT add_do_not_call(%s)", (NEW_YORK,))
    assert w.gate(aid) is False
    row = w.row(q)
    assert (row["status"], row["last_error"], row["attempts"]) == ("canceled", "do_not_call", 0)
    assert slots(w.conn, w.provider) == (0, 100)
    assert w.conn.execute("SELECT status, error FROM call_history").fetchall() == [
        ("canceled", "do_not_call")
    ]
    assert w.conn.execute("SELECT reason, error FROM call_retries").fetchall() == [
        ("canceled", "do_not_call")
    ]
    assert one(w.conn, "SELECT count(*) FROM contact_attempts") == 0


def test_do_not_call_rows_are_private_to_their_tenant(w: World) -> None:
    conn = w.conn
    other = make_user(conn, call_limit=None)
    admin = make_user(conn, admin=True)
    conn.execute("INSERT INTO do_not_call (phone, user_id) VALUES (%s, NULL)", (LONDON,))
    with as_role_committed(conn, "authenticated", w.user):
        one(conn, "SELECT add_do_not_call(%s)", (NEW_YORK,))
    with as_role(conn, "authenticated", w.user):
        assert conn.execute("SELECT phone FROM do_not_call").fetchall() == [(NEW_YORK,)]
    with as_role(conn, "authenticated", other):
        assert conn.execute("SELECT phone FROM do_not_call").fetchall() == []
        assert (
            sqlstate(conn, "INSERT INTO do_not_call (phone, user_id) VALUES (%s, NULL)", (TOKYO,))
            == "42501"
        )
        assert (
            sqlstate(
                conn, "INSERT INTO do_not_call (phone, user_id) VALUES (%s, %s)", (TOKYO, w.user)
            )
            == "42501"
        )
        assert conn.execute("DELETE FROM do_not_call").rowcount == 0
    with as_role(conn, "authenticated", admin):
        conn.execute("INSERT INTO do_not_call (phone, user_id) VALUES (%s, NULL)", (TOKYO,))
        assert sorted(r[0] for r in conn.execute("SELECT phone FROM do_not_call")) == [
            LONDON,
            TOKYO,
        ]
    with as_role(conn, "anon"):
        assert sqlstate(conn, "SELECT add_do_not_call(%s)", (TOKYO,)) == "42501"
        assert sqlstate(conn, "SELECT * FROM do_not_call") == "42501"


# --- consent -----------------------------------------------------------------------------------


def test_consent_is_required_at_schedule_time_and_rechecked_at_the_gate(w: World) -> None:
    conn = w.conn
    set_clock(conn, datetime(2026, 7, 15, 16, 0, tzinfo=UTC))
    conn.execute("UPDATE call_templates SET requires_consent = true WHERE id = %s", (w.template,))
    query = "SELECT schedule_call(%s, %s, 'R', %s)"
    assert sqlstate(conn, query, (w.user, w.template, NEW_YORK)) == "CQ022"
    with as_role_committed(conn, "authenticated", w.user):
        one(conn, "SELECT grant_call_consent(%s, 'web form 2026-07-01')", (NEW_YORK,))
    q = w.schedule(NEW_YORK)
    (aid,) = w.claim().values()
    with as_role_committed(conn, "authenticated", w.user):
        assert one(conn, "SELECT revoke_call_consent(%s)", (NEW_YORK,)) == 1
    assert w.gate(aid) is False
    assert (w.row(q)["status"], w.row(q)["last_error"]) == ("canceled", "consent_missing")
    assert slots(conn, w.provider) == (0, 100)
    # the plan can require it too
    conn.execute("UPDATE call_templates SET requires_consent = false")
    conn.execute("UPDATE subscription_plans SET requires_consent = true WHERE id = %s", (w.plan,))
    assert sqlstate(conn, query, (w.user, w.template, NEW_YORK)) == "CQ022"
    conn.execute("SELECT grant_call_consent(%s, 'import', %s)", (NEW_YORK, w.user))
    w.schedule(NEW_YORK)
    # a user cannot record consent for someone else
    other = make_user(conn, call_limit=None)
    with as_role(conn, "authenticated", other):
        assert (
            sqlstate(conn, "SELECT grant_call_consent(%s, 'x', %s)", (NEW_YORK, w.user)) == "CQ008"
        )
        assert conn.execute("SELECT * FROM call_consents").fetchall() == []


# --- attempt caps ------------------------------------------------------------------------------


def test_the_attempt_cap_counts_every_call_and_retry_to_a_number(w: World) -> None:
    conn = w.conn
    ny = "America/New_York"
    t0 = local(ny, "2026-07-15 10:00")
    set_clock(conn, t0)
    conn.execute("SELECT set_config('callq.retry_delay_scale', '0.01', false)")  # 3 s backoff
    q = w.schedule(NEW_YORK)
    conn.execute("UPDATE call_queue SET max_attempts = 10 WHERE id = %s", (q,))
    dial_times = []
    for i in range(3):
        set_clock(conn, t0 + timedelta(minutes=10 * i))
        conn.execute("UPDATE call_queue SET scheduled_time = callq_now() WHERE id = %s", (q,))
        (aid,) = w.claim().values()
        assert w.gate(aid), i
        dial_times.append(t0 + timedelta(minutes=10 * i))
        assert one(conn, "SELECT handle_failed_call(%s, 'no_answer')", (aid,)) == "retry_scheduled"
    # the third retry is placed where the cap allows: 24 h after the first attempt
    row = w.row(q)
    assert (row["hold_reason"], row["scheduled_time"]) == (
        "attempt_cap",
        dial_times[0] + timedelta(hours=24),
    )
    # another call to the same number is held at the gate too
    q2 = w.schedule(NEW_YORK)
    set_clock(conn, t0 + timedelta(hours=1))
    (aid2,) = w.claim().values()
    assert w.gate(aid2) is False
    row2 = w.row(q2)
    assert (row2["status"], row2["hold_reason"]) == ("queued", "attempt_cap")
    assert row2["scheduled_time"] == dial_times[0] + timedelta(hours=24)
    # a different number is not affected
    w.schedule(LONDON)
    (aid3,) = w.claim().values()
    assert w.gate(aid3)
    # when the cap allows (and the window is open), exactly one more goes through
    set_clock(conn, dial_times[0] + timedelta(hours=24))
    claimed = w.claim()
    assert set(claimed) >= {q, q2}
    won = [w.gate(claimed[x]) for x in (q, q2)]
    assert won.count(True) == 1
    # a plan allowing 5 lets two more through
    conn.execute(
        "UPDATE subscription_plans SET contact_attempts_per_24h = 5 WHERE id = %s", (w.plan,)
    )
    conn.execute("UPDATE call_queue SET scheduled_time = callq_now() WHERE status = 'queued'")
    claimed = w.claim()
    assert [w.gate(a) for a in claimed.values()] == [True] * len(claimed)


def test_one_chunk_of_gates_counts_its_own_dials_to_a_number(w: World) -> None:
    # dial_gates checks every call's rules before any call's plan gate; a second call of the
    # chunk to the same number is checked after the first one's dial is recorded
    set_clock(w.conn, datetime(2026, 7, 15, 16, 0, tzinfo=UTC))
    w.conn.execute(
        "UPDATE subscription_plans SET contact_attempts_per_24h = 2 WHERE id = %s", (w.plan,)
    )
    same = [w.schedule(NEW_YORK) for _ in range(4)]
    other = w.schedule(LONDON)
    claimed = w.claim()
    ids = sorted(str(a) for a in claimed.values())
    won = w.conn.execute(GATE_AND_LOAD, {"assignment_ids": ids}).fetchall()
    assert len(won) == 3  # two to the number, one to the other
    assert [w.row(q)["status"] for q in same].count("dialing") == 2
    assert {w.row(q)["hold_reason"] for q in same} == {None, "attempt_cap"}
    assert w.row(other)["status"] == "dialing"
    assert one(w.conn, "SELECT count(*) FROM contact_attempts") == 3


def test_a_released_dial_gives_its_attempt_back(w: World) -> None:
    set_clock(w.conn, datetime(2026, 7, 15, 16, 0, tzinfo=UTC))
    w.schedule(NEW_YORK)
    (aid,) = w.claim().values()
    assert w.gate(aid)
    assert one(w.conn, "SELECT count(*) FROM contact_attempts") == 1
    assert one(w.conn, "SELECT release_assignment(%s, 'connect_error')", (aid,))
    assert one(w.conn, "SELECT count(*) FROM contact_attempts") == 0


# --- the test clock cannot be moved by app users ---------------------------------------------


def test_the_clock_is_not_settable_by_app_users_or_the_worker(w: World) -> None:
    conn = w.conn
    set_clock(conn, local("Asia/Tokyo", "2026-07-15 03:00"))
    with as_role_committed(conn, "authenticated", w.user):
        conn.execute("SET LOCAL callq.test_now = '2026-07-15 03:00:00+00'")
        assert sqlstate(conn, "UPDATE calling_settings SET test_now = NULL") == "42501"
        assert sqlstate(conn, "UPDATE calling_windows SET start_time = '00:00'") in ("42501", None)
        assert (
            one(conn, "SELECT start_time::text FROM calling_windows WHERE scope = 'default'")
            == "08:00:00"
        )
        q = one(conn, "SELECT schedule_call(%s, %s, 'R', %s)", (w.user, w.template, TOKYO))
    with as_role(conn, "callq_worker"):
        assert sqlstate(conn, "UPDATE calling_settings SET test_now = NULL") == "42501"
    assert w.claim() == {}
    assert w.row(q)["hold_reason"] == "calling_window"


# --- visibility --------------------------------------------------------------------------------


def test_callq_queue_shows_calls_held_and_canceled_by_each_rule(w: World) -> None:
    from worker.status import queue_report

    set_clock(w.conn, datetime(2026, 7, 15, 12, 0, tzinfo=UTC))
    w.schedule(TOKYO)
    w.schedule(HONOLULU)
    q = w.schedule(LONDON)
    (aid,) = w.claim().values()
    w.conn.execute("SELECT add_do_not_call(%s)", (LONDON,))
    assert w.gate(aid) is False and w.row(q)["status"] == "canceled"
    report = queue_report(w.conn)
    assert "Held or canceled by calling rules" in report
    lines = {
        line.split()[0]: line.split()[1]
        for line in report.splitlines()
        if line[:4] in ("call", "do_n")
    }
    assert lines == {"calling_window": "2", "do_not_call": "1"}
    assert "WARNING: the rules' test clock is set" in report
    events = w.conn.execute(
        "SELECT detail->>'rule' FROM call_events WHERE kind = 'held'"
    ).fetchall()
    assert events == [("calling_window",), ("calling_window",)]


# --- the property ------------------------------------------------------------------------------

PHONES = [NEW_YORK, HONOLULU, LONDON, SYDNEY, TOKYO, NORTH_DAKOTA, "+15551234567", "+61412345678"]
ZONES = [None, None, "America/New_York", "Asia/Kolkata", "America/St_Johns", "Pacific/Chatham"]


def _steps() -> Any:
    from hypothesis import strategies as st

    return st.lists(
        st.one_of(
            st.tuples(st.just("schedule"), st.sampled_from(PHONES), st.sampled_from(ZONES)),
            st.tuples(st.just("dnc"), st.sampled_from(PHONES)),
            st.tuples(st.just("tick"), st.integers(1, 36 * 60)),
            st.tuples(st.just("dial"), st.integers(0, 120)),
            st.tuples(st.just("busy")),
        ),
        max_size=14,
    )


def test_no_call_is_ever_dialed_outside_its_window_to_a_listed_number_or_over_the_cap(
    w: World,
) -> None:
    """Random numbers, zones, clock jumps, do-not-call entries, claims, waits before the gate
    and busy retries: every call the gate lets through is inside every window in every zone
    of the call (checked with zoneinfo), not on a list, and within 3 attempts per 24 h."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    conn = w.conn
    rules = _rules(conn)

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        start=st.datetimes(datetime(2026, 1, 1), datetime(2026, 12, 31), timezones=st.just(UTC)),
        steps=_steps(),
    )
    def run(start: datetime, steps: list[tuple[Any, ...]]) -> None:
        with conn.transaction(force_rollback=True):
            clock = start
            set_clock(conn, clock)
            listed: set[str] = set()
            dialed: list[uuid.UUID] = []
            for step in steps:
                if step[0] == "schedule" and step[1] not in listed:
                    w.schedule(step[1], **({"recipient_timezone": step[2]} if step[2] else {}))
                elif step[0] == "dnc":
                    conn.execute("SELECT add_do_not_call(%s)", (step[1],))
                    listed.add(step[1])
                elif step[0] == "tick":
                    clock += timedelta(minutes=step[1])
                    set_clock(conn, clock)
                elif step[0] == "dial":
                    claimed = w.claim()
                    clock += timedelta(minutes=step[1])  # the call sits before the gate
                    set_clock(conn, clock)
                    for qid, aid in claimed.items():
                        if not w.gate(aid):
                            continue
                        row = w.row(qid)
                        phone = one(
                            conn, "SELECT recipient_phone FROM call_queue WHERE id = %s", (qid,)
                        )
                        assert oracle_open(row["recipient_timezones"], rules, clock), (phone, clock)
                        assert phone not in listed
                        recent = one(
                            conn,
                            "SELECT count(*) FROM contact_attempts WHERE phone = %s"
                            " AND attempted_at > %s",
                            (phone, clock - timedelta(hours=24)),
                        )
                        assert recent <= 3
                        dialed.append(aid)
                elif step[0] == "busy":
                    for aid in dialed:
                        conn.execute("SELECT handle_failed_call(%s, 'busy')", (aid,))
                    dialed = []

    run()
