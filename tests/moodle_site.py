"""A local HTTP server that behaves like a Moodle 5.1 site, for tests and benchmarks.

The status codes, 303 redirect chains, cookies, login form and page markers follow a
stock Moodle 5.1+ (Build 20251017) site recorded with curl. The markup is written by
hand and much smaller than Moodle's (about 10 KB to 27 KB per page), but every
element a client reads is where Moodle puts it.

Usage: python tests/moodle_site.py --host 127.0.0.1 --port 8080 [--perf-footer] [-v]

In tests, use the `moodle_site` pytest fixture or `MoodleSite` directly. Exit codes of
the standalone server: 0 after SIGINT or SIGTERM, 1 when the port cannot be bound,
2 for invalid arguments.

Known limits: no real database, no password hashing, no guest-specific rules beyond
the guest profile notice, and sessions never time out on their own (call
`expire_sessions`). Every request without a cookie starts a session that stays in
memory until logout or `expire_sessions`, so a client that drops its cookies makes
the server grow.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import email.utils
import ipaddress
import logging
import math
import random
import signal
import string
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from html import escape
from typing import Any

from aiohttp import web

try:
    import pytest_asyncio
except ImportError:  # the standalone server runs without the test dependencies
    pytest_asyncio = None

log = logging.getLogger("moodle_site")

SITE_NAME = "loadlab"
ADMIN_PASSWORD = "Admin#2026pw"
GENERATED_PASSWORD = "moodle"
GENERATED_USER_COUNT = 100
# Moodle's session ids are 26 characters of PHP's base-32 alphabet.
SESSION_ID_ALPHABET = "abcdefghijklmnopqrstuv0123456789"
SESSION_ID_LENGTH = 26
TOKEN_ALPHABET = string.ascii_letters + string.digits
LOGIN_TOKEN_LENGTH = 32
SESSKEY_LENGTH = 10
# MOODLEID1_ remembers the username for 60 days (Max-Age=5184000 on Moodle 5.1).
MOODLEID_MAX_AGE_S = 60 * 24 * 3600

SITE_COURSE_ID = 1
NOT_ENROLLED_COURSES = range(2, 10)
ENROLLED_COURSES = range(10, 14)
# The generator made 5 course modules per "XS" course and 64 per "S" course, and
# the forum is the last module of each course.
XS_MODULES_PER_COURSE = 5
S_MODULES_PER_COURSE = 64
SITE_ADMIN_IDS = frozenset({2})

MSG_INVALID_LOGIN = "Invalid login, please try again"
MSG_SESSION_TIMED_OUT = "Your session has timed out. Please log in again."
MSG_LOCKED = "Your account is locked. An unlock link has been sent via email."
MSG_MUST_CONFIRM = "You need to confirm your account"
MSG_FORCED_CHANGE = "You must change your password to proceed."

# Moodle's display_size() puts a no-break space between a number and its unit.
NBSP = "\u00a0"
# Slots in page templates: a NUL byte cannot occur in the hand-written markup.
SLOT = "\x00"

# Performance footer figures per page kind, from a recorded Moodle 5.1 site with
# perfdebug=15 (second visit of each page, warm caches). The "other" figures (forum,
# profile, error pages) are an estimate between those recorded.
DEFAULT_PERF: dict[str, dict[str, float]] = {
    "login": {"time_s": 0.019487, "ram_mb": 2.4, "included": 366, "db_reads": 6,
              "db_writes": 1, "db_time_s": 0.00373, "get_string": 41},
    "my": {"time_s": 0.089233, "ram_mb": 5.5, "included": 574, "db_reads": 42,
           "db_writes": 0, "db_time_s": 0.02437, "get_string": 579},
    "course": {"time_s": 0.110138, "ram_mb": 7.5, "included": 618, "db_reads": 35,
               "db_writes": 0, "db_time_s": 0.01605, "get_string": 687},
    "other": {"time_s": 0.061532, "ram_mb": 4.9, "included": 512, "db_reads": 24,
              "db_writes": 0, "db_time_s": 0.01119, "get_string": 400},
}
PERF_FIGURES = frozenset(
    {"time_s", "ram_mb", "included", "db_reads", "db_writes", "db_time_s",
     "get_string", "session_wait_s"}
)

FIRST_NAMES = ["Anna", "Ben", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiro",
               "Ines", "Jonas", "Kavya", "Lukas", "Maya", "Nils", "Olga", "Pedro"]
LAST_NAMES = ["Horáková", "Okafor", "Rossi", "Ivanov", "Yılmaz", "Haddad", "Berg",
              "Tanaka", "Costa", "Weber", "Iyer", "Novak", "Levi", "Lund", "Sousa"]
MODULE_KINDS = ["page", "assign", "quiz", "url", "resource", "label"]


@dataclass
class SiteUser:
    """One account of the site, with every flag that can block its login."""

    id: int
    username: str
    password: str
    suspended: bool = False
    auth: str = "manual"  # "nologin" blocks the login like Moodle's nologin plugin
    confirmed: bool = True
    force_password_change: bool = False
    locked: bool = False


def default_users() -> list[SiteUser]:
    """Return the recorded site's accounts: guest, admin and 100 generated users."""
    users = [
        SiteUser(1, "guest", "guest"),
        SiteUser(2, "admin", ADMIN_PASSWORD),
    ]
    for number in range(1, GENERATED_USER_COUNT + 1):
        users.append(
            SiteUser(number + 2, f"tool_generator_{number:06d}", GENERATED_PASSWORD)
        )
    return users


def full_name(user: SiteUser) -> str:
    """Return a stable display name: Moodle shows names, not usernames."""
    if user.id == 1:
        return "Guest user"
    if user.id == 2:
        return "Admin User"
    first = FIRST_NAMES[user.id % len(FIRST_NAMES)]
    last = LAST_NAMES[(user.id // len(FIRST_NAMES)) % len(LAST_NAMES)]
    return f"{first} {last}"


def course_modules(course_id: int) -> range:
    """Return the course module ids of a course (empty for unknown courses)."""
    if course_id in NOT_ENROLLED_COURSES:
        start = (course_id - 2) * XS_MODULES_PER_COURSE + 1
        return range(start, start + XS_MODULES_PER_COURSE)
    if course_id in ENROLLED_COURSES:
        first_s = len(NOT_ENROLLED_COURSES) * XS_MODULES_PER_COURSE + 1
        start = first_s + (course_id - ENROLLED_COURSES[0]) * S_MODULES_PER_COURSE
        return range(start, start + S_MODULES_PER_COURSE)
    return range(0)


def module_course(cmid: int) -> int | None:
    """Return the course of a course module id, or None when it does not exist."""
    for course_id in (*NOT_ENROLLED_COURSES, *ENROLLED_COURSES):
        if cmid in course_modules(course_id):
            return course_id
    return None


def module_kind(cmid: int) -> str:
    """Return the module type. The last module of every course is its forum."""
    course_id = module_course(cmid)
    if course_id is not None and cmid == course_modules(course_id)[-1]:
        return "forum"
    return MODULE_KINDS[cmid % len(MODULE_KINDS)]


def random_string(alphabet: str, length: int) -> str:
    """Return a random string. Test ids need no cryptographic strength."""
    return "".join(random.choices(alphabet, k=length))


@dataclass(eq=False)
class MoodleSession:
    """Server-side state of one MoodleSession cookie."""

    sid: str
    sesskey: str = field(
        default_factory=lambda: random_string(TOKEN_ALPHABET, SESSKEY_LENGTH)
    )
    user: SiteUser | None = None
    login_token: str | None = None
    wants_url: str | None = None
    # Set when the browser sent a cookie of no stored session, so that the next
    # login page reports a timed-out session.
    timed_out: bool = False
    login_error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    in_flight: int = 0
    max_in_flight: int = 0


class Template:
    """Page markup with named slots, so a request only joins precomputed strings."""

    def __init__(self, text: str) -> None:
        self.pieces = text.split(SLOT)

    def render(self, values: dict[str, str]) -> bytes:
        pieces = self.pieces.copy()
        for index in range(1, len(pieces), 2):
            pieces[index] = values[pieces[index]]
        return "".join(pieces).encode()


def slot(name: str) -> str:
    return f"{SLOT}{name}{SLOT}"


# ---------------------------------------------------------------------------
# Markup. Written by hand after Moodle 5.1's Boost theme: same ids, classes and
# texts where clients look, much less of everything else.
# ---------------------------------------------------------------------------


def layout(
    *,
    wwwroot: str,
    title: str,
    body_id: str,
    body_class: str,
    main: str,
    logged_in: bool,
    course_id: int = SITE_COURSE_ID,
) -> str:
    """Return a full page with slots for sesskey, userid, initials, logininfo, perf."""
    escaped_root = wwwroot.replace("/", "\\/")
    head_title = f"{title} | {SITE_NAME}" if title else ""
    state = "" if logged_in else " notloggedin"
    host_class = wwwroot.split("//", 1)[1].replace(".", "-").replace(":", "--")
    if logged_in:
        user_menu = (
            f'<div class="usermenu"><div class="dropdown show">'
            f'<a href="#" role="button" id="user-menu-toggle" data-bs-toggle="dropdown"'
            f' aria-label="User menu" aria-haspopup="true" class="btn dropdown-toggle">'
            f'<span class="userbutton"><span class="avatars"><span class="avatar'
            f' current"><span class="userinitials size-35">{slot("initials")}'
            f'</span></span></span></span></a><div class="dropdown-menu'
            f' dropdown-menu-end" id="user-action-menu" role="menu">'
            f'<a href="{wwwroot}/user/profile.php" class="dropdown-item"'
            f' role="menuitem">Profile</a><a href="{wwwroot}/grade/report/overview/'
            f'index.php" class="dropdown-item" role="menuitem">Grades</a>'
            f'<a href="{wwwroot}/user/preferences.php" class="dropdown-item"'
            f' role="menuitem">Preferences</a><div class="dropdown-divider"></div>'
            f'<a href="{wwwroot}/login/logout.php?sesskey={slot("sesskey")}"'
            f' class="dropdown-item" role="menuitem">Log out</a></div></div></div>'
        )
        user_id = slot("userid")
    else:
        user_menu = (
            f'<div class="d-flex align-items-stretch usermenu-container"'
            f' data-region="usermenu"><div class="usermenu"><span class="login ps-2">'
            f'<a href="{wwwroot}/login/index.php">Log in</a></span></div></div>'
        )
        user_id = "0"
    m_cfg = (
        f'M.cfg = {{"wwwroot":"{escaped_root}","apibase":"{escaped_root}\\/r.php'
        f'\\/api","homeurl":{{}},"sesskey":"{slot("sesskey")}","sessiontimeout":'
        '"28800","sessiontimeoutwarning":"1200","themerev":"1796382297",'
        '"slasharguments":1,"theme":"boost","iconsystemmodule":"core\\/icon_system'
        '_fontawesome","jsrev":"1796382297","admin":"admin","svgicons":true,'
        '"usertimezone":"Europe\\/London","language":"en",'
        f'"courseId":{course_id},"courseContextId":2,"contextid":1,'
        '"contextInstanceId":0,"langrev":1796382304,"templaterev":"1796382297",'
        f'"siteId":1,"userId":{user_id}}};'
    )
    # Trailing backslashes keep each tag on one line of output, as Moodle prints it.
    return f"""<!DOCTYPE html>

<html  dir="ltr" lang="en" xml:lang="en">
<head>
    <title>{escape(head_title)}</title>
    <link rel="shortcut icon" \
href="{wwwroot}/theme/image.php/boost/theme/1796382297/favicon" />
<meta http-equiv="Content-Type" content="text/html; charset=utf-8" />
<meta name="keywords" content="moodle, {escape(head_title)}" />
<link rel="stylesheet" type="text/css" \
href="{wwwroot}/theme/yui_combo.php?rollup/3.18.1/yui-moodlesimple-min.css" />\
<link rel="stylesheet" type="text/css" \
href="{wwwroot}/theme/styles.php/boost/1796382297_1/all" />
<script>
//<![CDATA[
var M = {{}}; M.yui = {{}};
M.pageloadstarttime = new Date();
{m_cfg}
//]]>
</script>
    <meta name="viewport" content="width=device-width, initial-scale=1.0">
</head>
<body  id="{body_id}" class="{body_class} dir-ltr lang-en yui-skin-sam \
yui3-skin-sam {host_class} course-{course_id} context-1{state} theme uses-drawers">
<div class="toast-wrapper mx-auto py-0 fixed-top" role="status" \
aria-live="polite"></div>
<div id="page-wrapper" class="d-print-block">
    <div>
    <a class="visually-hidden-focusable" href="#maincontent">Skip to main content</a>
</div>
<script src="{wwwroot}/lib/javascript.php/1796382297/lib/polyfills/polyfill.js">\
</script>
<script src="{wwwroot}/theme/yui_combo.php?rollup/3.18.1/yui-moodlesimple-min.js">\
</script>
<script src="{wwwroot}/lib/javascript.php/1796382297/lib/javascript-static.js">\
</script>
    <nav class="navbar fixed-top bg-body navbar-expand" aria-label="Site navigation">
        <div class="container-fluid">
            <a href="{wwwroot}/" \
class="navbar-brand d-none d-md-flex align-items-center m-0 me-4 p-0 aabtn">\
{SITE_NAME}</a>
            <div class="primary-navigation">
                <nav class="moremenu navigation">
                    <ul id="moremenu-main" role="menubar" \
class="nav more-nav navbar-nav">
                        <li data-key="home" class="nav-item" role="none">\
<a role="menuitem" class="nav-link" href="{wwwroot}/" tabindex="-1">Home</a></li>
                        <li data-key="myhome" class="nav-item" role="none">\
<a role="menuitem" class="nav-link" href="{wwwroot}/my/" tabindex="-1">\
Dashboard</a></li>
                        <li data-key="mycourses" class="nav-item" role="none">\
<a role="menuitem" class="nav-link" href="{wwwroot}/my/courses.php" tabindex="-1">\
My courses</a></li>
                    </ul>
                </nav>
            </div>
            <div id="usernavigation" class="navbar-nav ms-auto h-100">
                {user_menu}
            </div>
        </div>
    </nav>
    <div id="page" data-region="mainpage" data-usertour="scroller" \
class="drawers show-drawer-left drag-container">
        <div id="topofscroll" class="main-inner">
            <div class="drawer-toggles d-flex"></div>
            <header id="page-header" class="header-maxwidth d-print-none">
                <div class="w-100"><div class="d-flex align-items-center">\
<div class="me-auto"><div class="page-context-header d-flex align-items-center mb-2">\
<div class="page-header-headings"><h1 class="h2 mb-0">\
{escape(title or SITE_NAME)}</h1></div></div></div></div></div>
            </header>
            <div id="page-content" class="pb-3 d-print-block">
                <div id="region-main-box">
                    <section id="region-main" aria-label="Content">
                        <span class="notifications" id="user-notifications"></span>
                        <div role="main"><span id="maincontent"></span>{main}</div>
                    </section>
                </div>
            </div>
        </div>
        <footer id="page-footer" class="footer-popover bg-white">
            <div data-region="footer-container-popover">
                <button class="btn btn-icon bg-secondary icon-no-margin \
btn-footer-popover" data-action="footer-popover" aria-label="Show footer">\
<i class="icon fa fa-question fa-fw " aria-hidden="true"></i></button>
            </div>
            <div class="footer-content-popover container" \
data-region="footer-content-popover">
                <div class="footer-section p-3 border-bottom">\
<div class="logininfo">{slot("logininfo")}</div></div>
                <div class="footer-section p-3 border-bottom">\
<a href="{wwwroot}/admin/tool/dataprivacy/summary.php">Data retention summary</a>\
</div>
                <div class="footer-section p-3"><div>Powered by \
<a href="https://moodle.com">Moodle</a></div></div>
            </div>
            <div class="footer-content-debugging footer-dark bg-dark text-light">
                <div class="container-fluid footer-dark-inner">
                    {slot("perf")}
                </div>
            </div>
        </footer>
    </div>
</div>
<script>
//<![CDATA[
var require = {{ baseUrl : '{escaped_root}\\/lib\\/requirejs.php\\/1796382297\\/', \
enforceDefine: true, skipDataMain: true, waitSeconds : 0 }};
M.util.js_pending('core/first');
require(['core/first'], function() {{ M.util.js_complete('core/first'); }});
//]]>
</script>
</body></html>
"""


def login_main(wwwroot: str, *, error: bool, heading: str = "") -> str:
    """Return the login box; `error` adds the alert and #loginerrormessage."""
    token = slot("logintoken")
    alert = ""
    if error:
        alert = (
            f'        <a href="#" id="loginerrormessage" class="visually-hidden">'
            f'{slot("error")}</a>\n'
            f'        <div class="alert alert-danger" role="alert">{slot("error")}'
            f"</div>\n"
        )
    if heading:
        heading = (
            f'<h2>{escape(heading)}</h2><div class="box py-3 generalbox'
            f' boxaligncenter"><p>An email should have been sent to your address.'
            f" It contains easy instructions to complete your registration.</p></div>"
        )
    # Trailing backslashes keep Moodle's one-line tags intact in the output.
    return f"""{heading}<div class="container-fluid h-100"><div class="row h-100">
<div class="col-12 col-md-6 col-xl-4 mx-auto">
<div class="loginform">
    <div class="login-heading mb-4"><h2 class="h3">Log in to {SITE_NAME}</h2></div>
{alert}        <form class="login-form" action="{wwwroot}/login/index.php" \
method="post" id="login">
            <input id="anchor" type="hidden" name="anchor" value="">
            <script>document.getElementById('anchor').value = location.hash;</script>
            <input type="hidden" name="logintoken" value="{token}">
            <div class="login-form-username mb-3">
                <label for="username" class="visually-hidden">Username</label>
                <input type="text" name="username" id="username" \
class="form-control form-control-lg" value="" placeholder="Username" \
autocomplete="username">
            </div>
            <div class="login-form-password mb-3">
                <label for="password" class="visually-hidden">Password</label>
                <input type="password" name="password" id="password" value="" \
class="form-control form-control-lg" placeholder="Password" \
autocomplete="current-password">
            </div>
            <div class="login-form-submit mb-3">
                <button class="btn btn-primary btn-lg" type="submit" \
id="loginbtn">Log in</button>
            </div>
            <div class="login-form-forgotpassword mb-3">
                <a href="{wwwroot}/login/forgot_password.php">Lost password?</a>
            </div>
        </form>
    <div class="login-divider"></div>
    <div class="login-instructions mb-3"><h2 class="login-heading">Some courses \
may allow guest access</h2>
        <form action="{wwwroot}/login/index.php" method="post" id="guestlogin">
            <input type="hidden" name="logintoken" value="{token}">
            <input type="hidden" name="username" value="guest" />
            <input type="hidden" name="password" value="guest" />
            <button class="btn btn-secondary" type="submit" \
id="loginguestbtn">Access as a guest</button>
        </form>
    </div>
    <div class="d-flex"><button type="button" class="btn btn-secondary" \
data-modal="alert" data-modal-title-str='["cookiesenabled", "core"]' \
data-modal-content-str='["cookiesenabled_help_html", "core"]'>Cookies notice\
</button></div>
</div></div></div></div>
"""


def fatal_error_main(wwwroot: str, message: str, code: str) -> str:
    return (
        f'<div data-rel="fatalerror" class="box py-3 errorbox alert alert-danger">'
        f'<p class="errormessage">{escape(message)}</p><p class="errorcode">'
        f'<a href="https://docs.moodle.org/501/en/error/moodle/{code}">More'
        f" information about this error</a></p></div><div class=\"continuebutton\">"
        f'<form method="get" action="{wwwroot}/"><button type="submit"'
        f' class="btn btn-primary">Continue</button></form></div>'
    )


def alert_main(message: str) -> str:
    return (
        '<div class="alert alert-danger alert-block fade in  alert-dismissible"'
        f'  role="alert" data-aria-autofocus="true">\n    {escape(message)}\n'
        '    <button type="button" class="btn-close" data-bs-dismiss="alert">\n'
        '        <span class="visually-hidden">Dismiss this notification</span>\n'
        "    </button>\n</div>"
    )


def course_name(course_id: int) -> str:
    size = "XS" if course_id in NOT_ENROLLED_COURSES else "S"
    return f"Test course: {size}"


def course_main(wwwroot: str, course_id: int) -> str:
    """Return the topics of a course with a link to each of its modules."""
    cmids = list(course_modules(course_id))
    sections: list[str] = []
    per_section = 8
    for number, first in enumerate(range(0, len(cmids), per_section), start=1):
        items = []
        for cmid in cmids[first:first + per_section]:
            kind = module_kind(cmid)
            items.append(
                f'<li class="activity {kind} modtype_{kind}" id="module-{cmid}"'
                f' data-id="{cmid}"><div class="activityname"><a href="{wwwroot}'
                f'/mod/{kind}/view.php?id={cmid}" class="aalink"><span'
                f' class="instancename">Test {kind} {cmid}</span></a></div></li>'
            )
        sections.append(
            f'<li id="section-{number}" class="section course-section main clearfix"'
            f' role="region" data-sectionid="{number}" data-for="section">'
            f'<div class="course-section-header d-flex" data-for="section_title">'
            f'<h3 class="sectionname">Topic {number}</h3></div>'
            f'<div class="content"><ul class="section m-0 p-0 img-text d-block"'
            f' data-for="cmlist">{"".join(items)}</ul></div></li>'
        )
    return (
        f'<div class="course-content"><ul class="topics">{"".join(sections)}</ul>'
        f"</div>"
    )


def forum_main(wwwroot: str, cmid: int) -> str:
    rows = []
    for number in range(1, 16):
        rows.append(
            f'<tr class="discussion" data-region="discussion-list-item">'
            f'<th class="topic p-0 align-middle" scope="row"><a href="{wwwroot}'
            f'/mod/forum/discuss.php?d={cmid * 100 + number}" class="w-100 h-100'
            f' d-block">Discussion {number} of forum {cmid}</a></th>'
            f'<td class="author align-middle">Admin User</td><td class="text-center'
            f' align-middle">{number % 7}</td><td class="text-start align-middle">'
            f"4 Dec 2026</td></tr>"
        )
    return (
        f'<h2>Forum {cmid}</h2><div id="intro" class="box py-3 generalbox">'
        f"<p>General discussion for this course.</p></div>"
        f'<div data-region="discussion-list-container"><table class="table'
        f' discussion-list"><thead><tr><th scope="col">Discussion</th>'
        f'<th scope="col">Started by</th><th scope="col">Replies</th>'
        f'<th scope="col">Last post</th></tr></thead><tbody>{"".join(rows)}'
        f"</tbody></table></div>"
    )


def dashboard_main(wwwroot: str) -> str:
    cards = []
    for course_id in ENROLLED_COURSES:
        cards.append(
            f'<div class="card dashboard-card" role="listitem" data-region='
            f'"course-content" data-course-id="{course_id}"><div class="card-body">'
            f'<a href="{wwwroot}/course/view.php?id={course_id}" class="aalink'
            f' coursename">{course_name(course_id)}</a><div class="text-muted">'
            f"Miscellaneous</div></div></div>"
        )
    return (
        f'<section class="block_timeline block card mb-3" role="complementary">'
        f'<div class="card-body"><h5 class="card-title">Timeline</h5>'
        f'<div class="text-center">No activities require action</div></div></section>'
        f'<section class="block_recentlyaccessedcourses block card mb-3">'
        f'<div class="card-body"><h5 class="card-title">Recently accessed courses'
        f'</h5><div class="card-deck dashboard-card-deck" role="list">'
        f'{"".join(cards)}</div></div></section>'
    )


def profile_main(wwwroot: str, user: SiteUser) -> str:
    return (
        f'<div class="userprofile"><div class="profile_tree"><section class="node_'
        f'category card d-inline-block w-100 mb-3"><div class="card-body"><h3 class='
        f'"lead">User details</h3><ul><li class="contentnode"><dl><dt>Email address'
        f"</dt><dd>{escape(user.username)}@example.com</dd></dl></li></ul></div>"
        f'</section><section class="node_category card d-inline-block w-100 mb-3">'
        f'<div class="card-body"><h3 class="lead">Course details</h3><ul><li class='
        f'"contentnode"><dl><dt>Course profiles</dt><dd><ul>'
        + "".join(
            f'<li><a href="{wwwroot}/user/view.php?id={user.id}&amp;course='
            f'{course_id}">{course_name(course_id)}</a></li>'
            for course_id in ENROLLED_COURSES
        )
        + "</ul></dd></dl></li></ul></div></section></div></div>"
    )


def enrol_main(wwwroot: str, course_id: int) -> str:
    return (
        f'<h2>Enrolment options</h2><div class="box py-3 generalbox info"><div class='
        f'"coursebox clearfix" data-courseid="{course_id}" data-type="1"><div class='
        f'"info"><h3 class="coursename"><a class="aalink" href="{wwwroot}/course/'
        f'view.php?id={course_id}">{course_name(course_id)}</a></h3></div><div class='
        f'"content"><div class="summary"><div class="no-overflow">Test course '
        f"{course_id - 1}</div></div><ul class=\"teachers\"><li><span class=\"fw-bold"
        f'">Teacher: </span><a href="{wwwroot}/user/profile.php?id=2">Admin User</a>'
        f'</li></ul></div></div></div><div class="box py-3 generalbox"><div class='
        f'"alert alert-info alert-block fade in" role="alert">\n        You cannot'
        f" enrol yourself in this course.\n</div></div>"
    )


def confirm_main(wwwroot: str, message: str, yes_url: str, no_url: str) -> str:
    return (
        f'<div role="alertdialog" aria-labelledby="modal-header" aria-describedby='
        f'"modal-body" aria-modal="true" id="notice" class="box py-3 generalbox modal'
        f' modal-dialog modal-in-page show"><div id="modal-content" class="box py-3'
        f' modal-content"><div id="modal-header" class="box py-3 modal-header px-3">'
        f'<h4>Confirm</h4></div><div role="main" id="modal-body" class="box py-3'
        f' modal-body"><p>{escape(message)}</p></div><div id="modal-footer" class="box'
        f' py-3 modal-footer"><div class="buttons"><form method="get" action="'
        f'{no_url}"><button type="submit" class="btn btn-secondary">Cancel</button>'
        f'</form><form method="post" action="{yes_url}"><button type="submit" class='
        f'"btn btn-primary">Continue</button></form></div></div></div></div>'
    )


def change_password_main(wwwroot: str, forced: bool) -> str:
    alert = alert_main(MSG_FORCED_CHANGE) if forced else ""
    return (
        f'{alert}<form autocomplete="off" action="{wwwroot}/login/change_password.php"'
        f' method="post" accept-charset="utf-8" id="mform1" class="mform"><input'
        f' name="id" type="hidden" value="1"><input name="sesskey" type="hidden"'
        f' value="{slot("sesskey")}"><fieldset class="hidden"><div class="form-group'
        f' row fitem"><label for="id_password">Current password</label><input'
        f' type="password" class="form-control" name="password" id="id_password">'
        f'</div><div class="form-group row fitem"><label for="id_newpassword1">New'
        f' password</label><input type="password" class="form-control" name='
        f'"newpassword1" id="id_newpassword1"></div><div class="form-group row fitem">'
        f'<label for="id_newpassword2">New password (again)</label><input type='
        f'"password" class="form-control" name="newpassword2" id="id_newpassword2">'
        f'</div></fieldset><input type="submit" class="btn btn-primary" name='
        f'"submitbutton" id="id_submitbutton" value="Save changes"></form>'
    )


def redirect_body(location: str) -> bytes:
    """Return Moodle's small "Redirect" page that accompanies every 303."""
    url = escape(location)
    return (
        '<!DOCTYPE html>\n<html  lang="en" xml:lang="en">\n    <head>\n'
        '        <meta http-equiv="Content-Type" content="text/html; charset=utf-8"'
        " />\n                <title>Redirect</title>\n    </head>\n    <body>\n"
        '        <div id="page">\n            <div id="region-main">\n'
        "                <h1>Redirect</h1>\n"
        '                <div style="margin-top: 3em; margin-left:auto;'
        ' margin-right:auto; text-align:center;">This page should automatically'
        " redirect. If nothing is happening please use the continue link below.<br />"
        f'<a href="{url}">Continue</a></div>            </div>\n        </div>\n'
        "    </body>\n</html>\n"
    ).encode()


ROUTER_404_BODY = (
    b'<!doctype html><html lang="en">    <head>        <meta charset="utf-8">'
    b'        <meta name="viewport" content="width=device-width, initial-scale=1">'
    b"        <title>404 Not Found</title>    </head>    <body>"
    b"        <h1>404 Not Found</h1>        <div><p>The requested resource could not"
    b" be found. Please verify the URI and try again.</p></div>"
    b'        <a href="#" onclick="window.history.go(-1)">Go Back</a>    </body></html>'
)


# ---------------------------------------------------------------------------
# Performance footer, in the markup of Moodle 5.1's performance_info() with its
# mixed quoting (some items use single quotes).
# ---------------------------------------------------------------------------


def perf_footer(figures: dict[str, float], session_wait: str) -> str:
    """Return the footer block; `session_wait` is the formatted seconds or a slot."""
    ram = figures["ram_mb"]
    # A POSIX clock tick is 10 ms. The user/system split approximates the recording.
    ticks = max(1, round(figures["time_s"] * 100))
    user_ticks = round(ticks * 0.6)
    sys_ticks = round(ticks * 0.15)
    return (
        '<div class="performanceinfo siteinfo container-fluid px-md-0 overflow-auto'
        ' pt-3"><ul class="list-unstyled row mx-md-0">'
        f'<li class="timeused col-sm-4">{figures["time_s"]:.6f} secs</li> '
        f'<li class="memoryused col-sm-4">RAM: {ram:.1f}{NBSP}MB</li> '
        f'<li class="memoryused col-sm-4">RAM peak: {ram + 1:.1f}{NBSP}MB</li> </ul>'
        '<ul class="list-unstyled row mx-md-0">'
        f'<li class="included col-sm-4">Included {int(figures["included"])} files'
        "</li> <li class='contextswithfilters col-sm-4'>Contexts for which filters"
        " were loaded: 0 </li> <li class='filterscreated col-sm-4'>Filters created:"
        " 6 </li> <li class='textsfiltered col-sm-4'>Pieces of content filtered: 0"
        " </li> <li class='stringsfiltered col-sm-4'>Strings filtered: 0 </li> "
        "<li class='langcountgetstring col-sm-4'>get_string calls: "
        f"{int(figures['get_string'])} </li> "
        f'<li class="dbqueries col-sm-4">DB reads/writes: {int(figures["db_reads"])}'
        f'/{int(figures["db_writes"])}</li> '
        f'<li class="dbtime col-sm-4">DB queries time: {figures["db_time_s"]:.5f}'
        " secs</li> "
        f'<li class="posixtimes col-sm-4">ticks: {ticks} user: {user_ticks}sys:'
        f" {sys_ticks} cuser: 0 csys: 0</li>"
        ' <li class="serverload col-sm-4">Load average: 0.08</li> '
        '<li class="serverload col-sm-4"><div class="sessionsize">Session'
        f" (core\\session\\file): 4.7{NBSP}KB</div></li>"
        f'<li class="sessionwait col-sm-4">Session wait: {session_wait} secs</li></ul>'
        '<div class="table-responsive"><table class="cachesused table table-dark'
        ' table-sm w-auto table-bordered">\n<thead>\n<tr>\n'
        '<th class="header c0" style="text-align:left;" scope="col">Mode</th>\n'
        '<th class="header c1" style="text-align:left;" scope="col">Cache item</th>\n'
        '<th class="header c2 lastcol" style="text-align:right;" scope="col">H</th>\n'
        "</tr>\n</thead>\n<tbody><tr class=\"\">\n"
        '<td class="cell c0" style="text-align:left;"> <span title="application'
        ' cache">App</span></td>\n<td class="cell c1" style="text-align:left;">'
        'core/config</td>\n<td class="hihits cell c2 lastcol" style="text-align:'
        'right;">140</td>\n</tr>\n</tbody>\n</table>\n</div></div>'
    )


# ---------------------------------------------------------------------------
# The site
# ---------------------------------------------------------------------------

SESSION_COOKIE = "MoodleSession"
PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Language": "en",
    "Content-Script-Type": "text/javascript",
    "Content-Style-Type": "text/css",
    "X-UA-Compatible": "IE=edge",
    "Cache-Control": "private, pre-check=0, post-check=0, max-age=0, no-transform",
    "Pragma": "no-cache",
    "Expires": "",
    "Accept-Ranges": "none",
    "X-Frame-Options": "sameorigin",
}
LOGIN_PAGE_HEADERS = {
    **PAGE_HEADERS,
    "Cache-Control": "no-store, no-cache, must-revalidate, no-transform",
    "Expires": "Mon, 20 Aug 1969 09:23:00 GMT",
}
REDIRECT_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Expires": "Thu, 19 Nov 1981 08:52:00 GMT",
    "Cache-Control": "no-store, no-cache, must-revalidate",
    "Pragma": "no-cache",
    "X-Redirect-By": "Moodle",
    "Content-Language": "en",
}
ROUTER_HEADERS = {"Content-Type": "text/html;charset=UTF-8"}
# Moodle's own login plugins that accept a password; "nologin" is the blocking one.
ENABLED_AUTH = frozenset({"manual", "email"})


@dataclass
class RequestContext:
    """One request as the handlers see it: its session and the cookies to set."""

    request: web.Request
    session: MoodleSession | None
    sent_cookie: bool
    session_wait_s: float = 0.0
    set_cookies: list[str] = field(default_factory=list)


Handler = Callable[[RequestContext], Awaitable[web.Response]]


class MoodleSite:
    """An aiohttp application that responds like the recorded Moodle 5.1 site.

    Every request that carries a known session cookie holds that session's lock for
    its whole duration, as Moodle's file session handler does, and the site records
    how many requests were in flight on one session at once.
    """

    def __init__(
        self,
        users: list[SiteUser] | None = None,
        *,
        host: str = "127.0.0.1",
        perf_footer: bool = False,
        page_delay_s: float = 0.0,
    ) -> None:
        self.users = users if users is not None else default_users()
        self._users_by_name = {user.username: user for user in self.users}
        self._users_by_id = {user.id: user for user in self.users}

        self.host = host
        self.perf_footer = perf_footer
        self.page_delay_s = page_delay_s
        self.base_url = ""
        self._netloc = ""
        self._sessions: dict[str, MoodleSession] = {}
        self._templates: dict[tuple[Any, ...], Template] = {}
        self._perf_overrides: dict[str | None, dict[str, float]] = {}
        self._perf_cache: dict[tuple[str, str], list[str]] = {}
        self._stall_s = 0.0
        self._stall_count = 0
        self._runner: web.AppRunner | None = None

        # Observations for tests.
        self.max_in_flight_per_session = 0
        self.logins: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self.stall_started = asyncio.Event()

        self._routes: dict[str, Handler] = {
            "/": self._site_home,
            "/index.php": self._site_home,
            "/login/index.php": self._login,
            "/login/logout.php": self._logout,
            "/login/change_password.php": self._change_password,
            "/my/": self._dashboard,
            "/my/index.php": self._dashboard,
            "/course/view.php": self._course_view,
            "/mod/forum/view.php": self._forum_view,
            "/user/profile.php": self._profile,
            "/enrol/index.php": self._enrol,
        }
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)

    # -- lifecycle -----------------------------------------------------------

    async def start(self, port: int = 0) -> str:
        """Listen on host:port (port 0 picks a free one) and return the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._netloc = f"{host}:{bound_port}"
        self.base_url = f"http://{self._netloc}"
        return self.base_url

    async def close(self) -> None:
        """Stop listening and close open connections; the site can start again."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- knobs for tests -----------------------------------------------------

    def stall(self, seconds: float, count: int = 1) -> None:
        """Make the next `count` logged-in page requests sleep `seconds`.

        The sleep happens while the request holds its session lock, like a slow
        Moodle page. Login and logout requests are not stalled. `stall_started` is
        set when a stalled request begins to sleep.
        """
        self._stall_s = seconds
        self._stall_count = count
        self.stall_started.clear()

    def expire_sessions(self, username: str | None = None) -> None:
        """Drop the sessions of one user, or all: their cookies count as timed out."""
        for sid, session in list(self._sessions.items()):
            if username is None or (session.user and session.user.username == username):
                del self._sessions[sid]

    def set_perf(self, path: str | None, **figures: float) -> None:
        """Set performance footer figures for pages under `path` (None: all pages).

        Accepted figures: time_s, ram_mb, included, db_reads, db_writes, db_time_s,
        get_string and session_wait_s. Without session_wait_s the footer shows the
        time the request waited for its session lock. Calling this turns the footer
        on.
        """
        unknown = set(figures) - PERF_FIGURES
        if unknown:
            raise ValueError(
                f"unknown performance figures {sorted(unknown)}; "
                f"expected some of {sorted(PERF_FIGURES)}"
            )
        self._perf_overrides.setdefault(path, {}).update(figures)
        self._perf_cache.clear()
        self.perf_footer = True

    # -- request plumbing ----------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests[path] += 1
        if request.host != self._netloc:
            # Moodle sends every request for another host name to its wwwroot.
            return self._redirect_response(self.base_url + request.path_qs, [])
        route = self._routes.get(path)
        if route is None:
            return web.Response(
                status=404, body=ROUTER_404_BODY, headers=ROUTER_HEADERS
            )
        sid = request.cookies.get(SESSION_COOKIE)
        session = self._sessions.get(sid) if sid else None
        ctx = RequestContext(request, session, sent_cookie=bool(sid))
        if session is None:
            return await route(ctx)
        return await self._run_locked(ctx, session, route)

    async def _run_locked(
        self, ctx: RequestContext, session: MoodleSession, route: Handler
    ) -> web.StreamResponse:
        session.in_flight += 1
        session.max_in_flight = max(session.max_in_flight, session.in_flight)
        self.max_in_flight_per_session = max(
            self.max_in_flight_per_session, session.in_flight
        )
        started = time.monotonic()
        try:
            async with session.lock:
                ctx.session_wait_s = time.monotonic() - started
                if self._sessions.get(session.sid) is not session:
                    # Logged out, regenerated or expired while this request waited.
                    ctx.session = None
                return await route(ctx)
        finally:
            session.in_flight -= 1

    def _new_session(
        self, ctx: RequestContext, user: SiteUser | None = None
    ) -> MoodleSession:
        sid = random_string(SESSION_ID_ALPHABET, SESSION_ID_LENGTH)
        session = MoodleSession(sid, user=user)
        self._sessions[sid] = session
        ctx.set_cookies.append(f"{SESSION_COOKIE}={sid}; path=/; HttpOnly")
        ctx.session = session
        return session

    def _ensure_session(self, ctx: RequestContext) -> MoodleSession:
        """Return the request's session, starting one if the cookie was unknown."""
        if ctx.session is not None:
            return ctx.session
        session = self._new_session(ctx)
        # A cookie the site does not know is a session that timed out.
        session.timed_out = ctx.sent_cookie
        return session

    def _redirect(self, ctx: RequestContext, url: str) -> web.Response:
        if url.startswith("/"):
            url = self.base_url + url
        return self._redirect_response(url, ctx.set_cookies)

    @staticmethod
    def _redirect_response(url: str, cookies: list[str]) -> web.Response:
        response = web.Response(
            status=303, body=redirect_body(url), headers=REDIRECT_HEADERS
        )
        for cookie in cookies:
            response.headers.add("Set-Cookie", cookie)
        response.headers["Location"] = url
        return response

    async def _require_login(self, ctx: RequestContext) -> web.Response | None:
        """Return Moodle's redirect for a visitor who may not see the page, else None.

        On success this also applies the page delay and any pending stall, so that
        they happen while the request holds its session lock.
        """
        session = ctx.session
        if session is None or session.user is None:
            session = self._ensure_session(ctx)
            session.wants_url = self.base_url + ctx.request.path_qs
            return self._redirect(ctx, "/login/index.php")
        forced = session.user.force_password_change
        if forced and ctx.request.path != "/login/change_password.php":
            return self._redirect(ctx, "/login/change_password.php")
        if self._stall_count > 0:
            self._stall_count -= 1
            self.stall_started.set()
            await asyncio.sleep(self._stall_s)
        if self.page_delay_s > 0:
            await asyncio.sleep(self.page_delay_s)
        return None

    def _may_view_course(self, user: SiteUser, course_id: int) -> bool:
        if course_id in ENROLLED_COURSES:
            return True
        return course_id in NOT_ENROLLED_COURSES and user.id in SITE_ADMIN_IDS

    # -- rendering -------------------------------------------------------------

    def _template(self, key: tuple[Any, ...], build: Callable[[], str]) -> Template:
        template = self._templates.get(key)
        if template is None:
            template = Template(build())
            self._templates[key] = template
        return template

    def _perf(self, path: str, kind: str, wait_s: float) -> str:
        if not self.perf_footer:
            return ""
        pieces = self._perf_cache.get((path, kind))
        if pieces is None:
            figures: dict[str, float] = dict(DEFAULT_PERF[kind])
            prefixes = sorted(
                self._perf_overrides, key=lambda p: -1 if p is None else len(p)
            )
            for prefix in prefixes:
                if prefix is None or path.startswith(prefix):
                    figures.update(self._perf_overrides[prefix])
            fixed_wait = figures.get("session_wait_s")
            wait_text = SLOT if fixed_wait is None else f"{fixed_wait:.3f}"
            pieces = perf_footer(figures, wait_text).split(SLOT)
            self._perf_cache[(path, kind)] = pieces
        if len(pieces) == 1:
            return pieces[0]
        return f"{pieces[0]}{wait_s:.3f}{pieces[1]}"

    def _page(
        self,
        ctx: RequestContext,
        key: tuple[Any, ...],
        build: Callable[[], str],
        *,
        perf_kind: str = "other",
        status: int = 200,
        extra: dict[str, str] | None = None,
        headers: dict[str, str] = PAGE_HEADERS,
    ) -> web.Response:
        session = self._ensure_session(ctx)
        user = session.user
        template = self._template((*key, user is not None), build)
        root = self.base_url
        if user is None:
            login_info = (
                f'You are not logged in. (<a href="{root}/login/index.php">Log in</a>)'
            )
            initials = ""
        else:
            name = escape(full_name(user))
            login_info = (
                f'You are logged in as <a href="{root}/user/profile.php?id={user.id}"'
                f' title="View profile">{name}</a> (<a href="{root}/login/logout.php'
                f'?sesskey={session.sesskey}">Log out</a>)'
            )
            initials = "".join(part[:1] for part in name.split()[:2])
        values = {
            "sesskey": session.sesskey,
            "userid": str(user.id if user else 0),
            "initials": initials,
            "logininfo": login_info,
            "perf": self._perf(ctx.request.path, perf_kind, ctx.session_wait_s),
        }
        if extra:
            values.update(extra)
        response = web.Response(
            status=status, body=template.render(values), headers=headers
        )
        for cookie in ctx.set_cookies:
            response.headers.add("Set-Cookie", cookie)
        return response

    def _fatal_error(
        self, ctx: RequestContext, message: str, code: str
    ) -> web.Response:
        def build() -> str:
            return layout(
                wwwroot=self.base_url, title="Error", body_id="page-site-index",
                body_class="format-site course path-site pagelayout-base",
                main=fatal_error_main(self.base_url, message, code),
                logged_in=bool(ctx.session and ctx.session.user),
            )

        return self._page(ctx, ("error", message), build, status=404)

    def _login_page(
        self, ctx: RequestContext, error: str | None, heading: str = ""
    ) -> web.Response:
        session = self._ensure_session(ctx)
        if session.login_token is None:
            session.login_token = random_string(TOKEN_ALPHABET, LOGIN_TOKEN_LENGTH)
        title = heading or "Log in to the site"

        def build() -> str:
            return layout(
                wwwroot=self.base_url, title=title, body_id="page-login-index",
                body_class="format-site  path-login pagelayout-login",
                main=login_main(
                    self.base_url, error=error is not None, heading=heading
                ),
                logged_in=False,
            )

        extra = {"logintoken": session.login_token, "error": escape(error or "")}
        return self._page(
            ctx, ("login", error is not None, heading), build, perf_kind="login",
            extra=extra, headers=LOGIN_PAGE_HEADERS,
        )

    # -- handlers ----------------------------------------------------------------

    async def _login(self, ctx: RequestContext) -> web.Response:
        if ctx.request.method == "POST":
            return await self._login_post(ctx)
        query = ctx.request.query
        session = ctx.session
        if "testsession" in query:
            user = session.user if session else None
            if session and user and query["testsession"] == str(user.id):
                target = session.wants_url or self.base_url + "/my/"
                session.wants_url = None
                return self._redirect(ctx, target)
        session = self._ensure_session(ctx)
        if session.timed_out:
            session.timed_out = False
            session.login_error = MSG_SESSION_TIMED_OUT
            return self._redirect(ctx, "/login/index.php?loginredirect=1")
        if session.user is not None:
            return self._already_logged_in(ctx, session.user)
        error, session.login_error = session.login_error, None
        return self._login_page(ctx, error)

    async def _login_post(self, ctx: RequestContext) -> web.Response:
        form = await ctx.request.post()
        session = self._ensure_session(ctx)
        session.timed_out = False
        # Login tokens are single use, whatever the outcome.
        expected_token, session.login_token = session.login_token, None
        token = form.get("logintoken")
        username = str(form.get("username", ""))
        password = str(form.get("password", ""))
        user = self._users_by_name.get(username)
        # The reasons are those Moodle writes to the PHP error log.
        if not token or token != expected_token:
            return self._login_failed(ctx, session, username, "Invalid Login Token")
        if user is None:
            return self._login_failed(ctx, session, username, "Unknown user")
        if user.suspended:
            return self._login_failed(ctx, session, username, "Suspended Login")
        if user.auth not in ENABLED_AUTH:
            return self._login_failed(ctx, session, username, "Disabled Login")
        if user.locked:
            log.debug("login rejected for %r: Login lockout", username)
            return self._login_page(ctx, MSG_LOCKED)
        if password != user.password:
            return self._login_failed(ctx, session, username, "Failed Login")
        if not user.confirmed:
            log.debug("login rejected for %r: account not confirmed", username)
            return self._login_page(ctx, None, heading=MSG_MUST_CONFIRM)
        return self._login_succeeded(ctx, session, user)

    def _login_failed(
        self, ctx: RequestContext, session: MoodleSession, username: str, reason: str
    ) -> web.Response:
        log.debug("login rejected for %r: %s", username, reason)
        session.login_error = MSG_INVALID_LOGIN
        return self._redirect(ctx, "/login/index.php?loginredirect=1")

    def _login_succeeded(
        self, ctx: RequestContext, old: MoodleSession, user: SiteUser
    ) -> web.Response:
        # Moodle gives the session a new id at login to prevent session fixation.
        self._sessions.pop(old.sid, None)
        ctx.set_cookies.clear()
        session = self._new_session(ctx, user)
        session.wants_url = old.wants_url
        self.logins[user.username] += 1
        if user.force_password_change:
            return self._redirect(ctx, "/login/change_password.php")
        expires = email.utils.formatdate(
            time.time() + MOODLEID_MAX_AGE_S, usegmt=True
        )
        remembered = random_string(TOKEN_ALPHABET, 86)
        ctx.set_cookies.append(
            "MOODLEID1_=deleted; expires=Thu, 01 Jan 1970 00:00:01 GMT; Max-Age=0;"
            " path=/; HttpOnly"
        )
        ctx.set_cookies.append(
            f"MOODLEID1_=sodium%3A{remembered}%3D%3D; expires={expires};"
            f" Max-Age={MOODLEID_MAX_AGE_S}; path=/; HttpOnly"
        )
        return self._redirect(ctx, f"/login/index.php?testsession={user.id}")

    def _already_logged_in(self, ctx: RequestContext, user: SiteUser) -> web.Response:
        root = self.base_url
        message = f"You are already logged in as {full_name(user)}, you need to log"
        message += " out before logging in as different user."

        def build() -> str:
            yes_url = f"{root}/login/logout.php?sesskey={slot('sesskey')}"
            return layout(
                wwwroot=root, title="Log in to the site", body_id="page-login-index",
                body_class="format-site  path-login pagelayout-login",
                main=confirm_main(root, message, yes_url, f"{root}/"),
                logged_in=True,
            )

        return self._page(ctx, ("already", user.id), build, perf_kind="login")

    async def _logout(self, ctx: RequestContext) -> web.Response:
        session = ctx.session
        if session is None or session.user is None:
            return self._redirect(ctx, "/")
        if ctx.request.query.get("sesskey") == session.sesskey:
            self._sessions.pop(session.sid, None)
            self._new_session(ctx)
            return self._redirect(ctx, "/")
        root = self.base_url

        def build() -> str:
            yes_url = f"{root}/login/logout.php?sesskey={slot('sesskey')}"
            return layout(
                wwwroot=root, title="Log out", body_id="page-login-logout",
                body_class="format-site  path-login pagelayout-base",
                main=confirm_main(root, "Do you really want to log out?", yes_url,
                                  f"{root}/"),
                logged_in=True,
            )

        return self._page(ctx, ("logout",), build)

    async def _change_password(self, ctx: RequestContext) -> web.Response:
        if (redirect := await self._require_login(ctx)) is not None:
            return redirect
        assert ctx.session is not None and ctx.session.user is not None
        forced = ctx.session.user.force_password_change

        def build() -> str:
            return layout(
                wwwroot=self.base_url, title="Change password",
                body_id="page-login-change_password",
                body_class="format-site  path-login pagelayout-admin",
                main=change_password_main(self.base_url, forced), logged_in=True,
            )

        return self._page(ctx, ("change_password", forced), build)

    async def _site_home(self, ctx: RequestContext) -> web.Response:
        session = ctx.session
        logged_in = session is not None and session.user is not None
        # Moodle's default home page for logged-in users is the dashboard.
        if logged_in and ctx.request.query.get("redirect") != "0":
            return self._redirect(ctx, "/my/")

        def build() -> str:
            return layout(
                wwwroot=self.base_url, title="", body_id="page-site-index",
                body_class="limitedwidth format-site course path-site"
                " pagelayout-frontpage",
                main=dashboard_main(self.base_url), logged_in=logged_in,
            )

        return self._page(ctx, ("home",), build)

    async def _dashboard(self, ctx: RequestContext) -> web.Response:
        if (redirect := await self._require_login(ctx)) is not None:
            return redirect

        def build() -> str:
            return layout(
                wwwroot=self.base_url, title="Dashboard", body_id="page-my-index",
                body_class="limitedwidth format-site  path-my pagelayout-mydashboard",
                main=dashboard_main(self.base_url), logged_in=True,
            )

        return self._page(ctx, ("my",), build, perf_kind="my")

    async def _course_view(self, ctx: RequestContext) -> web.Response:
        course_id = int_param(ctx.request, "id")
        if course_id is None:
            return self._fatal_error(
                ctx, "Must specify course id, short name or idnumber", "mustspecify"
            )
        if course_id not in NOT_ENROLLED_COURSES and course_id not in ENROLLED_COURSES:
            if course_id == SITE_COURSE_ID:
                return self._redirect(ctx, "/?redirect=0")
            return self._fatal_error(
                ctx, "Can't find data record in database.", "invalidrecordunknown"
            )
        if (redirect := await self._require_login(ctx)) is not None:
            return redirect
        assert ctx.session is not None and ctx.session.user is not None
        if not self._may_view_course(ctx.session.user, course_id):
            return self._redirect(ctx, f"/enrol/index.php?id={course_id}")

        def build() -> str:
            return layout(
                wwwroot=self.base_url, title=f"Course: {course_name(course_id)}",
                body_id="page-course-view-topics",
                body_class="format-topics limitedwidth  path-course path-course-view"
                " pagelayout-course", course_id=course_id,
                main=course_main(self.base_url, course_id), logged_in=True,
            )

        return self._page(ctx, ("course", course_id), build, perf_kind="course")

    async def _forum_view(self, ctx: RequestContext) -> web.Response:
        cmid = int_param(ctx.request, "id")
        if cmid is None:
            return self._fatal_error(
                ctx, "A required parameter (id) was missing", "missingparam"
            )
        course_id = module_course(cmid)
        if course_id is None or module_kind(cmid) != "forum":
            # NOTE: the recording has only a missing cmid. A module of another
            # type is assumed to get the same missing-forum error.
            return self._fatal_error(
                ctx,
                f"error/Unable to find forum with cmid {cmid}",
                "invalidcoursemodule",
            )
        if (redirect := await self._require_login(ctx)) is not None:
            return redirect
        assert ctx.session is not None and ctx.session.user is not None
        if not self._may_view_course(ctx.session.user, course_id):
            return self._redirect(ctx, f"/enrol/index.php?id={course_id}")

        def build() -> str:
            return layout(
                wwwroot=self.base_url, title="Forum", body_id="page-mod-forum-view",
                body_class="format-topics limitedwidth  path-mod path-mod-forum"
                " pagelayout-incourse", course_id=course_id,
                main=forum_main(self.base_url, cmid), logged_in=True,
            )

        return self._page(ctx, ("forum", cmid), build)

    async def _profile(self, ctx: RequestContext) -> web.Response:
        if (redirect := await self._require_login(ctx)) is not None:
            return redirect
        assert ctx.session is not None and ctx.session.user is not None
        user_id = int_param(ctx.request, "id") or ctx.session.user.id
        user = self._users_by_id.get(user_id)
        if user is None:
            title, main = "", alert_main("Invalid user")
        elif user.username == "guest":
            title = ""
            main = alert_main("The details of this user are not available to you")
        else:
            title = f"{full_name(user)}: Public profile"
            main = profile_main(self.base_url, user)

        def build() -> str:
            return layout(
                wwwroot=self.base_url, title=title, body_id="page-user-profile",
                body_class="format-site  path-user pagelayout-mypublic",
                main=main, logged_in=True,
            )

        key = ("profile", user_id if user else None)
        return self._page(ctx, key, build)

    async def _enrol(self, ctx: RequestContext) -> web.Response:
        course_id = int_param(ctx.request, "id")
        if course_id is None:
            return self._fatal_error(
                ctx, "A required parameter (id) was missing", "missingparam"
            )
        if course_id not in NOT_ENROLLED_COURSES and course_id not in ENROLLED_COURSES:
            return self._fatal_error(
                ctx, "Can't find data record in database.", "invalidrecordunknown"
            )
        if (redirect := await self._require_login(ctx)) is not None:
            return redirect
        assert ctx.session is not None and ctx.session.user is not None
        if self._may_view_course(ctx.session.user, course_id):
            return self._redirect(ctx, f"/course/view.php?id={course_id}")

        def build() -> str:
            return layout(
                wwwroot=self.base_url, title=f"testcourse_{course_id - 1}",
                body_id="page-enrol-index",
                body_class="format-topics limitedwidth  path-enrol pagelayout-incourse",
                course_id=course_id, main=enrol_main(self.base_url, course_id),
                logged_in=True,
            )

        return self._page(ctx, ("enrol", course_id), build)


def int_param(request: web.Request, name: str) -> int | None:
    """Return a query parameter as Moodle's PARAM_INT does (junk is 0), or None."""
    value = request.query.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        return 0


# ---------------------------------------------------------------------------
# pytest fixture and standalone server
# ---------------------------------------------------------------------------

if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def moodle_site() -> AsyncIterator[MoodleSite]:
        """Yield a started site with the default users on a free loopback port."""
        site = MoodleSite()
        await site.start()
        try:
            yield site
        finally:
            await site.close()


def loopback_host(value: str) -> str:
    """Accept only loopback addresses, so the test site is never exposed."""
    try:
        is_loopback = ipaddress.ip_address(value).is_loopback
    except ValueError:
        is_loopback = value == "localhost"
    if not is_loopback:
        raise argparse.ArgumentTypeError(
            f"invalid host {value!r}: use a loopback address such as 127.0.0.1 or ::1"
        )
    return value


def delay_ms(value: str) -> float:
    try:
        delay = float(value)
    except ValueError:
        delay = -1.0
    if not (math.isfinite(delay) and delay >= 0):
        raise argparse.ArgumentTypeError(
            f"invalid delay {value!r}: give milliseconds, 0 or more"
        )
    return delay


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Serve a local site that behaves like Moodle 5.1, for load tests."
    )
    parser.add_argument(
        "--host", type=loopback_host, default="127.0.0.1", metavar="ADDR",
        help="loopback address to listen on, also the site's wwwroot host"
        " (default 127.0.0.1)",
    )
    parser.add_argument(
        "--port", type=int, default=8080, metavar="PORT",
        help="TCP port; 0 picks a free one (default 8080)",
    )
    parser.add_argument(
        "--perf-footer", action="store_true",
        help="end each page with Moodle's performance footer (div.performanceinfo)",
    )
    parser.add_argument(
        "--page-delay-ms", type=delay_ms, default=0.0, metavar="MS",
        help="extra time each logged-in page takes while holding its session lock,"
        " in milliseconds (default 0: no delay)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="also log each rejected login with its reason",
    )
    return parser


async def serve(args: argparse.Namespace) -> int:
    """Run the site until SIGINT or SIGTERM; return the exit code."""
    site = MoodleSite(
        host=args.host, perf_footer=args.perf_footer,
        page_delay_s=args.page_delay_ms / 1000,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        url = await site.start(args.port)
    except OSError as err:
        await site.close()
        log.error(
            "error: could not listen on %s port %s (%s), choose another --port",
            args.host, args.port, err,
        )
        return 1
    log.info("listening on %s", url)
    try:
        await stop.wait()
    finally:
        await site.close()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
