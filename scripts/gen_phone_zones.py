"""Generate the migration that maps phone number prefixes to IANA time zones.

    .venv/bin/python scripts/gen_phone_zones.py          # rewrite the migration
    .venv/bin/python scripts/gen_phone_zones.py --check  # exit 1 if it is out of date

The data is libphonenumber's (the ``phonenumbers`` package). libphonenumber answers a number's
zones in two ways: for a geographic number (fixed line; mobile in a few countries) the zones of
the longest matching prefix of ``phonenumbers.tzdata``; for any other number (most mobiles,
toll-free, ...) every zone of its country code. The SQL function ``phone_timezones()`` only does
the longest-prefix match, so this script bakes the number types in: a geographic prefix under
which a non-geographic number can also start (its type patterns match partially, checked with the
``regex`` module) is split digit by digit, and where the two still mix, or no geographic number
can start, the prefix gets every zone of its country code. The table's answer thus always holds
every zone libphonenumber gives for a valid number (never fewer: a window must hold in all).
A prefix whose zones equal those of its longest listed shorter prefix is left out, and rows are
grouped by zone list, to keep the file small.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import phonenumbers
import regex
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata
from phonenumbers.tzdata import TIMEZONE_DATA

TARGET = (
    Path(__file__).resolve().parent.parent
    / "supabase"
    / "migrations"
    / "20240101000145_phone_zones.sql"
)
WIDTH = 100
MAX_SPLIT_DEPTH = 4  # digits a prefix mixing number types is split into, at most
# libphonenumber treats mobile numbers as geographic only in these countries
GEO_MOBILE_COUNTRIES = frozenset({52, 54, 55, 62, 86})
NON_GEO_TYPES = (
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
)

Zones = tuple[str, ...]


Patterns = list[tuple[str, frozenset[int]]]


def _patterns(cc: int) -> tuple[Patterns, Patterns]:
    """(pattern, possible national lengths) of a country code's geographic and other types."""
    geo: Patterns = []
    nongeo: Patterns = []
    for region in COUNTRY_CODE_TO_REGION_CODE.get(cc, ()):
        meta = PhoneMetadata.metadata_for_region(region)
        if meta is None:
            continue
        general = frozenset(meta.general_desc.possible_length or ())

        def entry(desc: Any) -> tuple[str, frozenset[int]] | None:
            if desc is None or not desc.national_number_pattern:
                return None
            lengths = frozenset(x for x in (desc.possible_length or ()) if x > 0)
            return desc.national_number_pattern, lengths or general  # noqa: B023

        fixed = entry(meta.fixed_line)
        mobile = entry(meta.mobile)
        if fixed:
            geo.append(fixed)
        if mobile:
            mobile_is_geo = cc in GEO_MOBILE_COUNTRIES or meta.same_mobile_and_fixed_line_pattern
            (geo if mobile_is_geo else nongeo).append(mobile)
        nongeo += [e for e in (entry(getattr(meta, t, None)) for t in NON_GEO_TYPES) if e]
    return geo, nongeo


def _lengths(patterns: Patterns, national: str) -> frozenset[int]:
    """Lengths of the numbers of these patterns that can start with ``national``."""
    out: set[int] = set()
    for pattern, lengths in patterns:
        if not lengths <= out and regex.fullmatch(pattern, national, partial=True):
            out |= lengths
    return frozenset(x for x in out if x >= len(national))


def typed(data: dict[str, Zones]) -> dict[str, Zones]:
    """tz prefixes with the number types baked in (see the module docstring)."""
    out: dict[str, Zones] = {}
    for cc in sorted(COUNTRY_CODE_TO_REGION_CODE):
        country = data.get(str(cc))
        if country is None:
            continue
        out[str(cc)] = country
        geo, nongeo = _patterns(cc)

        for prefix in sorted(p for p in data if p.startswith(str(cc)) and p != str(cc)):
            if _owner(prefix) == str(cc):
                _place(out, data, prefix, data[prefix], country, len(str(cc)), geo, nongeo)
    return out


def _place(
    out: dict[str, Zones],
    data: dict[str, Zones],
    prefix: str,
    zones: Zones,
    country: Zones,
    cc_len: int,
    geo: Patterns,
    nongeo: Patterns,
    depth: int = 0,
) -> None:
    """Decide a prefix: its own zones where only geographic numbers of a length start with it,
    its country's where only others do, digit by digit where both do."""
    national = prefix[cc_len:]
    other = _lengths(nongeo, national) if zones != country else frozenset()
    if not other:
        out[prefix] = zones
        return
    geographic = _lengths(geo, national)
    if not geographic:
        out[prefix] = country
    elif not (geographic & other):  # different lengths: E.164 numbers here are the geographic
        out[prefix] = zones
    elif depth >= MAX_SPLIT_DEPTH:
        out[prefix] = country
    else:
        out[prefix] = country
        for digit in "0123456789":
            child = prefix + digit
            if child not in data:
                _place(out, data, child, zones, country, cc_len, geo, nongeo, depth + 1)


def _owner(prefix: str) -> str:
    """The country code a tz prefix belongs to (codes are prefix-free: at most one matches)."""
    for n in (1, 2, 3):
        if int(prefix[:n]) in COUNTRY_CODE_TO_REGION_CODE:
            return prefix[:n]
    return prefix[:1]


def compact(data: dict[str, Zones]) -> dict[str, Zones]:
    """Drop prefixes whose zones equal those of the longest shorter prefix listed."""

    def parent(prefix: str) -> Zones | None:
        for n in range(len(prefix) - 1, 0, -1):
            if prefix[:n] in data:
                return data[prefix[:n]]
        return None

    return {p: z for p, z in data.items() if parent(p) != z}


def _wrapped(items: list[str], indent: str) -> list[str]:
    lines: list[str] = []
    line = ""
    for item in items:
        piece = item if not line else f",{item}"
        if len(indent) + len(line) + len(piece) > WIDTH - 4:
            lines.append(line + ",")
            line = item
        else:
            line += piece
    lines.append(line)
    return [indent + x for x in lines]


def render() -> str:
    """The whole migration as text."""
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    source = {p: tuple(sorted(z)) for p, z in TIMEZONE_DATA.items()}
    for prefix, zones in compact(typed(source)).items():
        groups[tuple(sorted(zones))].append(prefix)
    out = [
        f"-- GENERATED by scripts/gen_phone_zones.py from phonenumbers {phonenumbers.__version__}"
        " (libphonenumber's",
        "-- time zone data and number types). Do not edit: regenerate. Number prefix (country"
        " code +",
        "-- leading digits, no '+') -> the IANA zones of the numbers that start with it; the"
        " longest",
        "-- matching prefix wins (public.phone_timezones). One row per zone list.",
        "INSERT INTO public.phone_prefix_zones (prefix, zones)",
        "SELECT p, v.zones::text[] FROM (VALUES",
    ]
    rows = sorted(groups.items(), key=lambda kv: (min(kv[1], key=lambda p: (len(p), p)), kv[0]))
    for i, (zones, prefixes) in enumerate(rows):
        zone_lines = _wrapped(list(zones), "    ")
        prefix_lines = _wrapped(sorted(prefixes, key=lambda p: (len(p), p)), "    ")
        zone_text = "\n".join(zone_lines).lstrip()
        prefix_text = "\n".join(prefix_lines).lstrip()
        sep = "," if i < len(rows) - 1 else ""
        out.append(f"  ('{{{zone_text}}}',\n   '{{{prefix_text}}}'){sep}")
    out += [
        ") AS v(zones, prefixes), unnest(v.prefixes::text[]) AS p;",
        "",
        "-- Keep only zones this server knows (pg_timezone_names), so no rule ever meets a zone",
        "-- it cannot convert; a prefix left with none falls back to its shorter prefix.",
        "UPDATE public.phone_prefix_zones z",
        "   SET zones = ARRAY(SELECT n FROM unnest(z.zones) AS n",
        "                      WHERE n IN (SELECT t.name FROM public.calling_timezones t))",
        " WHERE NOT z.zones <@ ARRAY(SELECT t.name FROM public.calling_timezones t);",
        "DELETE FROM public.phone_prefix_zones WHERE cardinality(zones) = 0;",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET.name} is out of date: run scripts/gen_phone_zones.py")
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET} ({len(text):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
