"""Tests of moodle_load.py against the in-process Moodle-like site on port 0."""

from __future__ import annotations

import argparse
import asyncio
import copy
import csv
import io
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import moodle_load
from tests.moodle_site import MoodleSite, SiteUser, default_users

SCRIPT = Path(__file__).resolve().parent.parent / "moodle_load.py"

BASE_CONFIG: dict[str, Any] = {
    "base_url": "http://127.0.0.1:8080",
    "login_path": "/login/index.php",
    "users": [
        {"username": "tool_generator_000001", "password": "moodle"},
        {"username": "tool_generator_000002", "password": "moodle"},
    ],
    "parameters": {
        "courseid": {"min": 10, "max": 13},
        "userid": {"min": 3, "max": 102},
    },
    "urls": [
        {"path": "/my/"},
        {"path": "/course/view.php?id={courseid}", "weight": 2},
        {"path": "/user/profile.php?id={userid}"},
    ],
}


@pytest.fixture(autouse=True)
def reset_logger() -> Iterator[None]:
    """Drop the stderr handler that main() adds, since capsys closes that stream."""
    yield
    logger = logging.getLogger("moodle_load")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


def config_dict(base_url: str, **changes: Any) -> dict[str, Any]:
    config = copy.deepcopy(BASE_CONFIG)
    config["base_url"] = base_url
    config.update(changes)
    return config


def generated_users(count: int, password: str = "moodle") -> list[dict[str, str]]:
    return [
        {"username": f"tool_generator_{number:06d}", "password": password}
        for number in range(1, count + 1)
    ]


def load_options(**changes: Any) -> moodle_load.LoadOptions:
    values: dict[str, Any] = {
        "rpm": 1200, "duration_s": 1, "concurrency": 5, "timeout_s": 5.0,
        "progress_s": 0, "seed": 1, "login_timeout_s": 5.0,
    }
    values.update(changes)
    return moodle_load.LoadOptions(**values)


async def run_load(
    config: dict[str, Any], **changes: Any
) -> tuple[dict[str, Any], int, list[dict[str, str]]]:
    """Run the generator in this event loop; return summary, exit code, CSV rows."""
    log_file = io.StringIO()
    parsed = moodle_load.parse_config(config)
    summary, code = await moodle_load.run(parsed, load_options(**changes), log_file)
    rows = list(csv.DictReader(io.StringIO(log_file.getvalue())))
    return summary, code, rows


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {key: count for key, count in counts.items() if count}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------
# Histogram and percentiles
# ---------------------------------------------------------------------------


def test_histogram_no_samples() -> None:
    histogram = moodle_load.Histogram()
    assert histogram.percentile(50) is None
    assert histogram.percentile(99) is None
    assert histogram.mean() is None


def test_histogram_one_sample() -> None:
    histogram = moodle_load.Histogram()
    histogram.record(123.456)
    for percent in (1, 50, 95, 99, 100):
        assert histogram.percentile(percent) == 123.456


def test_histogram_two_samples() -> None:
    histogram = moodle_load.Histogram()
    histogram.record(900.5)
    histogram.record(10.25)
    # Nearest rank: p50 is rank ceil(0.5 * 2) = 1, p95 and p99 are rank 2.
    assert histogram.percentile(50) == 10.25
    assert histogram.percentile(95) == 900.5
    assert histogram.percentile(99) == 900.5


def test_histogram_twenty_samples() -> None:
    histogram = moodle_load.Histogram()
    values = [10.0 * number for number in range(1, 21)]  # 10 ms ... 200 ms
    for value in reversed(values):
        histogram.record(value)
    # p50 is rank 10 (100 ms), p95 rank 19 (190 ms), p99 rank 20 (200 ms).
    assert histogram.percentile(50) == pytest.approx(100.0, rel=0.0005)
    assert histogram.percentile(95) == pytest.approx(190.0, rel=0.0005)
    assert histogram.percentile(99) == 200.0
    assert histogram.percentile(5) == 10.0
    assert histogram.mean() == pytest.approx(105.0)


def test_histogram_small_values_exact() -> None:
    histogram = moodle_load.Histogram(scale=1)
    for value in [35, 35, 36, 36, 36, 40]:
        histogram.record(value)
    assert histogram.percentile(50) == 36
    assert histogram.percentile(34) == 36
    assert histogram.percentile(33) == 35


def test_histogram_memory_bounded() -> None:
    histogram = moodle_load.Histogram()

    def record_range() -> None:
        value = 0.001  # 1 microsecond to 30 s, in milliseconds
        while value < 30_000:
            histogram.record(value)
            value *= 1.0002

    record_range()
    buckets_after_one = len(histogram.buckets)
    record_range()
    record_range()
    assert histogram.count > 200_000
    assert len(histogram.buckets) == buckets_after_one
    assert buckets_after_one < 20_000


def test_histogram_relative_precision() -> None:
    for value in (0.3, 1.5, 17.77, 250.0, 1234.5, 29_999.0):
        histogram = moodle_load.Histogram()
        for _ in range(10):
            histogram.record(value * 0.5)
            histogram.record(value)
            histogram.record(value * 2)
        assert histogram.percentile(50) == pytest.approx(value, rel=0.0005)


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def test_config_valid() -> None:
    config = moodle_load.parse_config(config_dict("http://127.0.0.1:8080/"))
    assert config.base_url == "http://127.0.0.1:8080"
    assert config.login_path == "/login/index.php"
    assert config.parameters == {"courseid": (10, 13), "userid": (3, 102)}
    assert config.urls[1].fields == ("courseid",)
    assert config.urls[0].weight == 1.0


def test_config_login_path_default() -> None:
    data = config_dict("http://127.0.0.1:8080")
    del data["login_path"]
    del data["parameters"]
    data["urls"] = [{"path": "/my/"}]
    assert moodle_load.parse_config(data).login_path == "/login/index.php"


def without(key: str) -> Any:
    def change(data: dict[str, Any]) -> None:
        del data[key]

    return change


def setting(path: tuple[Any, ...], value: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        target = data
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return change


CONFIG_ERRORS = [
    (without("base_url"), 'error: missing key, "base_url"'),
    (setting(("base_url",), "ftp://127.0.0.1"), "base_url is not an http or https"),
    (setting(("base_url",), "127.0.0.1:8080"), "base_url is not an http or https"),
    (setting(("base_url",), 8080), "base_url is not an http or https"),
    (setting(("base_url",), "http://127.0.0.1/?x=1"), "base_url has a query"),
    (setting(("login_path",), "login/index.php"), "login_path must be a path"),
    (without("users"), 'error: missing key, "users"'),
    (setting(("users",), []), "users must be a non-empty list"),
    (setting(("users", 0), "admin"), "error: user is not an object, users[0]"),
    (setting(("users", 0), {"password": "x"}), "missing key, users[0].username"),
    (setting(("users", 0), {"username": 1, "password": "x"}),
     "username must be a string, users[0].username = 1, write it in quotes"),
    (setting(("users", 0), {"username": "", "password": "x"}),
     'empty username, users[0].username = ""'),
    (setting(("users", 0), {"username": "a", "password": ""}),
     "empty password, users[0].password"),
    (setting(("users", 0), {"username": "a", "password": 1234}),
     "password must be a string, users[0].password is a JSON number"),
    (setting(("users", 0), {"username": "a", "pasword": "x"}),
     'unknown key, users[0].pasword, rename it to "password"'),
    (setting(("users", 1), {"username": "tool_generator_000001", "password": "x"}),
     "duplicate username, users[1].username"),
    (setting(("users", 0), {"username": "a"}), "missing key, users[0].password"),
    (setting(("login_pth",), "/login/index.php"),
     'unknown key, "login_pth", rename it to "login_path"'),
    (setting(("comment",), "staging site"),
     'unknown key, "comment", remove it (known keys: base_url, login_path, users,'
     " parameters, urls)"),
    (setting(("parameters",), []), "parameters must be an object"),
    (setting(("parameters", "courseid"), 5), "parameter is not an object"),
    (setting(("parameters", "courseid"), {"max": 5}),
     "missing key, parameters.courseid.min"),
    (setting(("parameters", "courseid"), {"min": 1, "max": 5, "mx": 6}),
     'unknown key, parameters.courseid.mx, rename it to "max"'),
    (setting(("parameters", "courseid", "min"), "10"),
     'not an integer, parameters.courseid.min = "10"'),
    (setting(("parameters", "courseid", "max"), 12.5),
     "not an integer, parameters.courseid.max = 12.5"),
    (setting(("parameters", "courseid", "max"), True),
     "not an integer, parameters.courseid.max = true"),
    (setting(("parameters", "courseid"), {"min": 13, "max": 10}),
     "min is greater than max, parameters.courseid (min 13, max 10)"),
    (without("urls"), 'error: missing key, "urls"'),
    (setting(("urls",), []), "urls must be a non-empty list"),
    (setting(("urls", 0), "/my/"), "url is not an object, urls[0]"),
    (setting(("urls", 0), {"path": "my/"}), "path must start with /, urls[0].path"),
    (setting(("urls", 0), {"weight": 1}), "missing key, urls[0].path"),
    (setting(("urls", 0), {"path": None}), "path must start with /, urls[0].path"),
    (setting(("urls", 0), {"path": "/my/", "wieght": 2}),
     'unknown key, urls[0].wieght, rename it to "weight"'),
    (setting(("urls", 0), {"path": "/my/", "weight": 0}), "weight must be a number"),
    (setting(("urls", 0), {"path": "/my/", "weight": "2"}), "weight must be a number"),
    (setting(("urls", 0), {"path": "/x?id={cmid}"}),
     "placeholder has no parameter, urls[0].path {cmid}"),
    (setting(("urls", 0), {"path": "/x?id={courseid"}), "invalid placeholder"),
    (setting(("urls", 0), {"path": "/x?id={courseid!r}"}), "invalid placeholder"),
]


@pytest.mark.parametrize(("change", "expected"), CONFIG_ERRORS)
def test_config_error_names_key(change: Any, expected: str) -> None:
    data = config_dict("http://127.0.0.1:8080")
    change(data)
    with pytest.raises(moodle_load.ConfigError) as caught:
        moodle_load.parse_config(data)
    lines = caught.value.lines
    assert any(expected in line for line in lines), lines
    assert all(line.startswith("error: ") for line in lines)
    assert all("\n" not in line for line in lines)


def test_config_password_never_shown() -> None:
    data = config_dict("http://127.0.0.1:8080")
    data["users"][0]["password"] = 98765
    with pytest.raises(moodle_load.ConfigError) as caught:
        moodle_load.parse_config(data)
    assert len(caught.value.lines) == 1
    assert "98765" not in caught.value.lines[0]


def test_config_lists_every_problem() -> None:
    data = config_dict("gopher://x", users=[], urls=[{"path": "/a?{nope}"}])
    with pytest.raises(moodle_load.ConfigError) as caught:
        moodle_load.parse_config(data)
    assert len(caught.value.lines) == 3


def test_config_not_an_object() -> None:
    with pytest.raises(moodle_load.ConfigError) as caught:
        moodle_load.parse_config([1, 2])
    assert caught.value.lines[0].startswith("error: config is a JSON list")


def test_config_json_syntax_error_position(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "base_url": "http://127.0.0.1",\n  "users": [,]\n}\n')
    with pytest.raises(moodle_load.ConfigError) as caught:
        moodle_load.load_config(path)
    line = caught.value.lines[0]
    assert f"{path} line 3 column 13" in line
    assert line.startswith("error: invalid JSON")


def test_config_byte_order_mark_accepted(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    text = json.dumps(config_dict("http://127.0.0.1:8080"))
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert moodle_load.load_config(path).base_url == "http://127.0.0.1:8080"


def test_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"base_url": "http://caf\xe9"}')
    with pytest.raises(moodle_load.ConfigError) as caught:
        moodle_load.load_config(path)
    assert "config file is not UTF-8" in caught.value.lines[0]


def test_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(moodle_load.ConfigError) as caught:
        moodle_load.load_config(tmp_path / "nope.json")
    assert "cannot read the config file" in caught.value.lines[0]


def test_main_config_error_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_dict("ftp://x", users=[])))
    code = moodle_load.main(["--config", str(path), "--rpm", "60", "--duration", "1"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.splitlines()[0].startswith("error: base_url is not an http")
    assert err.splitlines()[1].startswith("error: users must be")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--rpm", "0", "--duration", "1"],
        ["--rpm", "60", "--duration", "x"],
        ["--rpm", "60", "--duration", "1", "--concurrency", "0"],
        ["--rpm", "60", "--duration", "1", "--timeout", "-1"],
        ["--duration", "1"],
    ],
)
def test_main_bad_argument_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        moodle_load.main(["--config", str(tmp_path / "c.json"), *argv])
    assert caught.value.code == 2
    assert "error:" in capsys.readouterr().err


def unreachable_config(tmp_path: Path) -> Path:
    """Write a config for a loopback port where nothing listens."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_dict(f"http://127.0.0.1:{free_port()}")))
    return path


@pytest.mark.parametrize(
    "output",
    [
        "{tmp}",  # a folder
        "{tmp}/config.json/summary.json",  # its parent is a regular file
        "/proc/summary.json",  # procfs creates no files, even for root
    ],
)
def test_main_unwritable_output_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str
) -> None:
    config = unreachable_config(tmp_path)
    path = output.format(tmp=tmp_path)
    code = moodle_load.main(["--config", str(config), "--rpm", "60", "--duration",
                             "1", "--output", path])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert f"--output {path}," in lines[0]
    assert "Login" not in err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--output", "{config}"], "error: --output is the config file"),
        (["--output", "{tmp}/./config.json"], "error: --output is the config file"),
        (["--requests-log", "{config}"], "error: --requests-log is the config file"),
        (["--output", "{tmp}/x", "--requests-log", "{tmp}/x"],
         "error: --output and --requests-log are the same file"),
    ],
)
def test_main_output_overwrites_input_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str],
    expected: str,
) -> None:
    config = unreachable_config(tmp_path)
    before = config.read_text()
    paths = [option.format(config=config, tmp=tmp_path) for option in options]
    code = moodle_load.main(["--config", str(config), "--rpm", "60", "--duration",
                             "1", *paths])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(expected), err
    assert len(err.splitlines()) == 1
    assert config.read_text() == before
    assert not (tmp_path / "x").exists()


def test_main_devices_may_repeat(tmp_path: Path) -> None:
    config = unreachable_config(tmp_path)
    args = moodle_load.build_parser().parse_args(
        ["--config", str(config), "--rpm", "60", "--duration", "1",
         "--output", os.devnull, "--requests-log", os.devnull]
    )
    moodle_load.check_output_paths(args)


def output_args(tmp_path: Path, output: Path) -> argparse.Namespace:
    return moodle_load.build_parser().parse_args(
        ["--config", str(unreachable_config(tmp_path)), "--rpm", "60",
         "--duration", "1", "--output", str(output)]
    )


def test_output_replaced_only_at_end(tmp_path: Path) -> None:
    output = tmp_path / "summary.json"
    output.write_text("an earlier summary, longer than the new one\n")
    outputs = moodle_load.open_outputs(output_args(tmp_path, output))
    assert output.read_text() == "an earlier summary, longer than the new one\n"
    assert outputs.summary_created is False
    assert outputs.write_summary("{}\n") is True
    assert output.read_text() == "{}\n"


def test_output_created_is_removed_without_summary(tmp_path: Path) -> None:
    output = tmp_path / "summary.json"
    outputs = moodle_load.open_outputs(output_args(tmp_path, output))
    assert output.exists()
    outputs.discard()
    assert not output.exists()


def test_output_kept_without_summary(tmp_path: Path) -> None:
    output = tmp_path / "summary.json"
    output.write_text("an earlier summary\n")
    outputs = moodle_load.open_outputs(output_args(tmp_path, output))
    outputs.discard()
    assert output.read_text() == "an earlier summary\n"


# ---------------------------------------------------------------------------
# Request plan
# ---------------------------------------------------------------------------


def test_plan_same_seed_same_urls() -> None:
    config = moodle_load.parse_config(config_dict("http://127.0.0.1:8080"))
    first = moodle_load.RequestPlan(config, 7)
    second = moodle_load.RequestPlan(config, 7)
    other = moodle_load.RequestPlan(config, 8)
    urls_first = [first.next()[1] for _ in range(200)]
    assert urls_first == [second.next()[1] for _ in range(200)]
    assert urls_first != [other.next()[1] for _ in range(200)]


def test_plan_weights_and_ranges() -> None:
    config = moodle_load.parse_config(config_dict("http://127.0.0.1:8080"))
    plan = moodle_load.RequestPlan(config, 1)
    counts: dict[str, int] = {}
    course_ids = set()
    for _ in range(8000):
        template, url = plan.next()
        counts[template.path] = counts.get(template.path, 0) + 1
        if template.path.startswith("/course/"):
            course_ids.add(int(url.rsplit("=", 1)[1]))
    assert counts["/course/view.php?id={courseid}"] == pytest.approx(4000, rel=0.05)
    assert counts["/my/"] == pytest.approx(2000, rel=0.08)
    assert course_ids == {10, 11, 12, 13}


# ---------------------------------------------------------------------------
# Login
# ---------------------------------------------------------------------------


LOGIN_FORMS = [
    '<form class="login-form" action="/login/index.php" method="post" id="login">'
    '<input type="hidden" name="logintoken" value="TOKEN1"></form>',
    "<form id='login' method='post'><input value='TOKEN1' type='hidden'"
    " name='logintoken'></form>",
    '<FORM ID="login"><INPUT NAME=logintoken VALUE=TOKEN1></FORM>',
    '<form id="guestlogin"><input name="logintoken" value="GUEST"></form>'
    '<form id="login"><input name="username"><input name="logintoken"'
    ' value="TOKEN1"></form>',
]


@pytest.mark.parametrize("page", LOGIN_FORMS)
def test_login_form_token_any_markup(page: str) -> None:
    token, _action = moodle_load.parse_login_form(page)
    assert token == "TOKEN1"


def test_login_form_without_token() -> None:
    page = '<form id="guestlogin"><input name="logintoken" value="G"></form>'
    assert moodle_load.parse_login_form(page) == (None, None)


async def try_login(
    base_url: str, username: str, password: str, login_path: str = "/login/index.php",
    login_timeout_s: float = 5.0,
) -> str:
    """Log one user in; return "ok" or the failure reason."""
    data = config_dict(base_url, login_path=login_path,
                       users=[{"username": username, "password": password}])
    config = moodle_load.parse_config(data)
    site = moodle_load.Site(config, login_timeout_s)
    connector = aiohttp.TCPConnector()
    [user] = moodle_load.make_users(config, connector, 5.0)
    try:
        await site.login(user)
        return "ok"
    except moodle_load.LoginFailed as err:
        return err.reason
    finally:
        await user.http.close()
        await connector.close()


@pytest.fixture
async def blocked_site() -> AsyncIterator[MoodleSite]:
    """A site whose extra users are each blocked in one way."""
    users = default_users() + [
        SiteUser(200, "suspended", "moodle", suspended=True),
        SiteUser(201, "nologin", "moodle", auth="nologin"),
        SiteUser(202, "locked", "moodle", locked=True),
        SiteUser(203, "unconfirmed", "moodle", confirmed=False),
        SiteUser(204, "mustchange", "moodle", force_password_change=True),
    ]
    site = MoodleSite(users=users)
    await site.start()
    yield site
    await site.close()


@pytest.mark.parametrize(
    ("username", "password", "expected"),
    [
        ("tool_generator_000001", "moodle", "ok"),
        ("admin", "Admin#2026pw", "ok"),
        ("tool_generator_000001", "wrong", "invalid_login"),
        ("no_such_user", "moodle", "invalid_login"),
        ("suspended", "moodle", "invalid_login"),
        ("nologin", "moodle", "invalid_login"),
        ("locked", "moodle", "locked_or_unconfirmed"),
        ("unconfirmed", "moodle", "locked_or_unconfirmed"),
        ("mustchange", "moodle", "password_change_required"),
    ],
)
async def test_login_outcome(
    blocked_site: MoodleSite, username: str, password: str, expected: str
) -> None:
    assert await try_login(blocked_site.base_url, username, password) == expected


async def test_login_http_status(moodle_site: MoodleSite) -> None:
    reason = await try_login(moodle_site.base_url, "tool_generator_000001", "moodle",
                             login_path="/no/login.php")
    assert reason == "http_status"


async def test_login_connection_error() -> None:
    base_url = f"http://127.0.0.1:{free_port()}"
    reason = await try_login(base_url, "tool_generator_000001", "moodle")
    assert reason == "connection_error"


async def test_login_timeout(aiohttp_plain_site: str) -> None:
    reason = await try_login(aiohttp_plain_site, "u", "p", login_path="/hang",
                             login_timeout_s=0.3)
    assert reason == "timeout"


async def test_login_cookie_on_ip_host(moodle_site: MoodleSite) -> None:
    config = moodle_load.parse_config(config_dict(moodle_site.base_url))
    site = moodle_load.Site(config, 5.0)
    connector = aiohttp.TCPConnector()
    users = moodle_load.make_users(config, connector, 5.0)
    try:
        await site.login(users[0])
        names = [cookie.key for cookie in users[0].http.cookie_jar]
        async with users[0].http.get(moodle_site.base_url + "/my/",
                                     allow_redirects=False) as resp:
            status = resp.status
    finally:
        await asyncio.gather(*(user.http.close() for user in users))
        await connector.close()
    assert moodle_site.base_url.startswith("http://127.0.0.1:")
    assert "MoodleSession" in names
    assert status == 200


async def test_login_without_token_warns(
    aiohttp_plain_site: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moodle_load")
    reason = await try_login(aiohttp_plain_site, "plain", "secret",
                             login_path="/notoken")
    assert reason == "ok"
    assert "No logintoken for plain" in caplog.text
    assert PLAIN_SITE_POSTS[-1] == {"anchor": "", "username": "plain",
                                    "password": "secret"}


async def test_run_nobody_logged_in(
    moodle_site: MoodleSite, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_dict(moodle_site.base_url, users=generated_users(3, "bad"))
    summary, code, rows = await run_load(config)
    assert code == 3
    assert summary["users_logged_in"] == 0
    assert summary["login_failures"] == {"invalid_login": 3}
    assert summary["total"] == 0
    assert rows == []
    assert sum(moodle_site.requests[p] for p in ("/my/", "/course/view.php")) == 0
    assert "Login failed for tool_generator_000001: invalid login" in caplog.text


async def test_run_unreachable_site_summarises_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base_url = f"http://127.0.0.1:{free_port()}"
    config = config_dict(base_url, users=generated_users(10))
    summary, code, _rows = await run_load(config)
    assert code == 3
    assert summary["login_failures"] == {"connection_error": 10}
    lines = [record.getMessage() for record in caplog.records
             if record.getMessage().startswith("Login failed for")]
    assert len(lines) == 4
    assert lines[0].startswith("Login failed for tool_generator_0000")
    assert lines[0].endswith(f"check that the site is running at {base_url}")
    assert "cannot connect to 127.0.0.1:" in lines[0]
    assert "(Connection refused)" in lines[0]
    assert lines[3].startswith(
        "Login failed for 7 more users with the same error, 10 in all: connection"
        " error: cannot connect to"
    )
    assert "ssl:default" not in caplog.text


async def test_run_one_user_singular(
    moodle_site: MoodleSite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moodle_load")
    config = config_dict(moodle_site.base_url, users=generated_users(1),
                         urls=[{"path": "/course/view.php?id=2"}])
    summary, code, _rows = await run_load(config, rpm=1, duration_s=1)
    assert code == 0
    assert summary["total"] == 1
    messages = [record.getMessage() for record in caplog.records]
    assert "Logging in 1 user..." in messages
    assert "1 of 1 user logged in" in messages
    assert any(message.startswith("Only 1 user is logged in: it caps the"
                                  " concurrency at 1 instead of 5")
               for message in messages)
    assert any(message.startswith("Load: 1 request per minute for 1 s")
               for message in messages)
    assert any(message.startswith("1 of 1 response to /course/view.php?id=2 was a"
                                  " redirect, most to /enrol/index.php")
               for message in messages)


# A plain aiohttp site for behaviours the Moodle-like site does not have.
PLAIN_SITE_POSTS: list[dict[str, str]] = []
SEEN_SESSION_COOKIES: list[str] = []


@pytest.fixture
async def aiohttp_plain_site() -> AsyncIterator[str]:
    release = asyncio.Event()

    async def login_form(request: web.Request) -> web.Response:
        response = web.Response(
            text='<form id="login" method="post"><input name="username"></form>',
            content_type="text/html",
        )
        response.set_cookie("MoodleSession", "first")
        return response

    async def login_post(request: web.Request) -> web.Response:
        PLAIN_SITE_POSTS.append(dict(await request.post()))
        response = web.Response(status=303, headers={"Location": "/my/"})
        response.set_cookie("MoodleSession", "second")
        return response

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    async def server_error(request: web.Request) -> web.Response:
        return web.Response(status=503, text="maintenance")

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"partial")
        assert request.transport is not None
        request.transport.close()
        return response

    async def rotate(request: web.Request) -> web.Response:
        SEEN_SESSION_COOKIES.append(request.cookies.get("MoodleSession", ""))
        response = web.Response(text="page")
        response.set_cookie("MoodleSession", f"rotated{len(SEEN_SESSION_COOKIES)}")
        return response

    app = web.Application()
    app.router.add_get("/rotate", rotate)
    app.router.add_get("/notoken", login_form)
    app.router.add_post("/notoken", login_post)
    app.router.add_get("/hang", hang)
    app.router.add_get("/error", server_error)
    app.router.add_get("/cut", cut)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    release.set()
    await runner.cleanup()


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------


async def test_run_rate_short(moodle_site: MoodleSite) -> None:
    summary, code, rows = await run_load(
        config_dict(moodle_site.base_url), rpm=1200, duration_s=3
    )
    assert code == 0
    assert summary["requests_due"] == 60
    assert summary["requests_sent"] == 60
    assert summary["total"] == 60
    assert summary["requests_not_sent"] == 0
    assert summary["elapsed_sec"] == 3.0
    assert summary["req_per_min_observed"] == 1200.0
    assert summary["target_rpm_reached"] is True
    assert summary["success"] == 60
    assert summary["status_counts"] == {"200": 60}
    times = [row["scheduled_time"] for row in rows]
    assert times == sorted(times)
    first = moodle_load.datetime.datetime.fromisoformat(times[0])
    last = moodle_load.datetime.datetime.fromisoformat(times[-1])
    assert (last - first).total_seconds() == pytest.approx(2.95, abs=0.002)


async def test_run_summary_keys(moodle_site: MoodleSite) -> None:
    summary, _code, rows = await run_load(config_dict(moodle_site.base_url))
    for key in ("elapsed_sec", "total", "success", "failures", "req_per_min_observed",
                "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "target_rpm",
                "target_rpm_reached", "concurrency", "seed", "users_logged_in",
                "login_failures", "failures_by_kind", "status_counts",
                "service_time_ms_p50", "service_time_ms_p95", "service_time_ms_p99",
                "latency_ms_max", "late_requests", "max_lag_ms", "templates",
                "start_time", "end_time", "interrupted"):
        assert key in summary, key
    assert set(summary["templates"]) == {
        "/my/", "/course/view.php?id={courseid}", "/user/profile.php?id={userid}"
    }
    template = summary["templates"]["/my/"]
    assert template["total"] == sum(1 for row in rows if row["url_template"] == "/my/")
    assert summary["start_time"].endswith("Z")
    assert list(rows[0]) == moodle_load.CSV_COLUMNS


async def test_run_stall_shows_in_latency_only(moodle_site: MoodleSite) -> None:
    moodle_site.stall(2.0, count=1)
    summary, code, _rows = await run_load(
        config_dict(moodle_site.base_url, urls=[{"path": "/my/"}]),
        rpm=3000, duration_s=4, concurrency=1,
    )
    assert code == 0
    assert summary["total"] == 200
    assert summary["latency_ms_p99"] > 1800
    assert summary["latency_ms_max"] > 1900
    assert summary["service_time_ms_p99"] < 500
    assert summary["service_time_ms_max"] > 1900
    assert summary["late_requests"] > 80
    assert summary["max_lag_ms"] > 1900


async def test_run_one_request_per_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    site = MoodleSite(page_delay_s=0.05)
    await site.start()
    try:
        config = config_dict(site.base_url, users=generated_users(3),
                             urls=[{"path": "/my/"}])
        summary, code, _rows = await run_load(config, rpm=6000, duration_s=1,
                                              concurrency=10)
    finally:
        await site.close()
    assert code == 0
    assert summary["concurrency_used"] == 3
    assert site.max_in_flight_per_session == 1
    assert summary["late_requests"] > 0
    assert "they cap the concurrency at 3 instead of 10" in caplog.text


async def test_run_same_seed_same_sequence(moodle_site: MoodleSite) -> None:
    config = config_dict(moodle_site.base_url, users=generated_users(4))
    _s, _c, first = await run_load(config, rpm=3000, duration_s=1, seed=42)
    _s, _c, second = await run_load(config, rpm=3000, duration_s=1, seed=42)
    _s, _c, other = await run_load(config, rpm=3000, duration_s=1, seed=43)

    def sequence(rows: list[dict[str, str]]) -> list[tuple[str, str]]:
        ordered = sorted(rows, key=lambda row: row["scheduled_time"])
        return [(row["user"], row["url"]) for row in ordered]

    assert len(first) == 50
    assert sequence(first) == sequence(second)
    assert [url for _user, url in sequence(first)] != [
        url for _user, url in sequence(other)
    ]


async def test_run_session_lost_logs_in_again(moodle_site: MoodleSite) -> None:
    async def expire_later() -> None:
        await asyncio.sleep(1.0)
        moodle_site.expire_sessions()

    expiry = asyncio.create_task(expire_later())
    summary, code, rows = await run_load(
        config_dict(moodle_site.base_url), rpm=1200, duration_s=2
    )
    await expiry
    assert code == 0
    assert nonzero(summary["failures_by_kind"]) == {"login_required": 2}
    assert summary["relogins"] == 2
    assert moodle_site.logins["tool_generator_000001"] == 2
    assert moodle_site.logins["tool_generator_000002"] == 2
    lost = [row for row in rows if row["outcome"] == "login_required"]
    assert [row["status"] for row in lost] == ["303", "303"]
    assert summary["success"] == summary["total"] - 2


async def test_run_redirect_warning(
    moodle_site: MoodleSite, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_dict(
        moodle_site.base_url,
        parameters={"courseid": {"min": 2, "max": 9}},
        urls=[{"path": "/course/view.php?id={courseid}"}, {"path": "/my/"}],
    )
    summary, _code, _rows = await run_load(config, rpm=1200, duration_s=1)
    course = summary["templates"]["/course/view.php?id={courseid}"]
    assert course["redirects"] == course["total"]
    assert course["redirect_locations"] == {"/enrol/index.php": course["total"]}
    assert course["success"] == course["total"]
    assert summary["templates"]["/my/"]["redirects"] == 0
    assert len(summary["warnings"]) == 1
    assert "/course/view.php?id={courseid} were redirects" in caplog.text
    assert "most to /enrol/index.php" in caplog.text


async def test_run_http_404_is_failure(moodle_site: MoodleSite) -> None:
    config = config_dict(
        moodle_site.base_url, urls=[{"path": "/course/view.php?id=999999"}]
    )
    summary, _code, _rows = await run_load(config, rpm=600, duration_s=1)
    assert nonzero(summary["failures_by_kind"]) == {"http_4xx": 10}
    assert summary["status_counts"] == {"404": 10}
    assert summary["success"] == 0


@pytest.mark.parametrize(
    ("path", "outcome", "status"),
    [("/error", "http_5xx", "503"), ("/cut", "connection_error", "200"),
     ("/hang", "timeout", "")],
)
async def test_run_failure_kinds(
    aiohttp_plain_site: str, path: str, outcome: str, status: str
) -> None:
    config = config_dict(aiohttp_plain_site, login_path="/notoken",
                         users=[{"username": "u", "password": "p"}],
                         urls=[{"path": path}])
    summary, _code, rows = await run_load(config, rpm=120, duration_s=1,
                                          timeout_s=0.5)
    assert nonzero(summary["failures_by_kind"]) == {outcome: 2}
    assert [row["outcome"] for row in rows] == [outcome, outcome]
    assert [row["status"] for row in rows] == [status, status]
    if outcome == "timeout":
        assert all(float(row["service_time_ms"]) >= 500 for row in rows)


async def test_run_cookie_set_during_load(aiohttp_plain_site: str) -> None:
    SEEN_SESSION_COOKIES.clear()
    config = config_dict(aiohttp_plain_site, login_path="/notoken",
                         users=[{"username": "u", "password": "p"}],
                         urls=[{"path": "/rotate"}])
    summary, _code, _rows = await run_load(config, rpm=240, duration_s=1)
    assert summary["success"] == 4
    # The login POST set "second"; each page then sets the next value.
    assert SEEN_SESSION_COOKIES == ["second", "rotated1", "rotated2", "rotated3"]


async def test_run_no_footer_hint_on_failures(
    moodle_site: MoodleSite, aiohttp_plain_site: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="moodle_load")
    not_found = config_dict(moodle_site.base_url,
                            urls=[{"path": "/course/view.php?id=999999"}])
    summary, _code, _rows = await run_load(not_found, rpm=600, duration_s=1)
    assert summary["status_counts"] == {"404": 10}
    hang = config_dict(aiohttp_plain_site, login_path="/notoken",
                       users=[{"username": "u", "password": "p"}],
                       urls=[{"path": "/hang"}])
    summary, _code, _rows = await run_load(hang, rpm=120, duration_s=1,
                                           timeout_s=0.5)
    assert summary["failures_by_kind"]["timeout"] == 2
    assert "performance footer" not in caplog.text


async def test_run_rate_not_reached_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    site = MoodleSite(page_delay_s=0.05)
    await site.start()
    try:
        config = config_dict(site.base_url, urls=[{"path": "/my/"}])
        summary, code, _rows = await run_load(config, rpm=3000, duration_s=1,
                                              concurrency=1)
    finally:
        await site.close()
    assert code == 0
    assert summary["target_rpm_reached"] is False
    sent = summary["requests_sent"]
    warnings = [record.getMessage() for record in caplog.records
                if record.getMessage().startswith("Sent ")]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"Sent {sent} of 50 requests due ({sent * 2} %), so the target of 3000 per"
        " minute was not reached: at a mean service time of"
    )
    assert "the concurrency was 1; raise --concurrency" in warnings[0]


def test_rate_shortfall_cpu_bound() -> None:
    text = moodle_load.rate_shortfall_warning(12_000, 100_000, 600_000, 20, 0.8)
    assert text.startswith("Sent 12000 of 100000 requests due (12 %), so the target"
                           " of 600000 per minute was not reached: a concurrency of"
                           " 20 was enough at a mean service time of 0.8 ms")
    assert "most likely because it used a full CPU core" in text
    assert text.endswith("lower --rpm, or run several processes with a share of"
                         " the rate each")


def test_rate_shortfall_concurrency_bound() -> None:
    text = moodle_load.rate_shortfall_warning(500, 1000, 6000, 4, 100.0)
    assert "needs about 10 requests in flight, and the concurrency was 4" in text
    assert "raise --concurrency" in text


def test_rate_shortfall_without_responses() -> None:
    text = moodle_load.rate_shortfall_warning(1, 1000, 6000, 1, None)
    assert "no response arrived" in text


@pytest.fixture
async def subfolder_site() -> AsyncIterator[tuple[str, list[str]]]:
    """A site at /moodle whose cookies have path /moodle/, as Moodle sets them.

    Moodle's session manager sets $CFG->sessioncookiepath to the path of
    wwwroot plus "/" when config.php does not set it. The second item of the
    fixture lists the MoodleSession cookies that /moodle/my/ received.
    """
    seen: list[str] = []

    def with_cookie(response: web.Response, value: str) -> web.Response:
        response.set_cookie("MoodleSession", value, path="/moodle/")
        return response

    async def login_form(request: web.Request) -> web.Response:
        page = ('<form id="login" action="/moodle/login/index.php" method="post">'
                '<input name="logintoken" value="T"></form>')
        if "testsession" in request.query:
            return web.Response(status=303, headers={"Location": "/moodle/my/"})
        return with_cookie(web.Response(text=page, content_type="text/html"),
                           "guest")

    async def login_post(request: web.Request) -> web.Response:
        form = await request.post()
        if request.cookies.get("MoodleSession") != "guest" or form["password"] != "p":
            return web.Response(status=303,
                                headers={"Location": "/moodle/login/index.php"})
        location = "/moodle/login/index.php?testsession=2"
        return with_cookie(web.Response(status=303, headers={"Location": location}),
                           "user")

    async def dashboard(request: web.Request) -> web.Response:
        seen.append(request.cookies.get("MoodleSession", ""))
        if request.cookies.get("MoodleSession") != "user":
            return web.Response(status=303,
                                headers={"Location": "/moodle/login/index.php"})
        return web.Response(text="dashboard")

    app = web.Application()
    app.router.add_get("/moodle/login/index.php", login_form)
    app.router.add_post("/moodle/login/index.php", login_post)
    app.router.add_get("/moodle/my/", dashboard)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/moodle", seen
    await runner.cleanup()


async def test_run_site_in_subfolder(
    subfolder_site: tuple[str, list[str]],
) -> None:
    base_url, seen = subfolder_site
    config = config_dict(base_url, users=[{"username": "u", "password": "p"}],
                         urls=[{"path": "/my/"}])
    summary, code, _rows = await run_load(config, rpm=240, duration_s=1)
    assert code == 0
    assert summary["users_logged_in"] == 1
    assert summary["status_counts"] == {"200": 4}
    assert seen == ["user"] * 4


async def test_run_requests_start_on_time(moodle_site: MoodleSite) -> None:
    summary, code, rows = await run_load(
        config_dict(moodle_site.base_url, urls=[{"path": "/my/"}]),
        rpm=1200, duration_s=2,
    )
    assert code == 0
    assert len(rows) == 40
    lags = sorted(float(row["latency_ms"]) - float(row["service_time_ms"])
                  for row in rows)
    # The CSV rounds each time to 0.001 ms, so a request sent on time may show
    # a lag of -0.001.
    assert lags[0] >= -0.002
    # A timer wake-up rounded to whole milliseconds would put the median near
    # 0.5 ms.
    assert lags[len(lags) // 2] < 0.25
    assert summary["late_requests"] == 0


# ---------------------------------------------------------------------------
# The script as a subprocess
# ---------------------------------------------------------------------------


async def start_script(
    tmp_path: Path, base_url: str, *args: str
) -> asyncio.subprocess.Process:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_dict(base_url)))
    return await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def wait_for_stderr_line(
    process: asyncio.subprocess.Process, prefix: bytes
) -> None:
    """Read the script's stderr until a line starts with prefix."""
    assert process.stderr is not None
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), 10)
        assert line, f"the script ended before printing {prefix!r}"
        if line.startswith(prefix):
            return


async def test_script_stdout_only_json(
    moodle_site: MoodleSite, tmp_path: Path
) -> None:
    output = tmp_path / "summary.json"
    process = await start_script(
        tmp_path, moodle_site.base_url, "--rpm", "1200", "--duration", "2",
        "--progress", "1", "--output", str(output),
    )
    out, err = await process.communicate()
    assert process.returncode == 0
    summary = json.loads(out)
    assert summary["total"] == 40
    assert json.loads(output.read_text()) == summary
    stderr_lines = err.decode().splitlines()
    assert stderr_lines[0] == "[INFO] Logging in 2 users..."
    progress = [line for line in stderr_lines if line.startswith("[PROGRESS] ")]
    assert len(progress) == 1
    assert json.loads(progress[0].split(" ", 1)[1])["total"] > 0


async def test_script_closed_stdout(moodle_site: MoodleSite, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_dict(moodle_site.base_url)))
    read_end, write_end = socket.socketpair()
    read_end.close()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--config", str(config), "--rpm", "600",
        "--duration", "1", stdout=write_end, stderr=asyncio.subprocess.PIPE,
    )
    write_end.close()
    _out, err = await process.communicate()
    assert process.returncode == 1
    assert b"Traceback" not in err
    assert b"Failed to write the summary to stdout (Broken pipe); run again with" in err


async def test_script_full_stdout(moodle_site: MoodleSite, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_dict(moodle_site.base_url)))
    output = tmp_path / "summary.json"
    with open("/dev/full", "w") as full:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), "--config", str(config), "--rpm", "600",
            "--duration", "1", "--output", str(output), stdout=full,
            stderr=asyncio.subprocess.PIPE,
        )
        _out, err = await process.communicate()
    assert process.returncode == 1
    assert b"Traceback" not in err
    assert b"Exception ignored" not in err
    errors = [line for line in err.decode().splitlines() if "[ERROR]" in line]
    assert errors == [
        "[ERROR] Failed to write the summary to stdout (No space left on device);"
        f" it is in --output {output}"
    ]
    assert json.loads(output.read_text())["total"] == 10


async def test_script_output_fails_at_end(
    moodle_site: MoodleSite, tmp_path: Path
) -> None:
    # procfs lets root open /proc/version for writing, and the write then fails.
    process = await start_script(
        tmp_path, moodle_site.base_url, "--rpm", "600", "--duration", "1",
        "--output", "/proc/version",
    )
    out, err = await process.communicate()
    assert process.returncode == 1
    assert json.loads(out)["total"] == 10
    assert b"[ERROR] Failed to write --output /proc/version (" in err
    assert b"Traceback" not in err


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
)
async def test_script_signal_prints_summary(
    moodle_site: MoodleSite, tmp_path: Path, signum: int, code: int
) -> None:
    process = await start_script(
        tmp_path, moodle_site.base_url, "--rpm", "600", "--duration", "60",
    )
    await wait_for_stderr_line(process, b"[INFO] Load:")
    await asyncio.sleep(0.5)
    process.send_signal(signum)
    out, err = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == code
    summary = json.loads(out)
    assert summary["interrupted"] is True
    assert 0 < summary["total"] < 60
    assert summary["elapsed_sec"] < 5
    assert summary["requests_due"] == pytest.approx(
        summary["elapsed_sec"] * 10, abs=1
    )
    assert summary["requests_not_sent"] <= 2
    assert summary["requests_sent"] == summary["total"] + summary["requests_cancelled"]
    assert signal.Signals(signum).name.encode() in err


async def test_script_second_sigint_keeps_summary(
    moodle_site: MoodleSite, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    # A thousand templates make the summary larger than the pipe and the reader's
    # buffer, so the script is still writing it when the second SIGINT arrives.
    urls = [{"path": f"/my/?n={number}"} for number in range(1000)]
    config.write_text(json.dumps(config_dict(moodle_site.base_url, urls=urls)))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--config", str(config), "--rpm", "600",
        "--duration", "60", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    await wait_for_stderr_line(process, b"[INFO] Load:")
    process.send_signal(signal.SIGINT)
    first = await asyncio.wait_for(process.stdout.read(1), 10)
    process.send_signal(signal.SIGINT)
    rest, err = await asyncio.wait_for(process.communicate(), 10)
    assert len(first + rest) > 300_000
    assert process.returncode == 130
    assert json.loads(first + rest)["interrupted"] is True
    assert b"Traceback" not in err
    assert b"Interrupted before" not in err
    assert err.count(b"Received SIGINT") == 1


async def test_run_guard_ignores_signal_after_load(moodle_site: MoodleSite) -> None:
    guard = moodle_load.SignalGuard()
    parsed = moodle_load.parse_config(config_dict(moodle_site.base_url))
    try:
        summary, code = await moodle_load.run(parsed, load_options(), None, guard)
        handlers = [signal.getsignal(signum) for signum in moodle_load.STOP_SIGNALS]
        # Without the guard this raises KeyboardInterrupt in the test.
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0)
    finally:
        guard.release()
    assert handlers == [signal.SIG_IGN, signal.SIG_IGN]
    assert code == 0
    assert summary["interrupted"] is False


async def test_script_signal_during_login(
    aiohttp_plain_site: str, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_dict(aiohttp_plain_site, login_path="/hang")))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--config", str(config), "--rpm", "600",
        "--duration", "60", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    line = await asyncio.wait_for(process.stderr.readline(), 10)
    assert line == b"[INFO] Logging in 2 users...\n"
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 143
    summary = json.loads(out)
    assert summary["interrupted"] is True
    assert summary["users_logged_in"] == 0
    assert summary["total"] == 0
    assert b"Received SIGTERM during the login" in err


async def test_script_signal_cancels_hung_request(
    aiohttp_plain_site: str, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_dict(
        aiohttp_plain_site, login_path="/notoken",
        users=[{"username": "u", "password": "p"}], urls=[{"path": "/hang"}],
    )))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--config", str(config), "--rpm", "60",
        "--duration", "60", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await wait_for_stderr_line(process, b"[INFO] Load:")
    await asyncio.sleep(0.3)
    process.send_signal(signal.SIGINT)
    out, _err = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 130
    summary = json.loads(out)
    assert summary["requests_sent"] == 1
    assert summary["requests_cancelled"] == 1
    assert summary["total"] == 0


async def test_script_nobody_logged_in_exit_3(
    moodle_site: MoodleSite, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(
        config_dict(moodle_site.base_url, users=generated_users(2, "bad"))
    ))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--config", str(config), "--rpm", "600",
        "--duration", "1", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 3
    assert json.loads(out)["users_logged_in"] == 0
    assert b"[ERROR] No user could log in" in err


# ---------------------------------------------------------------------------
# Moodle's performance footer
# ---------------------------------------------------------------------------

# The figure lists of a Moodle 5.1 footer as the site sends them: mixed quoting,
# a no-break space before the size units, the cache table after the lists.
RECORDED_FOOTER = (
    '<div class="performanceinfo siteinfo container-fluid px-md-0 overflow-auto'
    ' pt-3"><ul class="list-unstyled row mx-md-0"><li class="timeused col-sm-4">'
    '0.110138 secs</li> <li class="memoryused col-sm-4">RAM: 7.5\u00a0MB</li>'
    ' <li class="memoryused col-sm-4">RAM peak: 8.5\u00a0MB</li> </ul><ul'
    ' class="list-unstyled row mx-md-0"><li class="included col-sm-4">Included 618'
    " files</li> <li class='contextswithfilters col-sm-4'>Contexts for which"
    " filters were loaded: 0 </li> <li class='filterscreated col-sm-4'>Filters"
    " created: 6 </li> <li class='langcountgetstring col-sm-4'>get_string calls:"
    ' 687 </li> <li class="dbqueries col-sm-4">DB reads/writes: 35/0</li> <li'
    ' class="dbtime col-sm-4">DB queries time: 0.01605 secs</li> <li'
    ' class="posixtimes col-sm-4">ticks: 12 user: 7sys: 2 cuser: 0 csys: 0</li>'
    ' <li class="serverload col-sm-4">Load average: 0.08</li> <li'
    ' class="serverload col-sm-4"><div class="sessionsize">Session'
    " (core\\session\\file): 4.7\u00a0KB</div></li><li class=\"sessionwait"
    ' col-sm-4">Session wait: 0.012 secs</li></ul><div class="table-responsive">'
    '<table class="cachesused table table-dark table-sm w-auto table-bordered">'
    '<tr><td class="cell c1">core/config</td></tr></table></div></div>'
).encode()
RECORDED_FIGURES = {
    "time_ms": 110.138, "ram_mb": 7.5, "included_files": 618.0, "db_reads": 35.0,
    "db_writes": 0.0, "db_time_ms": 16.05, "session_wait_ms": 12.0,
}


def page_with_footer(footer: bytes, before: bytes = b"", after: bytes = b"") -> bytes:
    return (b"<html><body><div id='page'>" + before + b"</div><footer>" + footer
            + b"</footer>" + after + b"</body></html>")


def test_footer_recorded_markup() -> None:
    figures = moodle_load.parse_perf_footer(page_with_footer(RECORDED_FOOTER))
    assert figures is not None
    assert figures.keys() == RECORDED_FIGURES.keys()
    for name, value in RECORDED_FIGURES.items():
        assert figures[name] == pytest.approx(value), name


def test_footer_far_from_end() -> None:
    # Moodle 5.1 puts the message drawer and scripts, about 115 KB, after it.
    body = page_with_footer(RECORDED_FOOTER, after=b"<script>x</script>" * 6500)
    figures = moodle_load.parse_perf_footer(body)
    assert figures is not None
    assert figures["db_reads"] == 35.0


def test_footer_absent() -> None:
    assert moodle_load.parse_perf_footer(page_with_footer(b"<p>Powered by</p>")) is None
    assert moodle_load.parse_perf_footer(b"") is None


def test_footer_same_classes_earlier() -> None:
    earlier = (b'<div class="performanceinfo"><ul><li class="timeused">9.9 secs</li>'
               b'<li class="dbqueries">DB reads/writes: 999/99</li></ul></div>'
               b'<li class="sessionwait">Session wait: 5.000 secs</li>')
    figures = moodle_load.parse_perf_footer(page_with_footer(RECORDED_FOOTER,
                                                             before=earlier))
    assert figures is not None
    assert figures["db_reads"] == 35.0
    assert figures["db_writes"] == 0.0
    assert figures["time_ms"] == pytest.approx(110.138)
    assert figures["session_wait_ms"] == pytest.approx(12.0)


def test_footer_classes_earlier_but_no_footer() -> None:
    earlier = b'<li class="dbqueries">DB reads/writes: 999/99</li>'
    assert moodle_load.parse_perf_footer(page_with_footer(b"", before=earlier)) is None


def test_footer_truncated() -> None:
    page = page_with_footer(RECORDED_FOOTER)
    cut_in_db_line = page.index(b"35/0") + 2  # "DB reads/writes: 35" and no </li>
    figures = moodle_load.parse_perf_footer(page[:cut_in_db_line])
    assert figures is not None
    assert figures == pytest.approx({"time_ms": 110.138, "ram_mb": 7.5,
                                     "included_files": 618.0})
    cut_in_first_item = page.index(b"0.110138") + 3
    assert moodle_load.parse_perf_footer(page[:cut_in_first_item]) is None


def test_footer_single_quotes_and_first_item() -> None:
    footer = (b"<div class='performanceinfo'><ul>"
              b"<li class='timeused col-sm-4'>0.5 secs</li>"
              b"<li class='timeused'>9 secs</li>"
              b"<li class='dbqueries'>DB reads/writes: 12/3</li></ul></div>")
    figures = moodle_load.parse_perf_footer(page_with_footer(footer))
    assert figures == {"time_ms": 500.0, "db_reads": 12.0, "db_writes": 3.0}


def test_footer_item_with_markup_skipped() -> None:
    # Moodle prints each figure as plain text. An item with markup inside is not
    # Moodle's, so it gives no figure rather than a guessed one.
    footer = (b"<div class='performanceinfo'><ul>"
              b"<li class='timeused'>0.5 secs</li>"
              b"<li class='dbqueries'>DB reads/writes: <b>12</b>/3</li></ul></div>")
    figures = moodle_load.parse_perf_footer(page_with_footer(footer))
    assert figures == {"time_ms": 500.0}


def test_footer_first_ram_item_only() -> None:
    footer = (b'<div class="performanceinfo"><ul>'
              b'<li class="memoryused">RAM: 7,5 Mo</li>'
              b'<li class="memoryused">RAM peak: 8 MB</li></ul></div>')
    assert moodle_load.parse_perf_footer(page_with_footer(footer)) is None


def test_footer_class_name_in_text_ignored() -> None:
    footer = (b'<div class="performanceinfo"><ul><li class="other">timeused 5'
              b'</li><li class="dbtime">DB queries time: 0.002 secs</li></ul></div>')
    figures = moodle_load.parse_perf_footer(page_with_footer(footer))
    assert figures == {"db_time_ms": 2.0}


@pytest.mark.parametrize(
    ("text", "megabytes"),
    [("RAM: 7.5\u00a0MB", 7.5), ("RAM: 512 KB", 0.5), ("RAM: 1.5 GB", 1536.0),
     ("RAM: 7,5 Mo", None), ("RAM: 2 Mo", 2.0), ("RAM: 3 zz", None)],
)
def test_footer_memory_units(text: str, megabytes: float | None) -> None:
    footer = (f'<div class="performanceinfo"><ul><li class="memoryused">{text}</li>'
              f"</ul></div>").encode()
    figures = moodle_load.parse_perf_footer(footer)
    if megabytes is None:
        assert figures is None or "ram_mb" not in figures
    else:
        assert figures == {"ram_mb": megabytes}


def test_server_stats_distinct_values() -> None:
    stats = moodle_load.ServerStats()
    for reads in [35] * 8 + [36] * 2:
        stats.record({"db_reads": reads, "db_writes": 0, "time_ms": 100.0})
    stats.record(None)
    summary = stats.summary()
    assert summary["responses_with_footer"] == 10
    assert summary["responses_without_footer"] == 1
    assert summary["db_reads"]["distinct"] == {"35": 8, "36": 2}
    assert summary["db_reads"]["mean"] == 35.2
    assert summary["db_reads"]["p50"] == 35
    assert summary["db_reads"]["p95"] == 36
    assert summary["db_writes"]["distinct"] == {"0": 10}
    assert summary["time_ms"] == {"count": 10, "mean": 100.0, "p50": 100.0,
                                  "p95": 100.0, "max": 100.0}
    assert summary["ram_mb"]["count"] == 0
    assert summary["ram_mb"]["p50"] is None


def test_server_stats_many_distinct_values() -> None:
    stats = moodle_load.ServerStats()
    for reads in range(moodle_load.MAX_DISTINCT_VALUES + 1):
        stats.record({"db_reads": reads, "db_writes": 1})
    summary = stats.summary()
    assert summary["db_reads"]["distinct"] is None
    assert summary["db_writes"]["distinct"] == {"1": 11}


def test_stats_merge_matches_one_recorder() -> None:
    results = [
        moodle_load.Result(0.0, "u", "/a", "/a", 200, 10.0 + n, 9.0 + n, 1.0, 100,
                           "success", None, {"db_reads": 35.0, "time_ms": 50.0})
        for n in range(5)
    ] + [
        moodle_load.Result(0.0, "u", "/b", "/b", 303, 40.0, 39.0, 12.0, 0,
                           "login_required", "/login/index.php", None),
        moodle_load.Result(0.0, "u", "/b", "/b", 0, 30_000.0, 30_000.0, 0.0, 0,
                           "timeout", None, None),
    ]
    single = moodle_load.Stats()
    parts = {"/a": moodle_load.Stats(), "/b": moodle_load.Stats()}
    for result in results:
        single.record(result)
        parts[result.template].record(result)
    merged = moodle_load.Stats()
    for part in parts.values():
        merged.merge(part)
    assert merged.summary() == single.summary()


def test_server_stats_no_footer() -> None:
    stats = moodle_load.ServerStats()
    stats.record(None)
    assert stats.summary() == {"responses_with_footer": 0,
                               "responses_without_footer": 1}


async def test_run_server_figures_per_template(
    moodle_site: MoodleSite,
) -> None:
    moodle_site.set_perf(None, time_s=0.05, ram_mb=6.0, included=500, db_reads=20,
                         db_writes=0, db_time_s=0.004, session_wait_s=0.0)
    moodle_site.set_perf("/course/", time_s=0.125, ram_mb=8.2, included=618,
                         db_reads=36, db_writes=1, db_time_s=0.0205)
    config = config_dict(moodle_site.base_url,
                         parameters={"courseid": {"min": 2, "max": 13}},
                         urls=[{"path": "/my/"},
                               {"path": "/course/view.php?id={courseid}"}])
    summary, _code, rows = await run_load(config, rpm=3000, duration_s=1)
    assert summary["perf_footer_found"] is True
    my = summary["templates"]["/my/"]
    course = summary["templates"]["/course/view.php?id={courseid}"]
    assert my["server"]["responses_with_footer"] == my["total"]
    assert my["server"]["db_reads"]["distinct"] == {"20": my["total"]}
    assert my["server"]["time_ms"]["p95"] == 50.0
    assert my["server"]["ram_mb"]["max"] == 6.0
    assert my["server"]["included_files"]["p50"] == 500
    assert my["server"]["db_time_ms"]["mean"] == 4.0
    # Courses 2-9 respond with a redirect to the enrolment page, which has no footer.
    pages = course["status_counts"]["200"]
    assert course["server"]["responses_with_footer"] == pages
    assert course["server"]["responses_without_footer"] == course["redirects"]
    assert course["redirects"] > 0
    assert course["server"]["db_reads"]["distinct"] == {"36": pages}
    assert course["server"]["db_writes"]["distinct"] == {"1": pages}
    assert course["server"]["time_ms"]["max"] == 125.0
    assert course["server"]["ram_mb"]["p50"] == 8.2
    overall = summary["server"]
    assert overall["responses_with_footer"] == my["total"] + pages
    assert overall["db_reads"]["distinct"] == {"20": my["total"], "36": pages}
    course_rows = [row for row in rows if row["url_template"].startswith("/course")]
    served = [row for row in course_rows if row["status"] == "200"]
    assert {row["server_db_reads"] for row in served} == {"36"}
    assert {row["server_time_ms"] for row in served} == {"125"}
    redirected = [row for row in course_rows if row["status"] == "303"]
    assert {row["server_db_reads"] for row in redirected} == {""}


async def test_run_without_footer(
    moodle_site: MoodleSite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moodle_load")
    summary, _code, rows = await run_load(config_dict(moodle_site.base_url))
    assert summary["perf_footer_found"] is False
    assert summary["server"] == {"responses_with_footer": 0,
                                 "responses_without_footer": summary["total"]}
    assert caplog.text.count("performance footer") == 1
    pages = summary["status_counts"]["200"]
    assert f"{pages} pages with a 2xx status carried no Moodle performance" in (
        caplog.text
    )
    assert all(row["server_db_reads"] == "" for row in rows)
