"""Run every benchmark, print one table, write bench/results/latest.json and bench/RESULTS.md.

    .venv/bin/python -m bench.run [--quick] [--only claim,growth,e2e,campaigns,fairness] [--drills]

Figures are measured against a baseline in the same run on the same machine (ratios), with the
absolute numbers beside them. ``--drills`` also runs the fault drills (``bench.drills``) and puts
their table in RESULTS.md; without it, the drill table of the last ``python -m bench.drills`` run
(bench/results/drills.json) is included when present.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import REPO, log

RESULTS_DIR = REPO / "bench" / "results"
RESULTS_MD = REPO / "bench" / "RESULTS.md"

Row = tuple[str, str, str, str, str, str]
SECTIONS = (
    "claim",
    "growth",
    "e2e",
    "campaigns",
    "tracking",
    "webhooks",
    "pooler",
    "events",
    "fairness",
)


def _f(x: Any, digits: int = 0, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}{unit}"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def rows_from(results: dict[str, Any]) -> list[Row]:
    """Every row of the table, section by section."""
    rows = claim_rows(results) + e2e_rows(results) + growth_rows(results)
    rows += campaign_rows(results) + tracking_rows(results.get("tracking") or {})
    rows += webhook_rows(results.get("webhooks") or {})
    rows += pooler_rows(results.get("pooler") or {})
    rows += event_rows(results.get("events") or {})
    rows += fairness_rows(results.get("fairness"))
    return rows + memory_rows(results)


def claim_rows(results: dict[str, Any]) -> list[Row]:
    """The claim path against the bare claim (bench.claim)."""
    rows: list[Row] = []
    claim = results.get("claim")
    if claim and "ratios" in claim:
        names = {
            "single": "claim + assign, single (get_next + best provider + assign)",
            "caa1": "claim + assign, single via claim_and_assign_calls(1) (informative)",
            "batch": "claim + assign, batch of 50 (claim_and_assign_calls)",
            "floor": "claim + assign, single: the path's writes alone, no rules, triggers or"
            " foreign-key checks (the floor, informative)",
        }
        for key, v in claim["ratios"].items():
            kind, clients = key.split("_c")
            ratio = v["ratio"]
            note = " (queue emptied)" if v.get("exhausted") else ""
            informative = kind == "floor"
            rows.append(
                (
                    f"{names[kind]}, {clients} clients, rows/s{note}",
                    _f(v["ours"]),
                    _f(v["bare"]),
                    _f(ratio, 2),
                    "informative" if informative else ">= 0.5",
                    "" if informative else _met(ratio >= 0.5),
                )
            )
    # ours against each baseline: the ratio bounds our rate against the baseline's when the
    # cores are busy
    baselines = (("bare", "vs bare"), ("floor", "vs the floor (the path's writes alone)"))
    for kind, cpu in (claim or {}).get("server_cpu_ms_per_row", {}).items():
        for base, label in baselines:
            if cpu.get("ours") and cpu.get(base):
                rows.append(
                    (
                        f"claim + assign, {kind}: server CPU ms per claimed row, one client,"
                        f" {label} (bounds the rate ratio when the cores are busy)",
                        _f(cpu["ours"], 3),
                        _f(cpu[base], 3),
                        _f(cpu[base] / cpu["ours"], 2),
                        "informative",
                        "",
                    )
                )
    return rows


def e2e_rows(results: dict[str, Any]) -> list[Row]:
    """End to end and latency (bench.e2e)."""
    e2e = results.get("e2e") or {}
    return _throughput_rows(e2e.get("throughput")) + _latency_rows(
        e2e.get("latency"), e2e.get("latency_sweep") or {}
    )


def _throughput_rows(thr: dict[str, Any] | None) -> list[Row]:
    if not thr:
        return []
    noop = max(thr["noop"]["rate"], thr["noop_after"]["rate"])
    rows: list[Row] = [
        (
            "end to end: schedule_call -> create at simulator, calls/s vs no-op tasks/s",
            _f(thr["ours"]["rate"]),
            _f(noop),
            _f(thr["ratio"], 2),
            ">= 0.5",
            _met(thr["ratio"] >= 0.5),
        )
    ]
    first = thr.get("first_burst")
    if first:
        rows.append(
            (
                "end to end, a fresh worker's first burst (its connections planning), calls/s",
                _f(first["rate"]),
                _f(noop),
                _f(first["rate"] / noop if noop else None, 2),
                "informative",
                "",
            )
        )
    return rows


def _latency_rows(lat: dict[str, Any] | None, sweep: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    if lat:
        labels = {
            "idle": "idle, one call at a time",
            "load": f"under load ({_f(lat['load'].get('rate'))} calls/s)",
        }
        for phase, label in labels.items():
            v = lat[phase]
            for pct, target, limit in (("p50", "<= 100 ms", 100), ("p99", "<= 500 ms", 500)):
                rows.append(
                    (
                        f"latency commit -> create, {label}, {pct} ms",
                        _f(v[f"{pct}_ms"], 1),
                        "",
                        "",
                        target,
                        _met(v[f"{pct}_ms"] <= limit if v["arrived"] else None),
                    )
                )
    for rate, v in sweep.items():
        rows.append(
            (
                f"latency commit -> create at a steady {float(rate):.0f} calls/s, p50 / p99 ms",
                f"{_f(v['p50_ms'], 1)} / {_f(v['p99_ms'], 1)}",
                "",
                "",
                "<= 100 / <= 500 ms",
                _met(v["p50_ms"] <= 100 and v["p99_ms"] <= 500 if v["arrived"] else None),
            )
        )
    return rows


def growth_rows(results: dict[str, Any]) -> list[Row]:
    """Latency at a large table against a small one (bench.growth)."""
    rows: list[Row] = []
    growth = results.get("growth")
    if growth and "ratios" in growth:
        small, large = (str(s) for s in growth["sizes"])
        labels = {
            "claim_single": "claim latency, get_next_call_in_queue()",
            "claim_batch50": "claim latency, claim_and_assign_calls(50)",
            "history": "one user's history (newest 50), as owner",
            "history_rls": "one user's history, as the user (RLS) with WHERE user_id",
            "history_api_rls_only": "one user's history, as the user, RLS only (PostgREST)",
            "schedule_call": "schedule_call for a large tenant (plan with call limit)",
        }
        for name, ratio in growth["ratios"].items():
            rows.append(
                (
                    f"growth: {labels.get(name, name)}, ms at {int(large):,} rows"
                    f" vs {int(small):,}",
                    _f(growth[large][name]["median_ms"], 2),
                    _f(growth[small][name]["median_ms"], 2),
                    _f(ratio, 2),
                    "<= 1.5",
                    _met(ratio <= 1.5),
                )
            )
    return rows


def fairness_rows(fair: dict[str, Any] | None) -> list[Row]:
    """B's latency loaded vs idle (same run); A's drain vs the unfair baseline (bench.fairness)."""
    if not fair or "b_idle" not in fair:
        return []
    from bench.fairness import BASELINE

    idle, loaded, n = fair["b_idle"], fair["b_loaded"], fair["a_calls"]
    rows: list[Row] = []
    for q in ("p50", "p99"):
        ratio = loaded[f"{q}_ms"] / idle[f"{q}_ms"] if loaded["arrived"] else float("nan")
        rows.append(
            (
                f"fairness: B's schedule -> create {q} ms while A's {n:,} due calls drain,"
                " vs B idle",
                _f(loaded[f"{q}_ms"], 1),
                _f(idle[f"{q}_ms"], 1),
                _f(ratio, 2),
                "<= 2" if q == "p99" else "",
                _met(ratio <= 2) if q == "p99" and loaded["arrived"] else "",
            )
        )
    unfair = fair.get("unfair")
    base = (
        {
            "a_drain_seconds": unfair["a_drain_seconds"],
            "b_p50_ms": unfair["b_loaded"]["p50_ms"],
            "b_p99_ms": unfair["b_loaded"]["p99_ms"],
        }
        if unfair and "b_loaded" in unfair
        else BASELINE.get(str(n))
    )
    if base:
        ratio = fair["a_drain_seconds"] / base["a_drain_seconds"]
        rows.append(
            (
                f"fairness: A's drain of {n:,} calls, s, vs the unfair claim (same run"
                f"{'' if unfair else ': none, a recorded figure'}; its B loaded p50/p99 ms: "
                f"{_f(base['b_p50_ms'], 0)} / {_f(base['b_p99_ms'], 0)})",
                _f(fair["a_drain_seconds"], 1),
                _f(base["a_drain_seconds"], 1),
                _f(ratio, 2),
                "<= 1.10",
                _met(ratio <= 1.10),
            )
        )
    return rows


def campaign_rows(results: dict[str, Any]) -> list[Row]:
    """Campaign upload (bench.campaigns)."""
    rows: list[Row] = []
    camp = results.get("campaigns")
    if camp and "ratio" in camp:
        rows.append(
            (
                f"campaign upload: schedule_calls of {camp['rows']:,} contacts vs bare"
                " INSERT ... SELECT, s (ratio bare/ours)",
                _f(camp["ours_s"], 3),
                _f(camp["bare_s"], 3),
                _f(camp["ratio"], 2),
                ">= 0.2 and < 2 s",
                _met(camp["ratio"] >= 0.2 and camp["ours_s"] < 2),
            )
        )
        rows.append(
            (
                "schedule_call, one call through the same core, ms (vs bare one-row INSERT)",
                _f(camp["single_ms"], 2),
                _f(camp["single_bare_ms"], 2),
                _f(camp["single_bare_ms"] / camp["single_ms"], 2),
                "informative",
                "",
            )
        )
        if camp.get("single_old_ms"):
            rows.append(
                (
                    "schedule_call, one call through the core, ms (vs the former schedule_call)",
                    _f(camp["single_ms"], 2),
                    _f(camp["single_old_ms"], 2),
                    _f(camp["single_old_ms"] / camp["single_ms"], 2),
                    "informative",
                    "",
                )
            )
    return rows


def memory_rows(results: dict[str, Any]) -> list[Row]:
    """Worker memory growth (bench.e2e)."""
    rows: list[Row] = []
    e2e = results.get("e2e") or {}
    mem = e2e.get("memory")
    if mem and "last" in mem:
        first = mem.get("first", mem["last"])
        rows.append(
            (
                f"worker RSS MiB after {mem['last']['calls']:,} calls vs after {first['calls']:,}",
                _f(mem["last"]["rss"] / 2**20, 1),
                _f(first["rss"] / 2**20, 1),
                _f(1 + mem["growth"], 3),
                "< 1.10",
                _met(mem["growth"] < 0.10),
            )
        )
    return rows


def tracking_rows(tr: dict[str, Any]) -> list[Row]:
    """Long calls (bench.tracking): reads per call, history lag, CPU trickling vs together."""
    rows: list[Row] = []
    limits = {"polling": (10, 10.0), "webhooks": (2, 1.0)}
    for source, (max_reads, max_lag) in limits.items():
        v = tr.get(f"{source}_together")
        if not v:
            continue
        secs = _f(tr["call_seconds"])
        rows.append(
            (
                f"long calls ({secs} s), {source}: provider reads per call",
                _f(v["reads_per_call"], 2),
                "",
                "",
                f"<= {max_reads}",
                _met(v["reads_per_call"] <= max_reads),
            )
        )
        rows.append(
            (
                f"long calls ({secs} s), {source}: history lag p50 / p99 s",
                f"{_f(v['lag_p50_s'], 2)} / {_f(v['lag_p99_s'], 2)}",
                "",
                "",
                f"p99 < {max_lag:g} s",
                _met(v["lag_p99_s"] < max_lag),
            )
        )
        trickle = tr.get(f"{source}_trickle")
        if trickle:
            ratio = trickle["cpu_ms_per_call"] / v["cpu_ms_per_call"]
            rows.append(
                (
                    f"long calls, {source}: worker CPU ms per call, trickling"
                    f" ({_f(tr['trickle_rate'])}/s) vs together",
                    _f(trickle["cpu_ms_per_call"], 1),
                    _f(v["cpu_ms_per_call"], 1),
                    _f(ratio, 2),
                    "<= 1",
                    _met(ratio <= 1),
                )
            )
    return rows + _lone_rows(tr.get("lone") or {})


def _lone_rows(lone: dict[str, Any]) -> list[Row]:
    """A lone call placed in process (bench.lone): the same work after an idle gap, back to
    back, and in a batch (informative: no target)."""
    if not lone:
        return []
    cpu = {mode: v["cpu_ms_per_call"] for mode, v in lone.items()}
    pairs = (
        ("125ms_apart", "back_to_back", "125 ms apart vs back to back (the same work)"),
        ("back_to_back", "batch_of_50", "back to back vs a batch of 50"),
        ("125ms_apart", "batch_of_50", "125 ms apart vs a batch of 50"),
    )
    return [
        (
            f"a lone call placed in process (claim + create + record), CPU ms per call, {label}",
            _f(cpu[a], 2),
            _f(cpu[b], 2),
            _f(cpu[a] / cpu[b], 2),
            "",
            "n/a",
        )
        for a, b, label in pairs
    ]


def webhook_rows(wh: dict[str, Any]) -> list[Row]:
    """The webhook endpoint from one keep-alive client (bench.webhooks)."""
    rows: list[Row] = []
    for key, label in (("signed", "signed delivery (200)"), ("unsigned", "unsigned (401)")):
        v = wh.get(key)
        if v:
            rows.append(
                (
                    f"webhook endpoint, {label}, one keep-alive client: p50 ms / requests/s",
                    f"{_f(v['p50_ms'], 2)} / {_f(v['rps'])}",
                    "",
                    "",
                    "< 5 ms / >= 500",
                    _met(v["p50_ms"] < 5 and v["rps"] >= 500),
                )
            )
    return rows


def pooler_rows(pooler: dict[str, Any]) -> list[Row]:
    """End to end through pgbouncer (transaction mode) beside the direct connection."""
    if "direct" not in pooler:
        return []
    labels = {"pooler": "LISTEN over a direct URL", "pooler_poll": "LISTEN off, 1 s tick"}
    return [
        (
            f"end to end through pgbouncer (transaction mode), {label}, calls/s vs direct",
            _f(pooler[key]["rate"]),
            _f(pooler["direct"]["rate"]),
            _f(pooler[key]["ratio"], 2),
            "informative",
            "",
        )
        for key, label in labels.items()
        if key in pooler
    ]


def event_rows(events: dict[str, Any]) -> list[Row]:
    """The call-event log's triggers: server CPU with them on vs off."""
    labels = {"batch": "µs per claimed row, claim_and_assign_calls(50)",
              "call": "µs per call, schedule to complete (5 statements)"}  # fmt: skip
    return [
        (
            f"call-event triggers: server CPU {label}, on vs off",
            _f(events[key]["on_us"]),
            _f(events[key]["off_us"]),
            _f(1 + events[key]["cost"], 2),
            "informative",
            "",
        )
        for key, label in labels.items()
        if key in events
    ]


def table(rows: list[Row], markdown: bool) -> str:
    head: Row = ("benchmark", "ours", "baseline", "ratio", "target", "met?")
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---|---|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import psutil
    import psycopg

    from bench.common import ADMIN_URL

    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            pg = str(row[0]).split()[0] if row else ""
    except psycopg.Error:
        pg = ""
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30),
        "python": platform.python_version(),
        "postgresql": pg or "?",
        "platform": platform.platform(),
    }


def before_after(before: dict[str, Any], rows: list[Row]) -> list[str]:
    """The rows of an earlier run (``--before FILE``) beside this run's, by benchmark."""
    earlier = {r[0]: r for r in rows_from(before)}
    out = [
        f"Before and after: the same benchmarks in the run of {before.get('finished', '?')}"
        " (before) and in this run (after).",
        "",
        "| benchmark | before | before ratio | after | after ratio | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        old = earlier.get(row[0])
        if old is not None:
            out.append(f"| {row[0]} | {old[1]} | {old[3]} | {row[1]} | {row[3]} | {row[4]} |")
    return [*out, ""]


def write_markdown(
    results: dict[str, Any], rows: list[Row], drills: list[dict[str, Any]] | None, command: str
) -> None:
    """RESULTS.md: the run's table, when each section ran, notes, drills, feature notes."""
    parts = [*_preamble(results, command), table(rows, markdown=True), ""]
    stamps = _stamps(results)
    if stamps:
        parts += ["Measured: " + "; ".join(stamps) + ".", ""]
    parts += _claim_notes(results.get("claim") or {})
    if results.get("before"):
        parts += before_after(results["before"], rows)
    if drills:
        parts += _drill_section(drills)
    # sections a feature keeps beside the run's table (e.g. bench/notes/calling_rules.md)
    for note in sorted((REPO / "bench" / "notes").glob("*.md")):
        parts += [note.read_text().rstrip(), ""]
    if (REPO / "bench" / "FINDINGS.md").exists():
        parts += ["Findings (what misses a target and why): `bench/FINDINGS.md`.", ""]
    RESULTS_MD.write_text("\n".join(parts))


def _preamble(results: dict[str, Any], command: str) -> list[str]:
    m = results["machine"]
    return [
        "# callq benchmark and drill results",
        "",
        f"Produced by `{command}` on {results['finished']} "
        f"({m['cpus']} cores, {m['memory_gb']} GB, PostgreSQL {m['postgresql']}, "
        f"Python {m['python']}); {results['seconds']:.0f} s. Each ratio compares figures "
        "measured in the same run on the same machine; the absolute numbers drift between "
        "runs on a shared machine. How each figure is measured: `bench/claim.py`, "
        "`bench/growth.py`, `bench/e2e.py`, `bench/campaigns.py`, `bench/tracking.py`, "
        "`bench/webhooks.py` (docstrings). Raw figures: "
        "`bench/results/latest.json` (not committed).",
        "",
    ]


def _stamps(results: dict[str, Any]) -> list[str]:
    """When each section was measured, and by which command."""
    stamps = [
        f"{k}: {results[k]['measured']}"
        for k in SECTIONS
        if isinstance(results.get(k), dict) and results[k].get("measured")
    ]
    if isinstance(results.get("e2e"), dict) and results["e2e"].get("latency_sweep"):
        stamps.append(
            "steady-rate latency rows: `.venv/bin/python -m bench.e2e --latency-sweep"
            " --merge` (a fresh stack, 15 s per rate, right after the e2e run)"
        )
    return stamps


def _claim_notes(claim: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if claim.get("bare_commit"):
        out += [
            "Bare baselines' commit mode (matched to the functions compared): "
            + ", ".join(f"{k}: {v}" for k, v in claim["bare_commit"].items()),
            "",
        ]
    if claim.get("slot_sensitivity"):
        out += [
            "claim_and_assign_calls(50), one client, ms by free slots per provider: "
            + ", ".join(f"{k}: {v:.1f}" for k, v in claim["slot_sensitivity"].items()),
            "",
        ]
    return out


def _drill_objects(drills: list[dict[str, Any]]) -> list[Any]:
    """The saved drills as :class:`bench.drills.DrillResult` values."""
    from bench.drills import DrillResult

    objs = []
    for d in drills:
        r = DrillResult(d["name"], d["fault"])
        for k, v in d.items():
            if hasattr(r, k):
                setattr(r, k, v)
        objs.append(r)
    return objs


def _drill_section(drills: list[dict[str, Any]]) -> list[str]:
    from bench.drills import format_table

    out = [
        "## Fault drills",
        "",
        f"`{drills[0].get('command', '.venv/bin/python -m bench.drills')}`"
        f" ({drills[0].get('finished', '')}):",
        "",
        format_table(_drill_objects(drills)),
        "",
    ]
    out += [f"- {d['name']}: {'; '.join(d['notes'])}" for d in drills if d.get("notes")]
    return [*out, ""]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument("--drills", action="store_true", help="run the fault drills too")
    parser.add_argument("--no-markdown", action="store_true", help="do not rewrite RESULTS.md")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections not run from the last bench/results/latest.json",
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite RESULTS.md from bench/results/*.json"
    )
    parser.add_argument(
        "--before", help="an earlier run's latest.json: its rows beside this run's in RESULTS.md"
    )
    return parser


def _claim(quick: bool) -> dict[str, Any]:
    from bench import claim

    out = claim.run(quick=quick)
    out["slot_sensitivity"] = claim.slot_sensitivity(
        (100, 10_000) if quick else (100, 10_000, 100_000)
    )
    return out


def _growth(quick: bool) -> dict[str, Any]:
    from bench import growth

    return growth.run(quick=quick)


def _campaigns(quick: bool) -> dict[str, Any]:
    from bench import campaigns

    return campaigns.run(rows=2_000 if quick else 10_000)


def _fairness(quick: bool) -> dict[str, Any]:
    from bench import fairness

    n = 3000 if quick else 20_000
    # the baseline in the same run: the claim of before the plans, same code otherwise
    return fairness.run(a_calls=n) | {"unfair": fairness.run(a_calls=n, unfair=True)}


def _e2e(quick: bool) -> dict[str, Any]:
    from bench import e2e

    try:
        return e2e.run(quick=quick)
    except Exception as exc:  # report what was measured, and why the rest is missing
        log(f"e2e failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def _tracking(quick: bool) -> dict[str, Any]:
    from bench import tracking

    return tracking.run(quick=quick)


def _webhooks(quick: bool) -> dict[str, Any]:
    from bench import webhooks

    return webhooks.run(500 if quick else 2000)


def _pooler(quick: bool) -> dict[str, Any]:
    from bench import pooler

    return pooler.run(quick=quick)


def _events(quick: bool) -> dict[str, Any]:
    from bench import events

    return events.run(quick=quick)


# Each section: its heading in the log and what runs it, in the order they run.
RUNS: dict[str, tuple[str, Callable[[bool], dict[str, Any]]]] = {
    "claim": ("claim path vs bare SKIP LOCKED claim (pgbench)", _claim),
    "growth": ("growth: small vs large tables", _growth),
    "campaigns": ("campaign upload: schedule_calls vs bare INSERT ... SELECT", _campaigns),
    "e2e": ("end to end, latency, memory (real fleet)", _e2e),
    "tracking": ("long calls: polling and webhooks", _tracking),
    "webhooks": ("webhook endpoint", _webhooks),
    "pooler": ("end to end through a transaction pooler (pgbouncer) vs direct", _pooler),
    "events": ("call-event log: server CPU with its triggers on vs off", _events),
    "fairness": (
        "fairness: one tenant's backlog vs another tenant's calls (real fleet)",
        _fairness,
    ),
}


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _render() -> int:
    """Rewrite RESULTS.md from the last run's files."""
    results = json.loads((RESULTS_DIR / "latest.json").read_text())
    command = results.get("e2e", {}).get("measured", "").split("(", 1)[-1].rstrip(")")
    rows = rows_from(results)
    write_markdown(results, rows, _saved_drills(), command or ".venv/bin/python -m bench.run")
    print(table(rows, markdown=False))
    return 0


def _saved_drills() -> list[dict[str, Any]] | None:
    path = RESULTS_DIR / "drills.json"
    return json.loads(path.read_text()) if path.exists() else None


def _run_drills(quick: bool, command: str) -> list[dict[str, Any]]:
    """Every fault drill; their results, also saved to bench/results/drills.json."""
    from dataclasses import asdict

    from bench import drills as drills_mod

    log("== fault drills")
    drills = [
        asdict(r) | {"passed": drills_mod.passed(r), "command": command, "finished": _now()}
        for r in drills_mod.run(quick=quick)
    ]
    for d in drills:
        d.get("extra", {}).pop("logs_tail", None)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "drills.json").write_text(json.dumps(drills, indent=2, default=str))
    return drills


def _print_drills(drills: list[dict[str, Any]]) -> None:
    from bench.drills import format_table

    print()
    print(format_table(_drill_objects(drills)))


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.render:
        return _render()
    only = {x.strip() for x in ns.only.split(",") if x.strip()}
    command = (
        ".venv/bin/python -m bench.run"
        + (" --quick" if ns.quick else "")
        + (f" --only {ns.only}" if only != set(SECTIONS) else "")
        + (" --drills" if ns.drills else "")
        + (" --merge" if ns.merge else "")
    )
    t0 = time.monotonic()
    results: dict[str, Any] = {"quick": ns.quick, "started": _now(), "machine": machine()}
    latest = RESULTS_DIR / "latest.json"
    if ns.before:
        results["before"] = json.loads(Path(ns.before).read_text())
    if ns.merge and latest.exists():
        previous = json.loads(latest.read_text())
        results |= {k: previous[k] for k in SECTIONS if k not in only and k in previous}
    drills = _saved_drills()

    def save() -> None:
        results["seconds"] = time.monotonic() - t0
        results["finished"] = _now()
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        latest.write_text(json.dumps(results, indent=2, default=str))
        if not ns.no_markdown:
            write_markdown(results, rows_from(results), drills, command)

    for name, (heading, runner) in RUNS.items():
        if name in only:
            log(f"== {heading}")
            results[name] = runner(ns.quick) | {"measured": f"{_now()} ({command})"}
            save()
    if ns.drills:
        drills = _run_drills(ns.quick, command)
    save()
    print(table(rows_from(results), markdown=False))
    if results.get("e2e", {}).get("error"):
        print(f"\nend-to-end benchmark failed: {results['e2e']['error']}")
    if drills:
        _print_drills(drills)
    if not ns.no_markdown:
        log(f"wrote {RESULTS_MD.relative_to(REPO)} and bench/results/latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
