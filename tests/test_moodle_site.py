"""Tests of the Moodle-like test server against the behaviour of a real Moodle 5.1.

Each test drives the site with a real aiohttp client that keeps cookies for an IP
address host and never follows redirects, so every step of a redirect chain is
checked as a browser would see it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from multidict import CIMultiDictProxy

from tests.moodle_site import (
    MSG_FORCED_CHANGE,
    MSG_INVALID_LOGIN,
    MSG_LOCKED,
    MSG_MUST_CONFIRM,
    MSG_SESSION_TIMED_OUT,
    MoodleSite,
    SiteUser,
    default_users,
)

SERVER_SCRIPT = Path(__file__).resolve().parent / "moodle_site.py"
SESSION_COOKIE_RE = re.compile(r"^MoodleSession=([a-v0-9]{26}); path=/; HttpOnly$")
TOKEN_RE = re.compile(
    r'<input type="hidden" name="logintoken" value="([A-Za-z0-9]{32})">'
)
SESSKEY_RE = re.compile(r'"sesskey":"([A-Za-z0-9]{10})"')
BODY_ID_RE = re.compile(r'<body\s+id="([^"]+)"')
FATAL_ERROR = '<div data-rel="fatalerror" class="box py-3 errorbox alert alert-danger">'
PASSWORD = "moodle"


@dataclass
class Reply:
    """One response, read in full, with what the tests look at."""

    status: int
    headers: CIMultiDictProxy[str]
    set_cookies: list[str]
    body: str

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")

    @property
    def body_id(self) -> str | None:
        match = BODY_ID_RE.search(self.body)
        return match.group(1) if match else None

    def session_id(self) -> str | None:
        for cookie in self.set_cookies:
            match = SESSION_COOKIE_RE.match(cookie)
            if match:
                return match.group(1)
        return None


class Browser:
    """A client that keeps cookies, as a browser does, but never follows redirects."""

    def __init__(self, site: MoodleSite, client: aiohttp.ClientSession) -> None:
        self.site = site
        self.client = client

    async def request(self, method: str, url: str, **kwargs: object) -> Reply:
        if url.startswith("/"):
            url = self.site.base_url + url
        async with self.client.request(
            method, url, allow_redirects=False, **kwargs
        ) as response:
            body = await response.text()
            return Reply(
                response.status,
                response.headers,
                response.headers.getall("Set-Cookie", []),
                body,
            )

    async def get(self, url: str, **kwargs: object) -> Reply:
        return await self.request("GET", url, **kwargs)

    async def login_token(self) -> str:
        reply = await self.get("/login/index.php")
        match = TOKEN_RE.search(reply.body)
        assert match, "login page has no logintoken"
        return match.group(1)

    async def post_login(
        self, username: str, password: str = PASSWORD, token: str | None = None
    ) -> Reply:
        if token is None:
            token = await self.login_token()
        data = {"anchor": "", "logintoken": token, "username": username,
                "password": password}
        return await self.request("POST", "/login/index.php", data=data)

    async def login(self, username: str, password: str = PASSWORD) -> Reply:
        """Log in, follow the redirect chain and return the page it ends on."""
        reply = await self.post_login(username, password)
        while reply.status == 303:
            assert reply.location
            reply = await self.get(reply.location)
        return reply

    def cookie(self, name: str) -> str | None:
        for morsel in self.client.cookie_jar:
            if morsel.key == name:
                return morsel.value
        return None


def users_with_flags() -> list[SiteUser]:
    """Return the default users with one of each blocking flag set."""
    users = default_users()
    flags = {
        "tool_generator_000090": {"suspended": True},
        "tool_generator_000091": {"auth": "nologin"},
        "tool_generator_000092": {"confirmed": False},
        "tool_generator_000093": {"force_password_change": True},
        "tool_generator_000094": {"locked": True},
    }
    for user in users:
        for name, value in flags.get(user.username, {}).items():
            setattr(user, name, value)
    return users



@pytest_asyncio.fixture
async def site() -> AsyncIterator[MoodleSite]:
    server = MoodleSite(users_with_flags())
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest_asyncio.fixture
async def browser(site: MoodleSite) -> AsyncIterator[Browser]:
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as client:
        yield Browser(site, client)


@pytest_asyncio.fixture
async def other_browser(site: MoodleSite) -> AsyncIterator[Browser]:
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as client:
        yield Browser(site, client)


def assert_redirect(reply: Reply, site: MoodleSite, path: str) -> None:
    assert reply.status == 303
    assert reply.location == site.base_url + path
    assert reply.headers.get("X-Redirect-By") == "Moodle"


def assert_login_error(reply: Reply, message: str) -> None:
    assert reply.status == 200
    assert reply.body_id == "page-login-index"
    assert f'<div class="alert alert-danger" role="alert">{message}</div>' in reply.body
    assert f'id="loginerrormessage" class="visually-hidden">{message}</a>' in reply.body


# -- login page and successful login ------------------------------------------


async def test_login_page_fresh(browser: Browser, site: MoodleSite) -> None:
    reply = await browser.get("/login/index.php")

    assert reply.status == 200
    assert reply.headers.get("Content-Type") == "text/html; charset=utf-8"
    assert len(reply.set_cookies) == 1
    assert SESSION_COOKIE_RE.match(reply.set_cookies[0])
    assert reply.body_id == "page-login-index"
    form = (
        f'<form class="login-form" action="{site.base_url}/login/index.php"'
        ' method="post" id="login">'
    )
    assert form in reply.body
    assert '<input id="anchor" type="hidden" name="anchor" value="">' in reply.body
    tokens = TOKEN_RE.findall(reply.body)
    assert len(tokens) == 2
    assert tokens[0] == tokens[1]
    guest_form = re.search(r'<form action="[^"]+" method="post" id="guestlogin">'
                           r"\s*" + TOKEN_RE.pattern, reply.body)
    assert guest_form
    assert "alert-danger" not in reply.body


async def test_login_page_keeps_token_until_used(browser: Browser) -> None:
    first = await browser.login_token()
    second = await browser.login_token()

    assert first == second


async def test_login_success_chain(browser: Browser, site: MoodleSite) -> None:
    anonymous_sid = (await browser.get("/login/index.php")).session_id()
    token = await browser.login_token()

    posted = await browser.post_login("tool_generator_000001", token=token)

    assert_redirect(posted, site, "/login/index.php?testsession=3")
    new_sid = posted.session_id()
    assert new_sid is not None
    assert new_sid != anonymous_sid
    assert posted.set_cookies[1] == (
        "MOODLEID1_=deleted; expires=Thu, 01 Jan 1970 00:00:01 GMT; Max-Age=0;"
        " path=/; HttpOnly"
    )
    assert re.match(
        r"^MOODLEID1_=sodium%3A\S+; expires=\w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT;"
        r" Max-Age=5184000; path=/; HttpOnly$",
        posted.set_cookies[2],
    )
    tested = await browser.get(posted.location or "")
    assert_redirect(tested, site, "/my/")
    assert tested.set_cookies == []
    dashboard = await browser.get(tested.location or "")
    assert dashboard.status == 200
    assert dashboard.body_id == "page-my-index"
    assert "<title>Dashboard | loadlab</title>" in dashboard.body
    assert SESSKEY_RE.search(dashboard.body)
    assert site.logins["tool_generator_000001"] == 1
    assert site.requests["/login/index.php"] == 4
    assert site.requests["/my/"] == 1


async def test_login_old_session_is_gone(browser: Browser, site: MoodleSite) -> None:
    await browser.get("/login/index.php")
    anonymous_sid = browser.cookie("MoodleSession")
    await browser.login("tool_generator_000001")

    reply = await browser.get("/my/", cookies={"MoodleSession": anonymous_sid or ""})

    assert_redirect(reply, site, "/login/index.php")


async def test_login_admin(browser: Browser) -> None:
    page = await browser.login("admin", "Admin#2026pw")

    assert page.body_id == "page-my-index"


async def test_login_keeps_wanted_url(browser: Browser, site: MoodleSite) -> None:
    first = await browser.get("/course/view.php?id=11")

    assert_redirect(first, site, "/login/index.php")
    assert first.session_id() is not None
    login_page = await browser.get(first.location or "")
    assert login_page.status == 200
    assert "alert-danger" not in login_page.body
    posted = await browser.post_login("tool_generator_000002")
    tested = await browser.get(posted.location or "")
    assert_redirect(tested, site, "/course/view.php?id=11")


# -- failed logins --------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("tool_generator_000001", "wrong"),
        ("tool_generator_000001", ""),
        ("nobody_by_this_name", PASSWORD),
        ("tool_generator_000090", PASSWORD),  # suspended
        ("tool_generator_000091", PASSWORD),  # auth=nologin
    ],
)
async def test_login_rejected(
    browser: Browser, site: MoodleSite, username: str, password: str
) -> None:
    posted = await browser.post_login(username, password)

    assert_redirect(posted, site, "/login/index.php?loginredirect=1")
    assert posted.set_cookies == []
    page = await browser.get(posted.location or "")
    assert_login_error(page, MSG_INVALID_LOGIN)
    assert TOKEN_RE.search(page.body)
    assert site.logins[username] == 0


@pytest.mark.parametrize("token", ["A" * 32, ""])
async def test_login_bad_token(browser: Browser, site: MoodleSite, token: str) -> None:
    await browser.get("/login/index.php")

    posted = await browser.post_login("tool_generator_000001", token=token)

    assert_redirect(posted, site, "/login/index.php?loginredirect=1")
    assert_login_error(await browser.get(posted.location or ""), MSG_INVALID_LOGIN)


@pytest.mark.parametrize(
    ("username", "token", "reason"),
    [
        ("tool_generator_000001", "A" * 32, "Invalid Login Token"),
        ("nobody_by_this_name", None, "Unknown user"),
        ("tool_generator_000090", None, "Suspended Login"),
        ("tool_generator_000091", None, "Disabled Login"),
    ],
)
async def test_login_rejected_logs_reason(
    browser: Browser,
    caplog: pytest.LogCaptureFixture,
    username: str,
    token: str | None,
    reason: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="moodle_site")

    await browser.post_login(username, token=token)

    assert f"login rejected for {username!r}: {reason}" in caplog.messages


async def test_login_token_missing_field(browser: Browser, site: MoodleSite) -> None:
    await browser.get("/login/index.php")
    data = {"username": "tool_generator_000001", "password": PASSWORD}

    posted = await browser.request("POST", "/login/index.php", data=data)

    assert_redirect(posted, site, "/login/index.php?loginredirect=1")


async def test_login_token_single_use(browser: Browser, site: MoodleSite) -> None:
    token = await browser.login_token()
    await browser.post_login("tool_generator_000001", "wrong", token=token)

    reused = await browser.post_login("tool_generator_000001", token=token)

    assert_redirect(reused, site, "/login/index.php?loginredirect=1")
    assert site.logins["tool_generator_000001"] == 0


async def test_login_token_bound_to_session(
    browser: Browser, other_browser: Browser, site: MoodleSite
) -> None:
    token = await browser.login_token()

    posted = await other_browser.post_login("tool_generator_000001", token=token)

    assert_redirect(posted, site, "/login/index.php?loginredirect=1")
    assert posted.session_id() is not None
    assert_login_error(await other_browser.get(posted.location or ""),
                       MSG_INVALID_LOGIN)
    good = await browser.post_login("tool_generator_000001", token=token)
    assert_redirect(good, site, "/login/index.php?testsession=3")


async def test_login_locked_answers_200(browser: Browser) -> None:
    reply = await browser.post_login("tool_generator_000094")

    assert_login_error(reply, MSG_LOCKED)
    assert reply.set_cookies == []


async def test_login_unconfirmed_answers_200(browser: Browser) -> None:
    reply = await browser.post_login("tool_generator_000092")

    assert reply.status == 200
    assert reply.body_id == "page-login-index"
    assert f"<title>{MSG_MUST_CONFIRM} | loadlab</title>" in reply.body
    assert f"<h2>{MSG_MUST_CONFIRM}</h2>" in reply.body


async def test_login_forced_password_change(browser: Browser, site: MoodleSite) -> None:
    posted = await browser.post_login("tool_generator_000093")

    assert_redirect(posted, site, "/login/change_password.php")
    assert posted.session_id() is not None
    assert not any(c.startswith("MOODLEID1_") for c in posted.set_cookies)
    page = await browser.get(posted.location or "")
    assert page.status == 200
    assert page.body_id == "page-login-change_password"
    assert MSG_FORCED_CHANGE in page.body
    for path in ["/my/", "/course/view.php?id=10", "/user/profile.php?id=4"]:
        assert_redirect(await browser.get(path), site, "/login/change_password.php")


# -- pages while logged in ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body_id", "title"),
    [
        ("/my/", "page-my-index", "Dashboard | loadlab"),
        ("/my/?id=999999", "page-my-index", "Dashboard | loadlab"),
        ("/course/view.php?id=10", "page-course-view-topics",
         "Course: Test course: S | loadlab"),
        ("/course/view.php?id=13", "page-course-view-topics",
         "Course: Test course: S | loadlab"),
        ("/mod/forum/view.php?id=104", "page-mod-forum-view", "Forum | loadlab"),
        ("/mod/forum/view.php?id=296", "page-mod-forum-view", "Forum | loadlab"),
        ("/user/profile.php?id=4", "page-user-profile", None),
        ("/user/profile.php?id=999999", "page-user-profile", ""),
    ],
)
async def test_page_logged_in(
    browser: Browser, path: str, body_id: str, title: str | None
) -> None:
    await browser.login("tool_generator_000002")

    reply = await browser.get(path)

    assert reply.status == 200
    assert reply.body_id == body_id
    if title is not None:
        assert f"<title>{title}</title>" in reply.body
    assert SESSKEY_RE.search(reply.body)
    assert 2_000 < len(reply.body) < 40_000


async def test_profile_invalid_user(browser: Browser) -> None:
    await browser.login("tool_generator_000002")

    reply = await browser.get("/user/profile.php?id=999999")

    assert reply.status == 200
    assert re.search(r'alert alert-danger[^>]*>\s*Invalid user\s', reply.body)


async def test_profile_guest_not_available(browser: Browser) -> None:
    await browser.login("tool_generator_000002")

    reply = await browser.get("/user/profile.php?id=1")

    assert reply.status == 200
    assert "The details of this user are not available to you" in reply.body


@pytest.mark.parametrize(
    ("path", "course_id"),
    [
        *((f"/course/view.php?id={course}", course) for course in range(2, 10)),
        *((f"/mod/forum/view.php?id={cmid}", cmid // 5 + 1)
          for cmid in range(5, 45, 5)),
    ],
)
async def test_page_not_enrolled(
    browser: Browser, site: MoodleSite, path: str, course_id: int
) -> None:
    await browser.login("tool_generator_000002")

    reply = await browser.get(path)

    assert_redirect(reply, site, f"/enrol/index.php?id={course_id}")
    page = await browser.get(reply.location or "")
    assert page.status == 200
    assert page.body_id == "page-enrol-index"
    assert "<h2>Enrolment options</h2>" in page.body
    assert "You cannot enrol yourself in this course" in page.body


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/course/view.php?id=999999", "Can&#x27;t find data record in database."),
        ("/course/view.php?id=0", "Can&#x27;t find data record in database."),
        ("/course/view.php", "Must specify course id, short name or idnumber"),
        ("/mod/forum/view.php?id=999999",
         "error/Unable to find forum with cmid 999999"),
        ("/mod/forum/view.php?id=6", "error/Unable to find forum with cmid 6"),
        ("/mod/forum/view.php?id=0", "error/Unable to find forum with cmid 0"),
    ],
)
async def test_page_fatal_error(browser: Browser, path: str, message: str) -> None:
    await browser.login("tool_generator_000002")

    reply = await browser.get(path)

    assert reply.status == 404
    assert reply.body_id == "page-site-index"
    assert "<title>Error | loadlab</title>" in reply.body
    assert f'{FATAL_ERROR}<p class="errormessage">{message}</p>' in reply.body


async def test_router_unknown_path(browser: Browser, site: MoodleSite) -> None:
    reply = await browser.get("/this/does/not/exist")

    assert reply.status == 404
    assert "<title>404 Not Found</title>" in reply.body
    assert reply.set_cookies == []
    assert site.requests["/this/does/not/exist"] == 1


async def test_host_redirect(browser: Browser, site: MoodleSite) -> None:
    port = site.base_url.rsplit(":", 1)[1]
    url = f"http://localhost:{port}/course/view.php?id=10"

    reply = await browser.get(url, headers={"Host": f"localhost:{port}"})

    assert_redirect(reply, site, "/course/view.php?id=10")
    assert reply.set_cookies == []


# -- sessions -------------------------------------------------------------------


async def test_session_no_cookie(browser: Browser, site: MoodleSite) -> None:
    reply = await browser.get("/my/")

    assert_redirect(reply, site, "/login/index.php")
    assert reply.session_id() is not None
    page = await browser.get(reply.location or "")
    assert page.status == 200
    assert "alert-danger" not in page.body


async def assert_timed_out_chain(browser: Browser, site: MoodleSite) -> None:
    first = await browser.get("/my/")
    assert_redirect(first, site, "/login/index.php")
    assert first.session_id() is not None
    second = await browser.get(first.location or "")
    assert_redirect(second, site, "/login/index.php?loginredirect=1")
    assert_login_error(await browser.get(second.location or ""), MSG_SESSION_TIMED_OUT)


async def test_session_made_up_cookie(browser: Browser, site: MoodleSite) -> None:
    browser.client.cookie_jar.update_cookies(
        {"MoodleSession": "a" * 26}, aiohttp.client.URL(site.base_url)
    )

    await assert_timed_out_chain(browser, site)


@pytest.mark.parametrize("username", ["tool_generator_000001", None])
async def test_session_expired(
    browser: Browser, site: MoodleSite, username: str | None
) -> None:
    await browser.login("tool_generator_000001")

    site.expire_sessions(username)

    await assert_timed_out_chain(browser, site)


async def test_session_expire_other_user(browser: Browser, site: MoodleSite) -> None:
    await browser.login("tool_generator_000001")

    site.expire_sessions("tool_generator_000002")

    assert (await browser.get("/my/")).status == 200


@pytest.mark.parametrize("sesskey", [None, "wrongkey00"])
async def test_logout_without_sesskey(
    browser: Browser, sesskey: str | None
) -> None:
    await browser.login("tool_generator_000001")
    query = "" if sesskey is None else f"?sesskey={sesskey}"

    reply = await browser.get(f"/login/logout.php{query}")

    assert reply.status == 200
    assert reply.body_id == "page-login-logout"
    assert "Do you really want to log out?" in reply.body
    assert (await browser.get("/my/")).status == 200


async def test_logout_with_sesskey(browser: Browser, site: MoodleSite) -> None:
    page = await browser.login("tool_generator_000001")
    match = SESSKEY_RE.search(page.body)
    assert match
    old_sid = browser.cookie("MoodleSession")

    reply = await browser.get(f"/login/logout.php?sesskey={match.group(1)}")

    assert_redirect(reply, site, "/")
    new_sid = reply.session_id()
    assert new_sid is not None
    assert new_sid != old_sid
    home = await browser.get("/")
    assert home.status == 200
    assert home.body_id == "page-site-index"
    assert_redirect(await browser.get("/my/"), site, "/login/index.php")


async def test_session_lock_serialises(browser: Browser, site: MoodleSite) -> None:
    await browser.login("tool_generator_000001")
    site.set_perf(None)  # footer on, showing the measured session wait
    site.stall(0.3)
    finished: list[str] = []

    async def fetch(name: str) -> Reply:
        reply = await browser.get("/my/")
        finished.append(name)
        return reply

    first = asyncio.create_task(fetch("first"))
    await site.stall_started.wait()
    second = asyncio.create_task(fetch("second"))
    first_reply, second_reply = await asyncio.gather(first, second)

    assert first_reply.status == 200
    assert second_reply.status == 200
    assert finished == ["first", "second"]
    match = re.search(r"Session wait: ([\d.]+) secs", second_reply.body)
    assert match
    assert float(match.group(1)) > 0.1
    assert site.max_in_flight_per_session == 2


async def test_session_sequential_in_flight(
    browser: Browser, site: MoodleSite
) -> None:
    await browser.login("tool_generator_000001")

    for path in ["/my/", "/course/view.php?id=10", "/mod/forum/view.php?id=104"]:
        await browser.get(path)

    assert site.max_in_flight_per_session == 1


async def test_session_lock_per_session(
    browser: Browser, other_browser: Browser, site: MoodleSite
) -> None:
    await browser.login("tool_generator_000001")
    await other_browser.login("tool_generator_000002")
    site.stall(0.5)

    stalled = asyncio.create_task(browser.get("/my/"))
    await site.stall_started.wait()
    other = await other_browser.get("/my/")

    assert other.status == 200
    assert not stalled.done()
    assert (await stalled).status == 200


async def test_stall_count(browser: Browser, site: MoodleSite) -> None:
    await browser.login("tool_generator_000001")
    site.stall(0.2, count=2)
    elapsed = []

    for _ in range(3):
        started = time.monotonic()
        await browser.get("/my/")
        elapsed.append(time.monotonic() - started)

    assert elapsed[0] >= 0.2
    assert elapsed[1] >= 0.2
    assert elapsed[2] < 0.2


async def test_stall_skips_login(browser: Browser, site: MoodleSite) -> None:
    site.stall(5.0)

    posted = await browser.post_login("tool_generator_000001")
    tested = await browser.get(posted.location or "")
    logout = await browser.get("/login/logout.php")

    assert_redirect(tested, site, "/my/")
    assert logout.status == 200
    assert not site.stall_started.is_set()


async def test_page_delay_pages_only() -> None:
    site = MoodleSite(page_delay_s=0.2)
    await site.start()
    try:
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as client:
            browser = Browser(site, client)
            started = time.monotonic()
            posted = await browser.post_login("tool_generator_000001")
            login_s = time.monotonic() - started
            started = time.monotonic()
            page = await browser.get("/my/")
            page_s = time.monotonic() - started
    finally:
        await site.close()

    assert posted.status == 303
    assert login_s < 0.2
    assert page.status == 200
    assert page_s >= 0.2


# -- performance footer ----------------------------------------------------------


def perf_figures(body: str) -> dict[str, str]:
    """Parse the footer items a load generator reads, in Moodle's own markup."""
    patterns = {
        "time": r'<li class="timeused col-sm-4">([\d.]+) secs</li>',
        "ram": r'<li class="memoryused col-sm-4">RAM: ([\d.]+)\xa0MB</li>',
        "included": r'<li class="included col-sm-4">Included (\d+) files</li>',
        "db": r'<li class="dbqueries col-sm-4">DB reads/writes: (\d+/\d+)</li>',
        "dbtime": r'<li class="dbtime col-sm-4">DB queries time: ([\d.]+) secs</li>',
        "wait": r'<li class="sessionwait col-sm-4">Session wait: ([\d.]+) secs</li>',
    }
    figures = {}
    for name, pattern in patterns.items():
        match = re.search(pattern, body)
        assert match, f"performance footer has no {name} item"
        figures[name] = match.group(1)
    return figures


async def test_perf_footer_off(browser: Browser) -> None:
    page = await browser.login("tool_generator_000001")

    assert "performanceinfo" not in page.body


async def test_perf_footer_markup(browser: Browser, site: MoodleSite) -> None:
    site.set_perf("/course/", time_s=0.5, ram_mb=9.25, included=700, db_reads=40,
                  db_writes=2, db_time_s=0.0125, session_wait_s=0.004)
    await browser.login("tool_generator_000001")

    course = await browser.get("/course/view.php?id=10")
    dashboard = await browser.get("/my/")

    assert perf_figures(course.body) == {
        "time": "0.500000", "ram": "9.2", "included": "700", "db": "40/2",
        "dbtime": "0.01250", "wait": "0.004",
    }
    assert perf_figures(dashboard.body) == {
        "time": "0.089233", "ram": "5.5", "included": "574", "db": "42/0",
        "dbtime": "0.02437", "wait": "0.000",
    }
    assert "<li class='contextswithfilters col-sm-4'>" in course.body
    start = course.body.index('<div class="performanceinfo siteinfo')
    assert start < course.body.index("</body>")
    assert course.body.index("</footer>") > start


async def test_perf_footer_login_page() -> None:
    site = MoodleSite(perf_footer=True)
    await site.start()
    try:
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as client:
            reply = await Browser(site, client).get("/login/index.php")
    finally:
        await site.close()

    assert perf_figures(reply.body)["included"] == "366"


async def test_set_perf_rejects_unknown(site: MoodleSite) -> None:
    with pytest.raises(ValueError, match="cpu_s"):
        site.set_perf(None, cpu_s=1.0)


# -- fixture and standalone server --------------------------------------------------


async def test_fixture_site(moodle_site: MoodleSite) -> None:
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as client:
        page = await Browser(moodle_site, client).login("admin", "Admin#2026pw")

    assert page.body_id == "page-my-index"
    assert moodle_site.logins["admin"] == 1


async def test_standalone_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", "0",
        "--perf-footer", stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{match.group(1)}/login/index.php") as response:
                body = await response.text()
        assert response.status == 200
        assert "performanceinfo" in body
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), 30)
        rest = (await process.stderr.read()).decode()

    assert returncode == 0
    assert "Traceback" not in rest


async def test_standalone_port_in_use(site: MoodleSite) -> None:
    port = site.base_url.rsplit(":", 1)[1]

    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER_SCRIPT), "--port", port,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)

    assert process.returncode == 1
    assert f"could not listen on 127.0.0.1 port {port}" in stderr.decode()
    assert "Traceback" not in stderr.decode()


@pytest.mark.parametrize(
    "arguments",
    [["--host", "192.0.2.1"], ["--page-delay-ms", "-1"], ["--page-delay-ms", "inf"]],
)
async def test_standalone_invalid_argument(arguments: list[str]) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER_SCRIPT), *arguments,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)

    assert process.returncode == 2
    assert "invalid" in stderr.decode()
