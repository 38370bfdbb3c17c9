"""Campaign upload: ``schedule_calls`` of 10,000 contacts vs a bare ``INSERT ... SELECT``.

Both sides get the same JSON array (10,000 contacts with name, phone, email, variables, metadata,
priority, scheduled time and an external id) in one statement, on the same scratch database, in
the same run, alternating, ``call_queue`` emptied before each try:

    ours  SELECT count(*) FROM schedule_calls(campaign, contacts)        every check, the plan's
          call limit over the batch, idempotency look-ups, campaign counts, one NOTIFY
    bare  INSERT INTO call_queue (...) SELECT ... FROM jsonb_to_recordset(contacts)   no checks

The figure is the median client-side time (commit included) of ``--repeat`` tries; the ratio is
bare / ours (target >= 0.2, and ours < 2 s). Also: one ``schedule_call`` (median ms, rolled
back) beside a bare one-row INSERT and beside the former single-row ``schedule_call`` (taken from
git at ``OLD_COMMIT``, created under another name in the scratch database), for the single-call
path that now goes through the same core.

    .venv/bin/python -m bench.campaigns [--rows 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from typing import Any

import psycopg

from bench.common import REPO, ScratchDB, log, median

# The last commit whose schedule_call had its own checks (before schedule_calls_core).
OLD_COMMIT = "c0694f8"

BARE = """
INSERT INTO call_queue (user_id, campaign_id, template_id, recipient_name, recipient_phone,
                        recipient_email, priority, scheduled_time, custom_variables, metadata,
                        idempotency_key)
SELECT %(user)s, %(campaign)s, %(template)s, r.name, r.phone, r.email, r.priority,
       greatest(r.scheduled_time, now()), r.variables, r.metadata, r.external_id
  FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(name text, phone text, email text, priority int,
       scheduled_time timestamptz, variables jsonb, metadata jsonb, external_id text)
"""
OURS = "SELECT count(queue_id) FROM schedule_calls(%(campaign)s, %(rows)s::jsonb)"
SINGLE = (
    "SELECT schedule_call(%(user)s, %(template)s, 'Single', '+15550001234', NULL,"
    " now() + interval '1 hour', 5, '{\"k\": 1}'::jsonb, '{}'::jsonb, NULL)"
)
SINGLE_BARE = (
    "INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone, priority,"
    " scheduled_time, custom_variables) VALUES (%(user)s, %(template)s, 'Single', '+15550001234',"
    " 5, now() + interval '1 hour', '{\"k\": 1}')"
)


def _old_schedule_call() -> str | None:
    """The former schedule_call as ``bench_schedule_call_old``, or None without git history."""
    try:
        text = subprocess.run(
            ["git", "show", f"{OLD_COMMIT}:supabase/migrations/20240101000200_functions.sql"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    start = text.index("CREATE OR REPLACE FUNCTION public.schedule_call(")
    end = text.index("$$;", text.index("AS $$", start)) + 3
    body = text[start:end].replace("public.schedule_call(", "public.bench_schedule_call_old(")
    # the idempotency index now includes the campaign: any conflict will do for the bench
    return body.replace(
        "ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
        "ON CONFLICT DO NOTHING",
    )


def contacts(n: int) -> str:
    rows = [
        {
            "name": f"Contact {i}",
            "phone": f"+1555{i:07d}",
            "email": f"c{i}@example.com",
            "variables": {"first_name": f"C{i}", "order": i},
            "metadata": {"crm": "bench", "row": i},
            "priority": 1 + i % 10,
            "scheduled_time": "2020-01-01T00:00:00Z" if i % 2 else "2099-01-01T00:00:00Z",
            "external_id": f"crm-{i}",
        }
        for i in range(n)
    ]
    return json.dumps(rows)


def _seed(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    user = uuid.uuid4()
    conn.execute("INSERT INTO auth.users (id, email) VALUES (%s, 'bench@example.com')", (user,))
    plan = conn.execute(
        "INSERT INTO subscription_plans (name, price, call_limit) VALUES ('bench', 1, 10000000)"
        " RETURNING id"
    ).fetchone()
    assert plan is not None
    conn.execute(
        "INSERT INTO user_subscriptions (user_id, plan_id) VALUES (%s, %s)", (user, plan[0])
    )
    tpl = conn.execute(
        "INSERT INTO call_templates (created_by, name, script) VALUES (%s, 'Bench', 'Hi')"
        " RETURNING id",
        (user,),
    ).fetchone()
    assert tpl is not None
    camp = conn.execute(
        "SELECT create_campaign(%s, %s, 'bench', 'draft')", (user, tpl[0])
    ).fetchone()
    assert camp is not None
    return {"user": user, "template": tpl[0], "campaign": camp[0]}


def _empty(conn: psycopg.Connection[Any]) -> None:
    conn.execute("TRUNCATE call_queue CASCADE")
    conn.execute("VACUUM ANALYZE call_queue")


def _timed(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    conn.execute(query, params)  # type: ignore[arg-type]
    return time.perf_counter() - t0


def _single(conn: psycopg.Connection[Any], query: str, params: dict[str, Any], n: int) -> float:
    times = []
    for _ in range(n):
        with conn.transaction(force_rollback=True):
            t0 = time.perf_counter()
            conn.execute(query, params)  # type: ignore[arg-type]
            times.append((time.perf_counter() - t0) * 1000)
    return median(times[5:])


def run(rows: int = 10_000, repeat: int = 5) -> dict[str, Any]:
    db = ScratchDB(prefix="campaigns_bench")
    db.create()
    try:
        payload = contacts(rows)
        ours: list[float] = []
        bare: list[float] = []
        with psycopg.connect(db.url, autocommit=True) as conn:
            ids = _seed(conn)
            params = ids | {"rows": payload}
            for i in range(repeat):
                _empty(conn)
                ours.append(_timed(conn, OURS, params))
                got = conn.execute("SELECT count(*) FROM call_queue").fetchone()
                assert got is not None and got[0] == rows, got
                _empty(conn)
                bare.append(_timed(conn, BARE, params))
                log(f"campaigns: try {i + 1}: ours {ours[-1]:.3f} s, bare {bare[-1]:.3f} s")
            _empty(conn)
            old = _old_schedule_call()
            if old:
                conn.execute(old)  # type: ignore[arg-type]
            conn.autocommit = False
            single = _single(conn, SINGLE, ids, 205)
            single_bare = _single(conn, SINGLE_BARE, ids, 205)
            single_old = (
                _single(
                    conn, SINGLE.replace("schedule_call(", "bench_schedule_call_old("), ids, 205
                )
                if old
                else None
            )
        ours_s, bare_s = median(ours), median(bare)
        return {
            "rows": rows,
            "ours_s": ours_s,
            "bare_s": bare_s,
            "ratio": bare_s / ours_s,
            "tries": {"ours": ours, "bare": bare},
            "single_ms": single,
            "single_bare_ms": single_bare,
            "single_old_ms": single_old,
        }
    finally:
        db.drop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.campaigns", description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    ns = parser.parse_args(argv)
    r = run(ns.rows, ns.repeat)
    print(
        f"schedule_calls, {r['rows']:,} contacts: {r['ours_s']:.3f} s; bare INSERT ... SELECT:"
        f" {r['bare_s']:.3f} s; ratio bare/ours {r['ratio']:.2f} (target >= 0.2, ours < 2 s)\n"
        f"schedule_call, one call: {r['single_ms']:.2f} ms; bare one-row INSERT:"
        f" {r['single_bare_ms']:.2f} ms; former schedule_call ({OLD_COMMIT}):"
        f" {r['single_old_ms'] or float('nan'):.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
