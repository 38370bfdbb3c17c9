"""Notifications back to the app, through the worker's own delivery code against a real
database and a real HTTP receiver on loopback that fails, then times out, then recovers: every
call.ended event arrives at least once, signed, without phone numbers or names; the delivery
log is the user's to read; a private address is refused unless ops allow it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

from worker import notify, runtime, tasks
from worker.embedded import wait_until
from worker.settings import get_settings

from .dbutil import Conn, as_role, connect, make_provider, make_template, make_user, one


class Receiver:
    """An HTTP endpoint on loopback whose behaviour is a script: fail, hang, then answer 200."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.requests: list[tuple[dict[str, str], bytes, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    mode = receiver.script.pop(0) if receiver.script else "ok"
                    receiver.requests.append((dict(self.headers), body, mode))
                if mode == "hang":
                    time.sleep(1.5)
                self.send_response(500 if mode == "fail" else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/callq"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(["fail", "hang", "fail"])
    yield r
    r.stop()


@pytest.fixture
def notify_db(worker_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The worker's code pointed at this database, private addresses allowed, short timeouts."""
    monkeypatch.setenv("CALLQ_NOTIFY_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("CALLQ_NOTIFY_READ_TIMEOUT_SECONDS", "0.5")
    get_settings.cache_clear()
    with connect(worker_db) as c:
        c.execute("UPDATE ops_settings SET retry_delay_scale = 0.001")
    yield worker_db
    get_settings.cache_clear()


def _end_calls(conn: Conn, user: Any, n: int) -> list[Any]:
    """n calls of one campaign, each dialed and completed (or failed) through the SQL path."""
    tpl = make_template(conn, user)
    camp = one(conn, "SELECT create_campaign(%s, %s, 'N', 'running')", (user, tpl))
    rows = [
        {"name": f"Ann {i}", "phone": f"+1555{i:07d}", "external_id": f"crm-{i}"} for i in range(n)
    ]
    conn.execute("SELECT count(*) FROM schedule_calls(%s, %s)", (camp, json.dumps(rows)))
    ended = []
    for i, (qid, aid, _) in enumerate(
        conn.execute("SELECT * FROM claim_and_assign_calls(%s)", (n,)).fetchall()
    ):
        one(conn, "SELECT mark_call_dialing(%s)", (aid,))
        if i % 2:
            one(conn, "SELECT handle_failed_call(%s, 'permanent')", (aid,))
        else:
            one(conn, "SELECT complete_call(%s, 42, NULL, 'hello there', 0.05)", (aid,))
        ended.append(qid)
    return ended


def _drain_until_done(db_url: str, timeout: float = 60) -> None:
    db = runtime.database()
    with connect(db_url) as c:

        def drained() -> bool:
            if not one(c, "SELECT count(*) FROM call_notifications WHERE status = 'pending'"):
                return True
            for nid, attempt in db.claim_notifications(50, 60):
                tasks.notify_deliver(str(nid), attempt)
            return False

        wait_until(drained, timeout=timeout, interval=0.05, what="every notification delivered")


def test_every_event_arrives_signed_despite_failures_and_timeouts(
    notify_db: str, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    with connect(notify_db) as conn:
        make_provider(conn, max_calls=10)
        user = make_user(conn, call_limit=None)
        endpoint, secret = conn.execute(
            "SELECT * FROM register_notification_endpoint(%s, %s, NULL, true)",
            (user, receiver.url),
        ).fetchone()  # type: ignore[misc]
        ended = _end_calls(conn, user, 6)
        assert one(conn, "SELECT count(*) FROM call_notifications") == 6
    _drain_until_done(notify_db)

    delivered: dict[str, dict[str, Any]] = {}
    for headers, body, mode in receiver.requests:
        assert notify.verify(secret, body, headers[notify.SIGNATURE_HEADER]), "signature"
        event = json.loads(body)
        assert headers[notify.EVENT_ID_HEADER] == event["id"]
        assert b"+1555" not in body and b"Ann " not in body
        if mode == "ok":
            delivered[event["data"]["queue_id"]] = event
    assert set(delivered) == {str(q) for q in ended}  # each at least once
    modes = [m for _, _, m in receiver.requests]
    assert modes[:3] == ["fail", "hang", "fail"] and len(modes) >= 9
    sample = next(e for e in delivered.values() if e["data"]["outcome"] == "completed")
    assert sample["type"] == "call.ended" and sample["data"]["transcript"] == "hello there"
    assert sample["data"]["external_id"].startswith("crm-")
    assert {e["data"]["outcome"] for e in delivered.values()} == {"completed", "failed"}

    with connect(notify_db) as conn:
        rows = conn.execute(
            "SELECT status, attempts, last_error FROM call_notifications ORDER BY attempts DESC"
        ).fetchall()
        assert {r[0] for r in rows} == {"delivered"}
        assert rows[0][1] >= 2  # the ones that met the failures were retried
        other = make_user(conn)
        with as_role(conn, "authenticated", user):  # the delivery log is the owner's to read
            assert one(conn, "SELECT count(*) FROM call_notifications") == 6
            assert one(conn, "SELECT url FROM notification_endpoints") == receiver.url
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute("SELECT secret FROM notification_endpoints")
        with as_role(conn, "authenticated", other):
            assert one(conn, "SELECT count(*) FROM call_notifications") == 0
        assert endpoint is not None
    out = capsys.readouterr()
    logs = out.out + out.err
    assert "notification.attempt" in logs
    assert "+1555" not in logs and "Ann " not in logs and secret not in logs
    assert receiver.url not in logs


def test_private_addresses_are_refused_unless_ops_allow_them(
    worker_db: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLQ_NOTIFY_ALLOW_PRIVATE", "false")
    get_settings.cache_clear()
    with connect(worker_db) as conn:
        make_provider(conn, max_calls=10)
        user = make_user(conn, call_limit=None)
        conn.execute("SELECT * FROM register_notification_endpoint(%s, %s)", (user, receiver.url))
        _end_calls(conn, user, 1)
    db = runtime.database()
    ((nid, attempt),) = db.claim_notifications(10, 60)
    assert tasks.notify_deliver(str(nid), attempt) == "retry"
    assert receiver.requests == []
    with connect(worker_db) as conn:
        assert one(conn, "SELECT last_error FROM call_notifications").startswith("insecure_url")
    get_settings.cache_clear()


def test_register_refuses_bad_urls_and_other_users(db_url: str) -> None:
    with connect(db_url) as conn:
        alice = make_user(conn)
        bob = make_user(conn)
        for url in (
            "http://hooks.example.com/x",  # plain http off loopback
            "ftp://hooks.example.com/x",
            "https://user:pass@hooks.example.com/x",
            "https://",
            "https://a b.example.com/",
        ):
            with pytest.raises(psycopg.Error) as err:
                conn.execute("SELECT * FROM register_notification_endpoint(%s, %s)", (alice, url))
            assert err.value.sqlstate == "CQ047", url
        with as_role(conn, "authenticated", bob), pytest.raises(psycopg.Error) as err:
            conn.execute(
                "SELECT * FROM register_notification_endpoint(%s, 'https://h.example.com/')",
                (alice,),
            )
        assert err.value.sqlstate == "CQ008"
        eid, first = conn.execute(
            "SELECT * FROM register_notification_endpoint(%s, 'https://h.example.com/')", (alice,)
        ).fetchone()  # type: ignore[misc]
        with as_role(conn, "authenticated", bob), pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT rotate_notification_secret(%s)", (eid,))
        assert err.value.sqlstate == "CQ048"
        with as_role(conn, "authenticated", alice):
            second = one(conn, "SELECT rotate_notification_secret(%s)", (eid,))
            assert second != first and second.startswith("whsec_") and len(second) == 70
