"""Load a Moodle site at a fixed request rate and report latency honestly.

The script logs the configured users in through Moodle's login form. Then it
requests the configured pages for a fixed time on an open schedule, so request i is
due at start + i * 60 / rpm whatever happened to the requests before it. A request that
cannot start on time still counts its latency from its due time, so a slow server
cannot hide behind a slow client. When the pages carry Moodle's performance footer
(perfdebug 15 with MDL_PERFTOFOOT), it also reads Moodle's own figures per page:
server time, DB reads and writes, DB time, memory, included files, session wait.
It prints one JSON summary on stdout; logs and progress go to stderr.

Usage: python moodle_load.py --config config.json --rpm 1200 --duration 300

Exit codes:
    0    the run finished
    1    the summary could not be written to stdout, --output or --requests-log
    2    invalid arguments or config, or an output file that cannot be written
    3    nobody logged in (no load phase), or every session was lost and the
         users could not log in again
    130  interrupted by SIGINT (Ctrl-C), after printing the summary
    143  interrupted by SIGTERM, after printing the summary

Limits: one process and one event loop, so the rate it can hold depends on the
CPU it gets; docs/benchmarks.md gives the one-core maximum against nginx. It runs
on uvloop when that is installed. Percentiles come from a log-linear histogram and
are within 0.05 % of a recorded value. A request starts within one event-loop
iteration of its due time when the loop is not busy (see sleep_until). Redirects
are not followed during the load, so each page is measured alone. The performance
footer is searched only in the last 512 KB of a page.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import csv
import datetime
import difflib
import html.parser
import json
import logging
import math
import os
import random
import re
import signal
import stat
import string
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict
from yarl import URL

try:
    import uvloop
except ImportError:  # optional: the standard event loop works, at a lower rate
    uvloop = None

log = logging.getLogger("moodle_load")

EXIT_OK = 0
EXIT_OUTPUT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_LOGIN = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

DEFAULT_LOGIN_PATH = "/login/index.php"
# Moodle 5.1 sends users with auth_forcepasswordchange here, relative to wwwroot.
CHANGE_PASSWORD_PATH = "/login/change_password.php"
# Moodle's session cookie is "MoodleSession" plus the optional $CFG->sessioncookie.
SESSION_COOKIE_PREFIX = "MoodleSession"
# A successful Moodle 5.1 login takes two redirects (testsession, then the page).
MAX_LOGIN_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_SEED = 1
USER_AGENT = "moodle-load/1.0"

# A request sent this much after its due time counts as late. A busy event loop
# wakes a few milliseconds after a timer is due, and that is not the client falling
# behind. Latency still counts every millisecond from the due time.
LATE_AFTER_S = 0.010
# A request waits on the event loop's timer until this long before its due time,
# then yields to the loop until the due time arrives. The timers can be off by
# about a millisecond, because the standard loop's epoll selector rounds every
# timeout up to whole milliseconds and uvloop (libuv) rounds timers to the
# nearest one.
WAKE_EARLY_S = 0.001
# Parsed URLs kept for reuse; the cache is emptied when it reaches this size.
MAX_CACHED_URLS = 10_000
# At most one "falling behind" warning per this many seconds.
BEHIND_WARNING_EVERY_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# After SIGINT or SIGTERM, in-flight requests get this long to finish.
INTERRUPT_GRACE_S = 2.0
# The target rate counts as reached when this share of the due requests was sent.
RATE_REACHED_SHARE = 0.99
# A template whose responses are mostly redirects is not being measured.
REDIRECT_WARNING_SHARE = 0.5
# Distinct Location paths kept per template. Further paths count as "(other)".
MAX_LOCATION_PATHS = 50
TOP_LOCATION_PATHS = 5
PERCENTILES = (50, 95, 99)

# Histogram layout: values below 2**11 units are exact, larger ones fall in buckets
# 1/1024 of their lower bound wide (HDR-style log-linear buckets).
SUB_BUCKET_BITS = 11
SUB_BUCKETS = 1 << SUB_BUCKET_BITS
HALF_SUB_BUCKETS = SUB_BUCKETS // 2

# Moodle's performance footer (perfdebug 15 with MDL_PERFTOFOOT) sits near the end
# of a page: in Moodle 5.1 about 115 KB before it, followed by the message drawer
# and scripts. Only this many bytes at the end are searched.
FOOTER_SEARCH_BYTES = 512 * 1024
# The footer's figure lists are about 2 KB; a longer search is a broken footer.
FOOTER_MAX_BYTES = 16 * 1024
# Figures read from the footer, with the histogram scale of each: 1000 keeps
# milliseconds to the microsecond, 10 keeps megabytes to 0.1 MB as Moodle shows.
SERVER_FIGURE_SCALES = {
    "time_ms": 1000, "ram_mb": 10, "included_files": 1, "db_reads": 1,
    "db_writes": 1, "db_time_ms": 1000, "session_wait_ms": 1000,
}
# DB reads and writes are listed value by value up to this many distinct values.
MAX_DISTINCT_VALUES = 10
# Moodle's display_size() units, by first letter, in megabytes. The unit word is
# translated on non-English sites, the first letter rarely changes.
SIZE_UNITS_MB = {"b": 1 / 1024 / 1024, "k": 1 / 1024, "m": 1.0, "g": 1024.0,
                 "t": 1024.0 * 1024}
NUMBER = re.compile(rb"\d+(?:\.\d+)?")

PROGRESS = 25  # a log level between INFO and WARNING, printed as [PROGRESS]
FAILURE_KINDS = ("login_required", "http_4xx", "http_5xx", "timeout",
                 "connection_error")
LOGIN_FAILURE_TEXT = {
    "invalid_login": "invalid login (the site sent the login page back)",
    "password_change_required": "password change required"
    " (redirected to /login/change_password.php)",
    "locked_or_unconfirmed": "account locked or unconfirmed"
    " (the login POST returned 200 instead of a redirect)",
    "no_session_cookie": "no session cookie after the login",
    "http_status": "HTTP status",
    "timeout": "timed out",
    "connection_error": "connection error",
}
# A login error message is logged once per user up to this count, and its
# further repeats as one line with their number, so that a site that is down
# does not print one line per user.
LOGIN_ERRORS_PER_MESSAGE = 3
# The keys that a config may contain, at each level.
CONFIG_KEYS = ("base_url", "login_path", "users", "parameters", "urls")
USER_KEYS = ("username", "password")
PARAMETER_KEYS = ("min", "max")
URL_KEYS = ("path", "weight")
CSV_COLUMNS = ["scheduled_time", "user", "url_template", "url", "status",
               "latency_ms", "service_time_ms", "bytes", "outcome",
               *(f"server_{name}" for name in SERVER_FIGURE_SCALES)]


class ConfigError(Exception):
    """Invalid config or arguments: one line per problem, exit code 2."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class LoginFailed(Exception):
    """A user could not log in; `reason` is a key of LOGIN_FAILURE_TEXT."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or LOGIN_FAILURE_TEXT[reason])
        self.reason = reason


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@dataclass(frozen=True)
class UrlTemplate:
    """A configured page: path with {placeholders}, weight and placeholder names."""

    path: str
    weight: float
    fields: tuple[str, ...]


@dataclass(frozen=True)
class LoadConfig:
    base_url: str  # without a trailing slash
    login_path: str
    users: tuple[Credentials, ...]
    parameters: dict[str, tuple[int, int]]
    urls: tuple[UrlTemplate, ...]


@dataclass(slots=True)
class Result:
    """One finished request, as the statistics and the requests log see it."""

    due: float  # event-loop clock, seconds
    user: str
    template: str
    url: str
    status: int  # 0 when no HTTP response arrived
    latency_ms: float  # from the due time to the end of the body
    service_ms: float  # from the actual send to the end of the body
    lag_ms: float  # from the due time to the actual send
    nbytes: int
    outcome: str  # "success" or one of FAILURE_KINDS
    location_path: str | None = None  # path of the Location header of a 3xx
    perf: dict[str, float] | None = None  # figures of Moodle's performance footer


# ---------------------------------------------------------------------------
# Histogram and statistics
# ---------------------------------------------------------------------------


class Histogram:
    """Count values in bounded memory and report nearest-rank percentiles.

    Values are kept as integers of 1/scale (scale 1000 keeps milliseconds at
    microsecond resolution). Below 2048 units each unit has its own bucket. Above,
    a bucket is 1/1024 of its lower bound wide, so the bucket midpoint that a
    percentile reports is within 0.05 % of the recorded value. The smallest and
    largest ranks return the exact min and max. Memory is at most 1024 buckets per
    power of two (about 16,000 for latencies up to 30 s), whatever the number of
    values.
    """

    __slots__ = ("scale", "buckets", "count", "sum", "min", "max")

    def __init__(self, scale: float = 1000.0) -> None:
        self.scale = scale
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def record(self, value: float) -> None:
        units = int(value * self.scale + 0.5)
        if units < SUB_BUCKETS:
            index = units if units > 0 else 0
        else:
            shift = units.bit_length() - SUB_BUCKET_BITS
            index = SUB_BUCKETS + (shift - 1) * HALF_SUB_BUCKETS + (
                (units >> shift) - HALF_SUB_BUCKETS
            )
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def merge(self, other: Histogram) -> None:
        """Add the values of another histogram of the same scale."""
        buckets = self.buckets
        for index, count in other.buckets.items():
            buckets[index] = buckets.get(index, 0) + count
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def _midpoint(self, index: int) -> float:
        if index < SUB_BUCKETS:
            return index / self.scale
        offset = index - SUB_BUCKETS
        shift = offset // HALF_SUB_BUCKETS + 1
        mantissa = offset % HALF_SUB_BUCKETS + HALF_SUB_BUCKETS
        low = mantissa << shift
        high = ((mantissa + 1) << shift) - 1
        return (low + high) / 2 / self.scale

    def percentile(self, percent: float) -> float | None:
        """Return the nearest-rank percentile, or None when nothing was recorded."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(Fraction(str(percent)) * self.count / 100))
        if rank == 1:
            return self.min
        if rank >= self.count:
            return self.max
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(max(self._midpoint(index), self.min), self.max)
        return self.max

    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def plural(count: int, noun: str, plural_noun: str = "") -> str:
    """Return the count with the noun, singular for 1: "1 user", "2 users"."""
    if count == 1:
        return f"1 {noun}"
    return f"{count} {plural_noun or noun + 's'}"


# ---------------------------------------------------------------------------
# Moodle's performance footer
# ---------------------------------------------------------------------------


# An <li> of the footer that carries a figure, up to its </li>, so that a truncated
# footer never yields a partial number. Moodle 5.1 prints the figure's class first
# in the class attribute, with either quote, and the item's text without markup:
# a label without digits, the number, for DB reads/writes a second number after
# "/", then the unit. The groups are the class, the number, the second number and
# the text after the numbers. One findall() over the footer keeps the per-page cost
# in the regex engine, which matters when a core sends thousands of pages a second.
FOOTER_ITEM = re.compile(
    rb"class=[\"']?(timeused|memoryused|included|dbqueries|dbtime|sessionwait)\b"
    rb"[^>]*>[^<0-9]*([0-9]+(?:\.[0-9]+)?)(?:/([0-9]+))?([^<]*)</li>"
)
# Moodle writes a no-break space (UTF-8) between a size and its unit.
UNIT_SEPARATORS = b" :\xc2\xa0"
SECONDS_FIGURES = ((b"timeused", "time_ms"), (b"dbtime", "db_time_ms"),
                   (b"sessionwait", "session_wait_ms"))


def size_to_mb(number: bytes, unit_text: bytes) -> float | None:
    unit = unit_text.lstrip(UNIT_SEPARATORS)[:1].lower()
    factor = SIZE_UNITS_MB.get(unit.decode("latin-1"))
    return None if factor is None else float(number) * factor


def parse_perf_footer(body: bytes) -> dict[str, float] | None:
    """Read Moodle's performance footer at the end of a page.

    The search starts at the last "performanceinfo" in the final
    FOOTER_SEARCH_BYTES, so the same class names earlier in the page are
    ignored. Returns None when there is no footer or no figure in it; a truncated
    footer returns the figures that were complete.
    """
    start = body.rfind(b"performanceinfo", max(0, len(body) - FOOTER_SEARCH_BYTES))
    if start < 0:
        return None
    end = body.find(b"<table", start, start + FOOTER_MAX_BYTES)
    if end < 0:
        end = min(len(body), start + FOOTER_MAX_BYTES)
    # Reversed, so that the first item of a class wins: the first memoryused is
    # "RAM", the second "RAM peak".
    items = {item[0]: item for item in reversed(FOOTER_ITEM.findall(body, start, end))}
    if not items:
        return None

    figures: dict[str, float] = {}
    for class_name, name in SECONDS_FIGURES:
        item = items.get(class_name)
        if item is not None:
            figures[name] = float(item[1]) * 1000
    item = items.get(b"memoryused")
    if item is not None and (value := size_to_mb(item[1], item[3])) is not None:
        figures["ram_mb"] = value
    item = items.get(b"included")
    if item is not None:
        figures["included_files"] = float(item[1])
    item = items.get(b"dbqueries")
    if item is not None and item[2]:
        figures["db_reads"] = float(item[1])
        figures["db_writes"] = float(item[2])
    return figures or None


class ServerStats:
    """Moodle's own figures per response, from the performance footer."""

    def __init__(self) -> None:
        self.with_footer = 0
        self.without_footer = 0
        # 2xx responses without a footer: only these mean the footer is off, since
        # redirects and error pages may lack it on a site that has it on.
        self.pages_without_footer = 0
        self.figures = {
            name: Histogram(scale) for name, scale in SERVER_FIGURE_SCALES.items()
        }
        self.distinct: dict[str, collections.Counter[float] | None] = {
            "db_reads": collections.Counter(), "db_writes": collections.Counter(),
        }

    def record(self, perf: dict[str, float] | None, status: int = 0) -> None:
        if perf is None:
            self.without_footer += 1
            if 200 <= status < 300:
                self.pages_without_footer += 1
            return
        self.with_footer += 1
        for name, value in perf.items():
            self.figures[name].record(value)
        for name, counter in self.distinct.items():
            value = perf.get(name)
            if counter is None or value is None:
                continue
            counter[value] += 1
            if len(counter) > MAX_DISTINCT_VALUES:
                self.distinct[name] = None

    def merge(self, other: ServerStats) -> None:
        self.with_footer += other.with_footer
        self.without_footer += other.without_footer
        self.pages_without_footer += other.pages_without_footer
        for name, histogram in other.figures.items():
            self.figures[name].merge(histogram)
        for name, theirs in other.distinct.items():
            ours = self.distinct[name]
            if ours is None or theirs is None:
                self.distinct[name] = None
                continue
            ours.update(theirs)
            if len(ours) > MAX_DISTINCT_VALUES:
                self.distinct[name] = None

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "responses_with_footer": self.with_footer,
            "responses_without_footer": self.without_footer,
        }
        if not self.with_footer:
            return data
        for name, histogram in self.figures.items():
            data[name] = {
                "count": histogram.count,
                "mean": rounded(histogram.mean()),
                "p50": rounded(histogram.percentile(50)),
                "p95": rounded(histogram.percentile(95)),
                "max": rounded(histogram.percentile(100)),
            }
        for name, counter in self.distinct.items():
            data[name]["distinct"] = None if counter is None else {
                f"{value:g}": count for value, count in sorted(counter.items())
            }
        return data


class Stats:
    """Counters and histograms of one URL template, or of the whole run."""

    def __init__(self) -> None:
        self.latency = Histogram()
        self.service = Histogram()
        self.total = 0
        self.success = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.status: collections.Counter[int] = collections.Counter()
        self.late = 0
        self.max_lag_ms = 0.0
        self.redirects = 0
        self.locations: collections.Counter[str] = collections.Counter()
        self.server = ServerStats()

    def record(self, result: Result) -> None:
        self.total += 1
        self.latency.record(result.latency_ms)
        self.service.record(result.service_ms)
        if result.outcome == "success":
            self.success += 1
        else:
            self.failures[result.outcome] += 1
        self.status[result.status] += 1
        if result.lag_ms > LATE_AFTER_S * 1000:
            self.late += 1
        if result.lag_ms > self.max_lag_ms:
            self.max_lag_ms = result.lag_ms
        if result.location_path is not None:
            self.redirects += 1
            path = result.location_path
            if path not in self.locations and len(self.locations) >= MAX_LOCATION_PATHS:
                path = "(other)"
            self.locations[path] += 1
        if result.outcome not in ("timeout", "connection_error"):
            self.server.record(result.perf, result.status)

    def merge(self, other: Stats) -> None:
        """Add another template's figures, to build the run's overall figures."""
        self.latency.merge(other.latency)
        self.service.merge(other.service)
        self.total += other.total
        self.success += other.success
        self.failures.update(other.failures)
        self.status.update(other.status)
        self.late += other.late
        self.max_lag_ms = max(self.max_lag_ms, other.max_lag_ms)
        self.redirects += other.redirects
        self.locations.update(other.locations)
        self.server.merge(other.server)

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "total": self.total,
            "success": self.success,
            "failures": self.total - self.success,
            "failures_by_kind": {
                kind: self.failures[kind] for kind in FAILURE_KINDS
            },
            "status_counts": {str(k): v for k, v in sorted(self.status.items())},
        }
        for percent in PERCENTILES:
            data[f"latency_ms_p{percent}"] = rounded(self.latency.percentile(percent))
        data["latency_ms_max"] = rounded(self.latency.percentile(100))
        for percent in PERCENTILES:
            value = self.service.percentile(percent)
            data[f"service_time_ms_p{percent}"] = rounded(value)
        data["service_time_ms_max"] = rounded(self.service.percentile(100))
        data["late_requests"] = self.late
        data["max_lag_ms"] = round(self.max_lag_ms, 3)
        data["redirects"] = self.redirects
        top = self.locations.most_common(TOP_LOCATION_PATHS)
        data["redirect_locations"] = dict(top)
        data["server"] = self.server.summary()
        return data


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def json_type(value: Any) -> str:
    """Name the JSON type of a parsed value, for messages that must not show it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def check_keys(
    entry: dict[str, Any], known: tuple[str, ...], where: str | None,
    errors: list[str],
) -> None:
    """Reject the keys of entry that the config does not use, such as typos.

    where is the entry's place, such as "users[0]", or None at the top level.
    """
    for key in entry:
        if key in known:
            continue
        place = json.dumps(key) if where is None else f"{where}.{key}"
        match = difflib.get_close_matches(key, known, n=1)
        fix = f'rename it to "{match[0]}"' if match else "remove it"
        errors.append(f"error: unknown key, {place}, {fix} (known keys:"
                      f" {', '.join(known)})")


def read_config_file(path: Path) -> Any:
    """Read JSON from path, UTF-8 with or without a byte order mark."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError([
            f"error: cannot read the config file, {path} ({err.strerror}),"
            " check the --config path"
        ]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError([
            f"error: config file is not UTF-8, {path} at byte {err.start},"
            " save it as UTF-8"
        ]) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError([
            f"error: invalid JSON ({err.msg}), {path} line {err.lineno} column"
            f" {err.colno}, fix the syntax there"
        ]) from None


def check_base_url(config: dict[str, Any], errors: list[str]) -> str:
    value = config.get("base_url")
    if value is None:
        errors.append('error: missing key, "base_url", add the site address such as'
                      ' "http://127.0.0.1:8080"')
        return ""
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        errors.append(f"error: base_url is not an http or https URL, base_url ="
                      f" {json.dumps(value)}, use an address such as"
                      ' "http://127.0.0.1:8080"')
        return ""
    if parts.query or parts.fragment:
        errors.append(f"error: base_url has a query or fragment, base_url ="
                      f" {json.dumps(value)}, keep only scheme, host, port and path")
    return value.rstrip("/")


def check_login_path(config: dict[str, Any], errors: list[str]) -> str:
    value = config.get("login_path", DEFAULT_LOGIN_PATH)
    if not isinstance(value, str) or not value.startswith("/"):
        errors.append(f"error: login_path must be a path starting with /, login_path"
                      f" = {json.dumps(value)}, use {json.dumps(DEFAULT_LOGIN_PATH)}")
        return DEFAULT_LOGIN_PATH
    return value


def check_users(config: dict[str, Any], errors: list[str]) -> list[Credentials]:
    value = config.get("users")
    if value is None:
        errors.append('error: missing key, "users", add a list of'
                      ' {"username": ..., "password": ...}')
        return []
    if not isinstance(value, list) or not value:
        errors.append('error: users must be a non-empty list, "users", add at least'
                      ' one {"username": ..., "password": ...}')
        return []
    users: list[Credentials] = []
    seen: set[str] = set()
    for number, entry in enumerate(value):
        where = f"users[{number}]"
        if not isinstance(entry, dict):
            errors.append(f"error: user is not an object, {where}, write it as"
                          ' {"username": ..., "password": ...}')
            continue
        check_keys(entry, USER_KEYS, where, errors)
        username = check_username(entry, where, seen, errors)
        password = check_password(entry, where, errors)
        if username is not None and password is not None:
            users.append(Credentials(username, password))
    return users


def check_username(
    entry: dict[str, Any], where: str, seen: set[str], errors: list[str]
) -> str | None:
    """Return the user's valid username and add it to seen, else None."""
    if "username" not in entry:
        errors.append(f"error: missing key, {where}.username, add the Moodle"
                      " username as a string")
        return None
    username = entry["username"]
    if not isinstance(username, str):
        errors.append(f"error: username must be a string, {where}.username ="
                      f" {json.dumps(username)}, write it in quotes")
        return None
    if not username:
        errors.append(f'error: empty username, {where}.username = "", give the'
                      " Moodle username")
        return None
    if username in seen:
        errors.append(f"error: duplicate username, {where}.username ="
                      f" {json.dumps(username)}, list each user once")
        return None
    seen.add(username)
    return username


def check_password(
    entry: dict[str, Any], where: str, errors: list[str]
) -> str | None:
    """Return the user's valid password, else None. Messages never show it.

    An empty password is rejected here because Moodle's login form rejects it,
    which would only show up as a failed login after the start.
    """
    if "password" not in entry:
        errors.append(f"error: missing key, {where}.password, add the password as"
                      " a string")
        return None
    password = entry["password"]
    if not isinstance(password, str):
        errors.append(f"error: password must be a string, {where}.password is a"
                      f" JSON {json_type(password)}, write it in quotes")
        return None
    if not password:
        errors.append(f"error: empty password, {where}.password, give the user's"
                      " password, such as the one set_moodle_passwords.py set")
        return None
    return password


def check_parameters(
    config: dict[str, Any], errors: list[str]
) -> dict[str, tuple[int, int]]:
    value = config.get("parameters", {})
    if not isinstance(value, dict):
        errors.append('error: parameters must be an object, "parameters", write'
                      ' {"name": {"min": 1, "max": 10}}')
        return {}
    parameters: dict[str, tuple[int, int]] = {}
    for name, spec in value.items():
        where = f"parameters.{name}"
        if not isinstance(spec, dict):
            errors.append(f'error: parameter is not an object, {where}, write'
                          ' {"min": 1, "max": 10}')
            continue
        check_keys(spec, PARAMETER_KEYS, where, errors)
        bounds = []
        for key in ("min", "max"):
            bound = spec.get(key)
            if bound is None:
                errors.append(f"error: missing key, {where}.{key}, add an integer")
            elif not is_integer(bound):
                errors.append(f"error: not an integer, {where}.{key} ="
                              f" {json.dumps(bound)}, write a whole number"
                              " without quotes")
            else:
                bounds.append(bound)
        if len(bounds) == 2 and bounds[0] > bounds[1]:
            errors.append(f"error: min is greater than max, {where} (min {bounds[0]},"
                          f" max {bounds[1]}), swap them")
        elif len(bounds) == 2:
            parameters[name] = (bounds[0], bounds[1])
    return parameters


def placeholder_names(path: str) -> tuple[str, ...]:
    """Return the {names} in path; raise ValueError on bad brace syntax."""
    names: list[str] = []
    for _literal, name, spec, conversion in string.Formatter().parse(path):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"placeholder {{{name}}} is not a plain name")
        names.append(name)
    return tuple(dict.fromkeys(names))


def check_urls(
    config: dict[str, Any], declared: set[str], errors: list[str]
) -> list[UrlTemplate]:
    """Check urls; a placeholder needs a declared parameter, valid or not."""
    value = config.get("urls")
    if value is None:
        errors.append('error: missing key, "urls", add a list of {"path": "/my/"}')
        return []
    if not isinstance(value, list) or not value:
        errors.append('error: urls must be a non-empty list, "urls", add at least'
                      ' one {"path": "/my/"}')
        return []
    urls: list[UrlTemplate] = []
    for number, entry in enumerate(value):
        where = f"urls[{number}]"
        if not isinstance(entry, dict):
            errors.append(f'error: url is not an object, {where}, write it as'
                          ' {"path": "/my/", "weight": 1}')
            continue
        check_keys(entry, URL_KEYS, where, errors)
        if "path" not in entry:
            errors.append(f'error: missing key, {where}.path, add a path relative'
                          ' to base_url such as "/my/"')
            continue
        path, weight = entry["path"], entry.get("weight", 1)
        if not isinstance(path, str) or not path.startswith("/"):
            errors.append(f"error: path must start with /, {where}.path ="
                          f" {json.dumps(path)}, write it relative to base_url"
                          ' such as "/my/"')
            continue
        if not is_number(weight) or not weight > 0 or not math.isfinite(weight):
            errors.append(f"error: weight must be a number above 0, {where}.weight ="
                          f" {json.dumps(weight)}, use 1 or more")
            continue
        try:
            names = placeholder_names(path)
        except ValueError as err:
            errors.append(f"error: invalid placeholder ({err}), {where}.path ="
                          f" {json.dumps(path)}, write placeholders as {{name}}"
                          " and braces as {{ and }}")
            continue
        missing = [name for name in names if name not in declared]
        for name in missing:
            errors.append(f"error: placeholder has no parameter, {where}.path"
                          f" {{{name}}}, add \"{name}\": {{\"min\": 1, \"max\": 10}}"
                          ' to "parameters"')
        if not missing:
            urls.append(UrlTemplate(path, float(weight), names))
    return urls


def parse_config(data: Any) -> LoadConfig:
    """Validate a parsed config; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([
            f"error: config is a JSON {type(data).__name__}, not an object, write"
            ' {"base_url": ..., "users": [...], "urls": [...]}'
        ])
    errors: list[str] = []
    check_keys(data, CONFIG_KEYS, None, errors)
    base_url = check_base_url(data, errors)
    login_path = check_login_path(data, errors)
    users = check_users(data, errors)
    parameters = check_parameters(data, errors)
    declared = set()
    if isinstance(data.get("parameters"), dict):
        declared = set(data["parameters"])
    urls = check_urls(data, declared, errors)
    if errors:
        raise ConfigError(errors)
    return LoadConfig(base_url, login_path, tuple(users), parameters, tuple(urls))


def load_config(path: Path) -> LoadConfig:
    return parse_config(read_config_file(path))


# ---------------------------------------------------------------------------
# Request plan
# ---------------------------------------------------------------------------


class RequestPlan:
    """Draw the URL of each request from one seeded generator, in request order."""

    def __init__(self, config: LoadConfig, seed: int) -> None:
        self.rng = random.Random(seed)
        self.base_url = config.base_url
        self.templates = config.urls
        self.parameters = config.parameters
        self.cumulative: list[float] = []
        total = 0.0
        for template in self.templates:
            total += template.weight
            self.cumulative.append(total)
        self.total_weight = total

    def next(self) -> tuple[UrlTemplate, str]:
        rng = self.rng
        draw = rng.random() * self.total_weight
        position = bisect.bisect_right(self.cumulative, draw)
        template = self.templates[min(position, len(self.templates) - 1)]
        if not template.fields:
            return template, self.base_url + template.path
        values = {}
        for name in template.fields:
            low, high = self.parameters[name]
            values[name] = rng.randint(low, high)
        return template, self.base_url + template.path.format_map(values)


# ---------------------------------------------------------------------------
# Login
# ---------------------------------------------------------------------------


class LoginFormParser(html.parser.HTMLParser):
    """Find the logintoken and action of the form with id="login".

    HTMLParser reads attributes in any order and with any quoting, which Moodle
    themes vary. The guest login form carries a token too; it is ignored.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.in_login_form = False
        self.token: str | None = None
        self.action: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.in_login_form = values.get("id") == "login"
            if self.in_login_form:
                self.action = values.get("action") or None
        elif tag == "input" and self.in_login_form and self.token is None:
            if values.get("name") == "logintoken":
                self.token = values.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.in_login_form = False


def parse_login_form(page: str) -> tuple[str | None, str | None]:
    """Return (logintoken, form action) of the id="login" form, None when absent."""
    parser = LoginFormParser()
    parser.feed(page)
    parser.close()
    return parser.token, parser.action


@dataclass(eq=False)
class User:
    """A logged-in user: credentials, its own HTTP session and cookie jar.

    The login runs in the user's own session, whose jar stores the cookies. The
    load sends them from `load_headers`, through a shared session without a jar,
    because filtering a jar per request cost the client about a tenth of its rate.
    """

    credentials: Credentials
    http: aiohttp.ClientSession
    busy: bool = False
    load_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)

    @property
    def name(self) -> str:
        return self.credentials.username

    def copy_cookies(self, site_url: URL) -> None:
        """Build the Cookie header of load requests from the jar.

        It contains the cookies that the jar sends to base_url + "/". Moodle's
        session manager sets its cookies for that path, because an unset
        $CFG->sessioncookiepath becomes the path of wwwroot plus "/", so a site
        in a subfolder such as /moodle works.
        NOTE: a cookie set only for a deeper path, such as /moodle/course/, is
        not sent during the load.
        """
        cookies = self.http.cookie_jar.filter_cookies(site_url)
        text = "; ".join(f"{name}={morsel.coded_value}"
                         for name, morsel in cookies.items())
        headers: CIMultiDict[str] = CIMultiDict()
        if text:
            headers[hdrs.COOKIE] = text
        self.load_headers = headers


class Site:
    """The target site: its URLs and the login decision."""

    def __init__(self, config: LoadConfig, login_timeout_s: float) -> None:
        self.base_url = config.base_url
        base_path = urlsplit(config.base_url).path.rstrip("/")
        self.login_url = config.base_url + config.login_path
        self.login_path = base_path + config.login_path
        self.change_password_path = base_path + CHANGE_PASSWORD_PATH
        self.login_timeout_s = login_timeout_s
        self.host_warned = False

    def is_login_redirect(self, location_path: str) -> bool:
        """Tell whether a redirect means the session is gone or unusable."""
        return location_path in (self.login_path, self.change_password_path)

    async def login(self, user: User) -> None:
        """Log one user in; raise LoginFailed with the reason."""
        try:
            async with asyncio.timeout(self.login_timeout_s):
                await self._login_steps(user)
        except TimeoutError:
            raise LoginFailed(
                "timeout", f"timed out after {self.login_timeout_s:g} s"
            ) from None
        except aiohttp.ClientConnectorError as err:
            raise LoginFailed("connection_error",
                              connect_error_text(err, self.base_url)) from None
        except aiohttp.ClientError as err:
            raise LoginFailed("connection_error", f"connection error: {err}") from None

    async def _login_steps(self, user: User) -> None:
        http = user.http
        async with http.get(self.login_url, max_redirects=MAX_LOGIN_REDIRECTS) as resp:
            page = await resp.text(errors="replace")
            page_url = str(resp.url)
            status = resp.status
        if status != 200:
            raise LoginFailed("http_status", f"HTTP {status} from GET {self.login_url}")
        self._warn_on_other_host(page_url)
        token, action = parse_login_form(page)
        if token is None:
            log.warning("No logintoken for %s", user.name)
        form = {"anchor": ""}
        if token is not None:
            form["logintoken"] = token
        form["username"] = user.credentials.username
        form["password"] = user.credentials.password
        post_url = urljoin(page_url, action) if action else page_url
        async with http.post(post_url, data=form, allow_redirects=False) as resp:
            await resp.read()
            status, location = resp.status, resp.headers.get("Location")
        if status == 200:
            raise LoginFailed("locked_or_unconfirmed")
        await self._follow_login_chain(user, post_url, status, location)

    async def _follow_login_chain(
        self, user: User, url: str, status: int, location: str | None
    ) -> None:
        """Follow the redirects after the login POST and decide the outcome.

        The decision reads only status codes and Location paths, never page text,
        because the text depends on the site's language.
        """
        for _hop in range(MAX_LOGIN_REDIRECTS):
            if status not in REDIRECT_STATUSES or not location:
                if status == 200:
                    # Moodle shows the "cookies not enabled" page at testsession
                    # when the session cookie did not come back.
                    raise LoginFailed("no_session_cookie")
                raise LoginFailed("http_status", f"HTTP {status} from {url}")
            url = urljoin(url, location)
            parts = urlsplit(url)
            if parts.path == self.change_password_path:
                raise LoginFailed("password_change_required")
            if parts.path != self.login_path:
                break
            if "testsession=" not in parts.query:
                raise LoginFailed("invalid_login")
            async with user.http.get(url, allow_redirects=False) as resp:
                await resp.read()
                status, location = resp.status, resp.headers.get("Location")
        else:
            raise LoginFailed("http_status", f"more than {MAX_LOGIN_REDIRECTS}"
                              f" redirects after the login, the last to {url}")
        self._require_session_cookie(user)

    def _require_session_cookie(self, user: User) -> None:
        for cookie in user.http.cookie_jar:
            if cookie.key.startswith(SESSION_COOKIE_PREFIX) and cookie.value:
                return
        raise LoginFailed("no_session_cookie")

    def _warn_on_other_host(self, page_url: str) -> None:
        wanted, got = urlsplit(self.base_url), urlsplit(page_url)
        if (wanted.scheme, wanted.netloc) != (got.scheme, got.netloc):
            if not self.host_warned:
                self.host_warned = True
                log.warning(
                    "The login page redirected from %s to %s://%s: set base_url to"
                    " the site's wwwroot, or every page will be a redirect",
                    self.base_url, got.scheme, got.netloc,
                )


def connect_error_text(err: aiohttp.ClientConnectorError, base_url: str) -> str:
    """Describe a failed connection in place of aiohttp's text.

    aiohttp's text names "ssl:default" even for plain http, which reads like a
    TLS problem when nothing listens at the address.
    """
    if isinstance(err, aiohttp.ClientSSLError):
        return (f"connection error: {err}; check the scheme of base_url, or use"
                " --insecure for a self-signed certificate")
    os_error = err.os_error
    if os_error.errno is not None and os_error.errno > 0:
        reason = os.strerror(os_error.errno)
    else:
        reason = os_error.strerror or str(os_error)
    return (f"connection error: cannot connect to {err.host}:{err.port} ({reason});"
            f" check that the site is running at {base_url}")


class LoginErrorLog:
    """Log failed logins, each distinct message up to LOGIN_ERRORS_PER_MESSAGE times.

    Further repeats are counted, and log_repeats() logs one line for them.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def report(self, user: User, err: LoginFailed) -> None:
        message = str(err)
        self.counts[message] += 1
        if self.counts[message] <= LOGIN_ERRORS_PER_MESSAGE:
            log.error("Login failed for %s: %s", user.name, message)

    def log_repeats(self) -> None:
        """Log one line per message that was logged only in part."""
        for message, count in self.counts.items():
            if count > LOGIN_ERRORS_PER_MESSAGE:
                repeats = count - LOGIN_ERRORS_PER_MESSAGE
                log.error("Login failed for %s with the same error, %d in all: %s",
                          plural(repeats, "more user", "more users"), count,
                          message)
        self.counts.clear()


async def login_users(
    site: Site, users: list[User], concurrency: int
) -> tuple[list[User], collections.Counter[str]]:
    """Log users in, at most `concurrency` at a time; return those logged in."""
    log.info("Logging in %s...", plural(len(users), "user"))
    limit = asyncio.Semaphore(concurrency)
    failures: collections.Counter[str] = collections.Counter()
    errors = LoginErrorLog()

    async def login_one(user: User) -> bool:
        async with limit:
            try:
                await site.login(user)
            except LoginFailed as err:
                failures[err.reason] += 1
                errors.report(user, err)
                return False
            return True

    try:
        results = await asyncio.gather(*(login_one(user) for user in users))
    finally:
        errors.log_repeats()
    logged_in = [user for user, ok in zip(users, results, strict=True) if ok]
    log.info("%d of %s logged in", len(logged_in), plural(len(users), "user"))
    return logged_in, failures


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------


class UserPool:
    """Hand out users round-robin, one request at a time per user session.

    The user of a request is the next one in config order, or the first free one
    after it, so the same seed and config give the same users as long as every
    user is free when its turn comes.
    """

    def __init__(self, users: list[User]) -> None:
        self.users = list(users)
        self.cursor = 0
        self.released = asyncio.Event()

    def take(self) -> User | None:
        count = len(self.users)
        for step in range(count):
            index = (self.cursor + step) % count
            user = self.users[index]
            if not user.busy:
                user.busy = True
                self.cursor = index + 1
                return user
        return None

    async def acquire(self) -> User | None:
        """Wait for a free user; None when no user is left."""
        while self.users:
            user = self.take()
            if user is not None:
                return user
            self.released.clear()
            await self.released.wait()
        return None

    def release(self, user: User) -> None:
        user.busy = False
        self.released.set()

    def remove(self, user: User) -> None:
        self.users.remove(user)
        self.released.set()


@dataclass
class LoadOptions:
    rpm: int
    duration_s: int
    concurrency: int
    timeout_s: float
    progress_s: int
    seed: int
    login_timeout_s: float = 20.0
    insecure: bool = False


@dataclass
class RunState:
    """Counts and times of one run that the statistics do not contain."""

    start_wall: float = 0.0
    start_mono: float = 0.0
    stop_mono: float = 0.0
    end_wall: float = 0.0
    due: int = 0
    sent: int = 0
    cancelled: int = 0
    relogins: int = 0
    relogin_failures: collections.Counter[str] = field(
        default_factory=collections.Counter
    )
    signal: int | None = None
    users_lost: bool = False


async def sleep_until(deadline: float) -> None:
    """Return at time.monotonic() deadline, within a loop iteration after it.

    It sleeps on a timer until WAKE_EARLY_S before the deadline and then yields
    with asyncio.sleep(0), which lets other tasks run, until the deadline. That
    costs about a millisecond of CPU per request when the loop is otherwise idle
    (more when uvloop's timer fires early), and none when requests are overdue.
    """
    remaining = deadline - time.monotonic()
    if remaining > WAKE_EARLY_S:
        await asyncio.sleep(remaining - WAKE_EARLY_S)
    while time.monotonic() < deadline:
        await asyncio.sleep(0)


class LoadRunner:
    """Send the scheduled requests and collect their results.

    One worker task per unit of concurrency takes the next request of the
    schedule, waits for its due time, sends it and records the result, then takes
    the next. A worker that finishes late goes straight on to the overdue request,
    with no task, semaphore or hand-off per request, because those cost the client
    a large share of its rate when it runs flat out.
    """

    def __init__(
        self, site: Site, plan: RequestPlan, pool: UserPool, options: LoadOptions,
        requests_log: IO[str] | None, http: aiohttp.ClientSession,
    ) -> None:
        self.site = site
        self.plan = plan
        self.pool = pool
        self.options = options
        self.http = http
        self.site_url = URL(site.base_url + "/")
        self.templates: dict[str, Stats] = {t.path: Stats() for t in plan.templates}
        self.state = RunState()
        self.concurrency = min(options.concurrency, len(pool.users))
        self.next_index = 0
        self.completed = 0
        self.closing = False
        self.workers: set[asyncio.Task[None]] = set()
        # Workers that wait for a due time or a user, and so have sent nothing yet.
        self.waiting: set[asyncio.Task[Any]] = set()
        self.urls: dict[str, URL] = {}
        self.stop = asyncio.Event()
        self.csv = csv.writer(requests_log) if requests_log else None
        if self.csv:
            self.csv.writerow(CSV_COLUMNS)
        self.behind_since_warning = 0
        self.last_behind_warning = -math.inf
        self.relogin_errors = LoginErrorLog()

    def request_stop(self, signum: int) -> None:
        if self.state.signal is None:
            self.state.signal = signum
            log.warning("Received %s: stopping", signal.Signals(signum).name)
        self.stop.set()

    @property
    def stats(self) -> Stats:
        """The run's overall figures, merged from the templates' figures.

        Each result is recorded in its template only, which halves the cost of
        recording; the merge runs only for the progress lines and the summary.
        """
        overall = Stats()
        for stats in self.templates.values():
            overall.merge(stats)
        return overall

    async def run(self) -> None:
        options = self.options
        self.state.due = -(-options.duration_s * options.rpm // 60)
        self.state.start_wall = time.time()
        self.state.start_mono = time.monotonic()
        end = self.state.start_mono + options.duration_s
        for user in self.pool.users:
            user.copy_cookies(self.site_url)
        for _ in range(self.concurrency):
            worker = asyncio.create_task(self._work())
            self.workers.add(worker)
            worker.add_done_callback(self.workers.discard)
        stopper = asyncio.create_task(self.stop.wait())
        progress = asyncio.create_task(self._report_progress())
        await asyncio.wait({stopper}, timeout=end - time.monotonic())
        finished = self.state.sent == self.state.due and not self.stop.is_set()
        self.close()
        # A completed schedule lasted --duration, even though its last request
        # was due one interval before the end.
        self.state.stop_mono = end if finished else min(time.monotonic(), end)
        await self._drain(stopper)
        progress.cancel()
        stopper.cancel()
        await asyncio.gather(progress, stopper, return_exceptions=True)
        self.state.end_wall = time.time()
        self.relogin_errors.log_repeats()

    def close(self) -> None:
        """Send no more requests; the requests in flight go on."""
        self.closing = True
        for worker in self.waiting:
            worker.cancel()

    async def _work(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = self.state
        interval = 60.0 / self.options.rpm
        while not self.closing and self.next_index < state.due:
            user = self.pool.take()
            if user is None:
                self.waiting.add(task)
                try:
                    user = await self.pool.acquire()
                finally:
                    self.waiting.discard(task)
                if user is None:
                    self._stop_without_users()
                    return
                if self.closing or self.next_index >= state.due:
                    self.pool.release(user)
                    return
            # Taking the index, the user and the URL in one step keeps their
            # order the schedule's order, whichever worker runs.
            index = self.next_index
            self.next_index = index + 1
            template, url = self.plan.next()
            due = state.start_mono + index * interval
            if due > time.monotonic():
                self.waiting.add(task)
                try:
                    await sleep_until(due)
                except asyncio.CancelledError:
                    self.pool.release(user)
                    raise
                finally:
                    self.waiting.discard(task)
            await self._send(due, user, template.path, url)

    def _stop_without_users(self) -> None:
        if not self.state.users_lost:
            self.state.users_lost = True
            log.error("No user is logged in any more: stopping the load")
        self.stop.set()

    def _url(self, url: str) -> URL:
        """Return the parsed URL, from a bounded cache since pages repeat."""
        parsed = self.urls.get(url)
        if parsed is None:
            if len(self.urls) >= MAX_CACHED_URLS:
                self.urls.clear()
            parsed = self.urls[url] = URL(url)
        return parsed

    async def _send(self, due: float, user: User, template: str, url: str) -> None:
        self.state.sent += 1
        status = 0
        location = body = None
        set_cookie = False
        sent = time.monotonic()
        done = sent
        try:
            async with self.http.get(self._url(url), allow_redirects=False,
                                     headers=user.load_headers) as resp:
                status = resp.status
                if 300 <= status < 400:
                    location = resp.headers.get(hdrs.LOCATION, "")
                body = await resp.read()
                done = time.monotonic()
                if hdrs.SET_COOKIE in resp.headers:
                    user.http.cookie_jar.update_cookies(resp.cookies, resp.url)
                    set_cookie = True
            outcome = ""
        except TimeoutError:
            outcome = "timeout"
        except aiohttp.ClientError:
            outcome = "connection_error"
        if body is None:
            done = time.monotonic()
        try:
            if set_cookie:
                user.copy_cookies(self.site_url)
            location_path = None
            if location is not None:
                location_path = urlsplit(urljoin(url, location)).path
            perf = None
            if body is not None:
                outcome = self._classify(status, location_path)
                perf = parse_perf_footer(body)
            result = Result(due, user.name, template, url, status, (done - due) * 1000,
                            (done - sent) * 1000, (sent - due) * 1000,
                            len(body) if body is not None else 0, outcome,
                            location_path, perf)
            self._record(result)
            if outcome == "login_required":
                await self._relogin(user)
        finally:
            self.pool.release(user)

    def _classify(self, status: int, location_path: str | None) -> str:
        """Return "success" or the failure kind of a response that arrived.

        A redirect to the login or change-password page means the session is gone,
        and Moodle would show that page instead of the one requested.
        """
        if status < 300:
            return "success"
        if status < 400:
            if location_path and self.site.is_login_redirect(location_path):
                return "login_required"
            return "success"
        return "http_4xx" if status < 500 else "http_5xx"

    def _record(self, result: Result) -> None:
        self.completed += 1
        self.templates[result.template].record(result)
        if result.lag_ms > LATE_AFTER_S * 1000:
            self._note_late(result.lag_ms)
        if self.csv is not None:
            self.csv.writerow(self._csv_row(result))

    def _csv_row(self, result: Result) -> list[Any]:
        wall = self.state.start_wall + (result.due - self.state.start_mono)
        scheduled = datetime.datetime.fromtimestamp(wall, datetime.UTC)
        # Microseconds keep the rows of fast runs in schedule order when sorted.
        row = [scheduled.isoformat(timespec="microseconds").replace("+00:00", "Z"),
               result.user, result.template, result.url, result.status or "",
               f"{result.latency_ms:.3f}", f"{result.service_ms:.3f}",
               result.nbytes, result.outcome]
        perf = result.perf or {}
        for name in SERVER_FIGURE_SCALES:
            value = perf.get(name)
            row.append("" if value is None else f"{value:g}")
        return row

    def _note_late(self, lag_ms: float) -> None:
        self.behind_since_warning += 1
        now = time.monotonic()
        if now - self.last_behind_warning >= BEHIND_WARNING_EVERY_S:
            log.warning(
                "Falling behind: a request started %.0f ms after its due time (%d"
                " late since the last warning); raise --concurrency if the site is"
                " slow, or lower --rpm if this process uses a full CPU core",
                lag_ms, self.behind_since_warning,
            )
            self.last_behind_warning = now
            self.behind_since_warning = 0

    async def _relogin(self, user: User) -> None:
        self.state.relogins += 1
        user.http.cookie_jar.clear()
        try:
            await self.site.login(user)
        except LoginFailed as err:
            self.state.relogin_failures[err.reason] += 1
            self.relogin_errors.report(user, err)
            self.pool.remove(user)
            return
        user.copy_cookies(self.site_url)

    async def _drain(self, stopper: asyncio.Task[Any]) -> None:
        """Give in-flight requests up to --timeout (2 s after a signal) to finish."""
        grace = INTERRUPT_GRACE_S if self.state.signal else self.options.timeout_s + 1
        deadline = time.monotonic() + grace
        while self.workers and time.monotonic() < deadline:
            waiters: set[asyncio.Future[Any]] = set(self.workers)
            if not self.stop.is_set():
                waiters.add(stopper)
            await asyncio.wait(waiters, timeout=deadline - time.monotonic(),
                               return_when=asyncio.FIRST_COMPLETED)
            if self.state.signal is not None:
                deadline = min(deadline, time.monotonic() + INTERRUPT_GRACE_S)
        workers = list(self.workers)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        # A worker cancelled while logging its user in again has its result recorded.
        self.state.cancelled = self.state.sent - self.completed

    def elapsed_s(self) -> float:
        end = self.state.stop_mono or time.monotonic()
        return max(end - self.state.start_mono, 0.0)

    async def _report_progress(self) -> None:
        every = self.options.progress_s
        if every <= 0:
            return
        previous_total, previous_time = 0, time.monotonic()
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            stats = self.stats
            total = stats.total
            elapsed = now - self.state.start_mono
            interval_rpm = (total - previous_total) * 60 / max(now - previous_time,
                                                                1e-9)
            previous_total, previous_time = total, now
            line = {
                "elapsed_sec": round(elapsed, 1),
                "total": total,
                "success": stats.success,
                "failures": total - stats.success,
                "req_per_min_observed": round(total * 60 / max(elapsed, 1e-9), 1),
                "req_per_min_last_interval": round(interval_rpm, 1),
            }
            for percent in PERCENTILES:
                value = stats.latency.percentile(percent)
                line[f"latency_ms_p{percent}"] = rounded(value)
            log.log(PROGRESS, "%s", json.dumps(line))


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------


def iso_utc(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def redirect_warnings(templates: dict[str, Stats]) -> list[str]:
    """Name the templates whose responses were mostly redirects."""
    warnings = []
    for path, stats in templates.items():
        if stats.total and stats.redirects / stats.total > REDIRECT_WARNING_SHARE:
            target = stats.locations.most_common(1)[0][0]
            verb = "was a redirect" if stats.total == 1 else "were redirects"
            warnings.append(
                f"{stats.redirects} of {plural(stats.total, 'response')} to {path}"
                f" {verb}, most to {target}: that page is not being measured;"
                " check that the users may see it (for /enrol/index.php, enrol them)"
            )
    return warnings


def build_summary(
    runner: LoadRunner | None, options: LoadOptions, configured_users: int,
    logged_in: int, login_failures: collections.Counter[str],
    interrupted: bool, times: tuple[float, float],
) -> dict[str, Any]:
    """Build the JSON summary; runner is None when the load phase never started."""
    stats = runner.stats if runner else Stats()
    state = runner.state if runner else RunState()
    elapsed = runner.elapsed_s() if runner else 0.0
    per_minute = 60 / elapsed if elapsed > 0 else 0.0
    # After a signal, only the requests due before the stop count as due.
    due = min(state.due, math.ceil(elapsed * options.rpm / 60))

    summary: dict[str, Any] = {
        "interrupted": interrupted,
        "start_time": iso_utc(times[0]),
        "end_time": iso_utc(times[1]),
        "elapsed_sec": round(elapsed, 3),
        "duration_sec": options.duration_s,
        "target_rpm": options.rpm,
        "req_per_min_observed": round(stats.total * per_minute, 1),
        "success_per_min": round(stats.success * per_minute, 1),
        "target_rpm_reached": due > 0 and state.sent >= RATE_REACHED_SHARE * due,
        "concurrency": options.concurrency,
        "concurrency_used": runner.concurrency if runner else 0,
        "seed": options.seed,
    }

    summary["users_configured"] = configured_users
    summary["users_logged_in"] = logged_in
    summary["login_failures"] = dict(sorted(login_failures.items()))
    summary["relogins"] = state.relogins
    summary["relogin_failures"] = dict(sorted(state.relogin_failures.items()))

    summary["requests_due"] = due
    summary["requests_sent"] = state.sent
    summary["requests_not_sent"] = max(due - state.sent, 0)
    summary["requests_cancelled"] = state.cancelled
    summary.update(stats.summary())
    summary["perf_footer_found"] = stats.server.with_footer > 0
    summary["percentile_method"] = (
        "nearest rank over a log-linear histogram, within 0.05 % of a recorded value"
    )

    templates = runner.templates if runner else {}
    summary["templates"] = {path: s.summary() for path, s in templates.items()}
    summary["warnings"] = redirect_warnings(templates)
    return summary


def rate_shortfall_warning(
    sent: int, due: int, rpm: int, concurrency: int, service_ms: float | None
) -> str:
    """Explain why fewer requests were sent than were due, and what to change.

    By Little's law the rate needs rpm / 60 * service time requests in flight.
    When that exceeds the concurrency, the concurrency was the limit. Otherwise
    the process could not send faster, most likely because of its CPU. This is
    an estimate: a saturated CPU also lengthens the measured service time, so
    the concurrency message names the CPU fixes too.
    """
    share = 100 * sent / due if due else 0.0
    head = (f"Sent {sent} of {plural(due, 'request')} due ({share:.0f} %), so the"
            f" target of {rpm} per minute was not reached")
    if service_ms is None:
        return (f"{head}: no response arrived, so the requests in flight held"
                " every unit of concurrency; check the site at base_url, or raise"
                " --concurrency")
    needed = rpm / 60 * service_ms / 1000
    if needed > concurrency:
        return (f"{head}: at a mean service time of {service_ms:.1f} ms the rate"
                f" needs about {math.ceil(needed)} requests in flight, and the"
                f" concurrency was {concurrency}; raise --concurrency (and give the"
                " config more users if they cap it), lower --rpm, or run several"
                " processes with a share of the rate each")
    return (f"{head}: a concurrency of {concurrency} was enough at a mean service"
            f" time of {service_ms:.1f} ms, so this process could not send faster,"
            " most likely because it used a full CPU core; lower --rpm, or run"
            " several processes with a share of the rate each")


def log_end_warnings(summary: dict[str, Any], runner: LoadRunner | None) -> None:
    """Log what the summary shows went wrong: redirects, rate, missing footer."""
    for warning in summary["warnings"]:
        log.warning("%s", warning)
    if runner is None:
        return
    stats = runner.stats
    due = summary["requests_due"]
    if due and not summary["target_rpm_reached"] and not runner.state.users_lost:
        log.warning("%s", rate_shortfall_warning(
            summary["requests_sent"], due, summary["target_rpm"],
            runner.concurrency, stats.service.mean(),
        ))
    pages = stats.server.pages_without_footer
    if pages and not summary["perf_footer_found"]:
        log.info("%s with a 2xx status carried no Moodle performance footer, so"
                 " there are no server figures; turn it on with perfdebug and"
                 " MDL_PERFTOFOOT", plural(pages, "page"))


def write_all(stream: IO[str], text: str) -> None:
    """Write text to stream, through its file descriptor in a loop when it has one.

    NOTE: after a run on uvloop, sys.stdout.write() of a summary larger than the
    pipe lost its tail in about 3 of 20 runs. The reader got a multiple of 64 KiB,
    and the call reported no error. os.write() in a loop lost nothing in 80 runs.
    The cause inside the event loop's shutdown was not found.
    """
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        # A stream without a file descriptor, as pytest's capture provides.
        stream.write(text)
        stream.flush()
        return

    stream.flush()
    data = memoryview(text.encode(stream.encoding or "utf-8"))
    while data:
        data = data[os.write(fd, data):]


def write_stdout(text: str, output: Path | None) -> bool:
    """Print the summary, or log one error line and return False when that fails.

    After a failed write, stdout is pointed at /dev/null, because Python flushes
    stdout again at exit and would raise the same error there.
    """
    try:
        write_all(sys.stdout, text)
    except OSError as err:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass  # a stdout without a file descriptor, as in tests
        where = (f"it is in --output {output}" if output is not None
                 else "run again with --output PATH to keep it in a file")
        log.error("Failed to write the summary to stdout (%s); %s",
                  err.strerror or err, where)
        return False
    return True


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def same_file(first: Path, second: Path) -> bool:
    """Tell whether two paths name one regular file, existing or not yet.

    Devices such as /dev/null may be given twice, since writing to them twice
    loses nothing.
    """
    try:
        if not os.path.samefile(first, second):
            return False
        return stat.S_ISREG(os.stat(first).st_mode)
    except OSError:
        return first.resolve() == second.resolve()


def check_output_paths(args: argparse.Namespace) -> None:
    """Reject output paths that would overwrite the config or each other."""
    errors = []
    for option, path in (("--output", args.output),
                         ("--requests-log", args.requests_log)):
        if path is not None and same_file(path, args.config):
            errors.append(f"error: {option} is the config file, {option} {path},"
                          f" choose another path for {option}")
    if (args.output is not None and args.requests_log is not None
            and same_file(args.output, args.requests_log)):
        errors.append(f"error: --output and --requests-log are the same file,"
                      f" --output {args.output}, choose two different paths")
    if errors:
        raise ConfigError(errors)


@dataclass
class Outputs:
    """The output files, opened before any network traffic.

    The --output file is opened without truncating it, so that a run that ends
    without a summary leaves an earlier summary there intact.
    """

    summary_path: Path | None = None
    summary: IO[str] | None = None
    summary_created: bool = False  # the run created the --output file
    requests_log_path: Path | None = None
    requests_log: IO[str] | None = None

    def write_summary(self, text: str) -> bool:
        """Replace the --output file's content, or log the error and return False."""
        if self.summary is None:
            return True
        file, self.summary = self.summary, None
        try:
            regular = stat.S_ISREG(os.fstat(file.fileno()).st_mode)
            if regular:
                file.seek(0)
            file.write(text)
            if regular:
                file.truncate()  # flushes, then drops the rest of a longer old file
            file.flush()
        except OSError as err:
            log.error("Failed to write --output %s (%s); the summary is on stdout"
                      " only", self.summary_path, err.strerror or err)
            self._close(file, remove=self.summary_created)
            return False
        self._close(file, remove=False)
        return True

    def close_requests_log(self) -> bool:
        """Close --requests-log, or log the error and return False."""
        if self.requests_log is None:
            return True
        file, self.requests_log = self.requests_log, None
        try:
            file.close()
        except OSError as err:
            log.error("Failed to write --requests-log %s (%s); its last rows are"
                      " missing", self.requests_log_path, err.strerror or err)
            return False
        return True

    def discard(self) -> None:
        """Close the files, and delete the --output file if this run created it.

        main() calls this when the run ended without a summary.
        """
        if self.summary is not None:
            self._close(self.summary, remove=self.summary_created)
            self.summary = None
        self.close_requests_log()

    def _close(self, file: IO[str], remove: bool) -> None:
        with contextlib.suppress(OSError):
            file.close()
        if remove and self.summary_path is not None:
            with contextlib.suppress(OSError):
                self.summary_path.unlink()


def open_outputs(args: argparse.Namespace) -> Outputs:
    """Open --output and --requests-log, so that a bad path fails before the load."""
    outputs = Outputs(summary_path=args.output, requests_log_path=args.requests_log)
    if args.output is not None:
        if not args.output.parent.is_dir():
            raise ConfigError([f"error: folder does not exist, --output"
                               f" {args.output}, create the folder or choose"
                               " another path"])
        existed = os.path.lexists(args.output)
        try:
            descriptor = os.open(args.output, os.O_WRONLY | os.O_CREAT, 0o666)
        except OSError as err:
            raise ConfigError([f"error: cannot write the summary file"
                               f" ({err.strerror}), --output {args.output}, choose"
                               " a writable file path"]) from None
        outputs.summary = os.fdopen(descriptor, "w", encoding="utf-8")
        outputs.summary_created = not existed
    if args.requests_log is None:
        return outputs
    try:
        outputs.requests_log = args.requests_log.open("w", newline="",
                                                      encoding="utf-8")
    except OSError as err:
        outputs.discard()
        raise ConfigError([f"error: cannot write the requests log ({err.strerror}),"
                           f" --requests-log {args.requests_log}, choose a writable"
                           " path"]) from None
    return outputs


def make_users(
    config: LoadConfig, connector: aiohttp.BaseConnector, timeout_s: float
) -> list[User]:
    """Give each user its own session and cookie jar over one shared connector."""
    users = []
    for credentials in config.users:
        # unsafe=True keeps cookies of IP-address hosts such as 127.0.0.1.
        http = aiohttp.ClientSession(
            connector=connector, connector_owner=False,
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            headers={"User-Agent": USER_AGENT},
        )
        users.append(User(credentials, http))
    return users


class SignalGuard:
    """Keep repeated SIGINT and SIGTERM from cutting the end of a run short.

    During the login and the load, run() handles the stop signals on the event
    loop. When it stops the load, hold() blocks them, so that a second Ctrl-C (the
    terminal signals the process group and a wrapper forwards one more) cannot
    raise KeyboardInterrupt, interrupt the write of the summary or end the
    process. release() discards what arrived meanwhile and restores the handlers
    and the signal mask found before.
    """

    def __init__(self) -> None:
        self.previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        self.mask: set[int] | None = None

    def hold(self, loop: asyncio.AbstractEventLoop) -> None:
        """Block the stop signals and take them away from the event loop.

        Blocking, not only SIG_IGN, is what holds. On uvloop a second SIGINT once
        ended the process by the default action in the middle of the summary,
        although Python's signal module reported SIG_IGN, so the loop's shutdown
        changes the disposition behind it.
        """
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)

    def release(self) -> None:
        """Discard stop signals that arrived while held, then restore the handlers."""
        if self.mask is not None:
            # Setting SIG_IGN discards a pending signal, so unblocking delivers none.
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
            self.mask = None
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


async def run(
    config: LoadConfig, options: LoadOptions, requests_log: IO[str] | None = None,
    guard: SignalGuard | None = None,
) -> tuple[dict[str, Any], int]:
    """Log in, run the load and return (summary, exit code).

    With a guard, SIGINT and SIGTERM stay ignored after the load until the
    caller releases the guard. Without one, run() removes their handlers.
    """
    loop = asyncio.get_running_loop()
    stop_signal: list[int] = []
    runner: LoadRunner | None = None
    main_task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        if runner is not None:
            runner.request_stop(signum)
        elif not stop_signal and main_task is not None:
            stop_signal.append(signum)
            main_task.cancel()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    started = time.time()
    site = Site(config, options.login_timeout_s)
    connector = aiohttp.TCPConnector(
        limit=options.concurrency, limit_per_host=0,
        ssl=False if options.insecure else True,
    )
    users = make_users(config, connector, options.timeout_s)
    # The load's requests carry each user's cookies themselves, see User.
    load_http = aiohttp.ClientSession(
        connector=connector, connector_owner=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=options.timeout_s),
        headers={"User-Agent": USER_AGENT},
    )
    logged_in: list[User] = []
    failures: collections.Counter[str] = collections.Counter()
    try:
        logged_in, failures = await login_users(site, users, options.concurrency)
        if logged_in:
            runner = start_runner(site, config, options, logged_in, requests_log,
                                  load_http)
            await runner.run()
    except asyncio.CancelledError:
        if not stop_signal:
            raise
        log.warning("Received %s during the login: stopping",
                    signal.Signals(stop_signal[0]).name)
    finally:
        if guard is not None:
            guard.hold(loop)
        else:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)
        await asyncio.gather(load_http.close(),
                             *(user.http.close() for user in users))
        await connector.close()
    signum = runner.state.signal if runner is not None else None
    if stop_signal:
        signum = stop_signal[0]
    times = (started, time.time())
    if runner is not None:
        times = (runner.state.start_wall, runner.state.end_wall)
    summary = build_summary(runner, options, len(users), len(logged_in), failures,
                            signum is not None, times)
    log_end_warnings(summary, runner)
    return summary, exit_code(signum, logged_in, runner)


def start_runner(
    site: Site, config: LoadConfig, options: LoadOptions, users: list[User],
    requests_log: IO[str] | None, http: aiohttp.ClientSession,
) -> LoadRunner:
    pool = UserPool(users)
    runner = LoadRunner(site, RequestPlan(config, options.seed), pool, options,
                        requests_log, http)
    if len(users) < options.concurrency:
        verb, pronoun = ("is", "it caps") if len(users) == 1 else ("are", "they cap")
        log.warning(
            "Only %s %s logged in: %s the concurrency at %d instead of %d, because"
            " each user has one request in flight at a time",
            plural(len(users), "user"), verb, pronoun, len(users),
            options.concurrency,
        )
    log.info("Load: %s per minute for %d s, concurrency %d, seed %d",
             plural(options.rpm, "request"), options.duration_s,
             runner.concurrency, options.seed)
    return runner


def exit_code(
    signum: int | None, logged_in: list[User], runner: LoadRunner | None
) -> int:
    if signum == signal.SIGINT:
        return EXIT_SIGINT
    if signum == signal.SIGTERM:
        return EXIT_SIGTERM
    if not logged_in:
        log.error("No user could log in: check the usernames, passwords and"
                  " base_url in the config, and the [ERROR] lines above")
        return EXIT_NO_LOGIN
    if runner is not None and runner.state.users_lost:
        return EXIT_NO_LOGIN
    return EXIT_OK


def configure_logging() -> None:
    """Print log lines as "[LEVEL] message" on stderr, once per process."""
    logging.addLevelName(PROGRESS, "PROGRESS")
    logging.addLevelName(logging.WARNING, "WARN")
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def int_at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Log Moodle users in and request pages at a fixed rate; print a"
        " JSON summary of latency, outcomes and Moodle's server figures on stdout.",
    )

    load = parser.add_argument_group("load")
    load.add_argument("--config", type=Path, required=True, metavar="PATH",
                      help="JSON config with base_url, users, parameters and urls")
    load.add_argument("--rpm", type=int_at_least(1), required=True, metavar="N",
                      help="target rate in requests per minute, e.g. 1200")
    load.add_argument("--duration", type=int_at_least(1), required=True,
                      metavar="SECONDS", help="length of the load phase in seconds")
    load.add_argument("--concurrency", type=int_at_least(1), default=20,
                      metavar="N", help="maximum number of requests in flight at"
                      " once, and of logins at once (default 20)")
    load.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="N",
                      help="seed of the URL and parameter choices; the same seed and"
                      f" config request the same URLs (default {DEFAULT_SEED})")

    http = parser.add_argument_group("HTTP")
    http.add_argument("--timeout", type=positive_float, default=30.0,
                      metavar="SECONDS", help="limit per request, body included;"
                      " after --duration, in-flight requests get this long"
                      " (default 30)")
    http.add_argument("--login-timeout", type=positive_float, default=20.0,
                      metavar="SECONDS", help="limit for the whole login of one user"
                      " (default 20)")
    http.add_argument("--insecure", action="store_true",
                      help="do not verify TLS certificates (self-signed test sites)")

    output = parser.add_argument_group("output")
    output.add_argument("--progress", type=int_at_least(0), default=30,
                        metavar="SECONDS", help="print a [PROGRESS] line on stderr"
                        " this often; 0 turns it off (default 30)")
    output.add_argument("--output", type=Path, metavar="PATH",
                        help="also write the JSON summary to this file")
    output.add_argument("--requests-log", type=Path, metavar="PATH",
                        help="write one CSV row per request to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        config = load_config(args.config)
        check_output_paths(args)
        outputs = open_outputs(args)
    except ConfigError as err:
        for line in err.lines:
            print(line, file=sys.stderr)
        return EXIT_USAGE

    options = LoadOptions(args.rpm, args.duration, args.concurrency, args.timeout,
                          args.progress, args.seed, args.login_timeout, args.insecure)
    loop_factory = uvloop.new_event_loop if uvloop is not None else None
    guard = SignalGuard()
    try:
        try:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                summary, code = runner.run(
                    run(config, options, outputs.requests_log, guard)
                )
        except KeyboardInterrupt:
            # Ctrl-C before the signal handlers were installed: nothing ran yet.
            outputs.discard()
            log.warning("Interrupted before the login started")
            return EXIT_SIGINT
        written = outputs.close_requests_log()
        text = json.dumps(summary, indent=2) + "\n"
        written = outputs.write_summary(text) and written
        written = write_stdout(text, args.output) and written
    finally:
        guard.release()
    if not written and code == EXIT_OK:
        return EXIT_OUTPUT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
