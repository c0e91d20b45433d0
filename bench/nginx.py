"""nginx as the fast static server of the benchmark, from a config in a temp folder.

It listens on 127.0.0.1 only and handles the login like Moodle does, without PHP:
the login page is a static form with a logintoken, the POST gets a 303 to
``/login/index.php?testsession=2`` with a new MoodleSession cookie, and that URL gets a
303 to ``/my/``. The pages are two static files that differ only in Moodle's
performance footer:

- ``/my/`` and ``/course/view.php`` serve ``page.html``, without the footer;
- ``/mod/forum/view.php`` serves ``footer.html``, the same page with the footer block
  that Moodle 5.1 prints when perfdebug is on, just before the page's end.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.procs import (
    SERVER_CPU,
    Processes,
    StepError,
    free_port,
    pinned,
    wait_for_port,
)

# The performance footer block as a Moodle 5.1 site printed it, mixed quoting included.
PERFORMANCE_FOOTER = (
    '<div class="performanceinfo siteinfo container-fluid px-md-0 overflow-auto pt-3">'
    '<ul class="list-unstyled row mx-md-0"><li class="timeused col-sm-4">0.110138 secs'
    '</li> <li class="memoryused col-sm-4">RAM: 7.5 MB</li> '
    '<li class="memoryused col-sm-4">RAM peak: 8.5 MB</li> </ul>'
    '<ul class="list-unstyled row mx-md-0"><li class="included col-sm-4">'
    "Included 618 files</li> <li class='contextswithfilters col-sm-4'>"
    "Contexts for which filters were loaded: 0 </li> "
    '<li class="dbqueries col-sm-4">DB reads/writes: 35/0</li> '
    '<li class="dbtime col-sm-4">DB queries time: 0.01605 secs</li> '
    '<li class="sessionwait col-sm-4">Session wait: 0.000 secs</li></ul></div>'
)

LOGIN_PAGE = """<!DOCTYPE html>
<html dir="ltr" lang="en" xml:lang="en">
<head><title>Log in to the site | Bench</title>
<meta http-equiv="Content-Type" content="text/html; charset=utf-8"></head>
<body id="page-login-index" class="format-site path-login">
<div class="loginform">
<form class="login-form" action="/login/index.php" method="post" id="login">
<input id="anchor" type="hidden" name="anchor" value="">
<input type="hidden" name="logintoken" value="Zm9yYmVuY2htYXJrc29ubHkxMjM0NTY3OA">
<input type="text" name="username" id="username" class="form-control" value="">
<input type="password" name="password" id="password" class="form-control" value="">
<button class="btn btn-primary btn-lg" type="submit" id="loginbtn">Log in</button>
</form></div></body></html>
"""

SECTION = """<li id="section-{n}" class="section course-section main clearfix"
 data-sectionid="{n}" data-for="section"><div class="course-section-header">
<h3 class="sectionname">Topic {n}</h3></div><ul class="section m-0 p-0">
<li class="activity forum modtype_forum" id="module-{n}0"><a class="aalink"
 href="/mod/forum/view.php?id=104">Announcements</a></li></ul></li>
"""

PAGE_TEMPLATE = """<!DOCTYPE html>
<html dir="ltr" lang="en" xml:lang="en">
<head><title>Course: Bench course</title>
<meta http-equiv="Content-Type" content="text/html; charset=utf-8"></head>
<body id="page-course-view-topics" class="format-topics path-course path-course-view">
<div id="page-wrapper" class="d-print-block"><div id="page" class="container-fluid">
<div id="topofscroll" class="main-inner"><div id="page-content">
<div id="region-main-box"><section id="region-main" aria-label="Content">
<ul class="topics">
{sections}</ul></section></div></div></div></div>
<footer id="page-footer" class="footer-popover bg-white">
<div class="footer-content-debugging footer-dark bg-dark text-light">
<div class="container-fluid footer-dark-inner">{footer}</div></div>
<div class="tool_usertours-resettourcontainer"></div>
</footer></div>
<script>M.util.js_pending('core/first');</script>
</body></html>
"""

CONFIG_TEMPLATE = """worker_processes 1;
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    default_type text/html;
    charset utf-8;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    open_file_cache max=16;
    absolute_redirect off;
    server {{
        listen 127.0.0.1:{port};
        root {root}/html;
        location = /login/index.php {{
            if ($request_method = POST) {{
                add_header Set-Cookie "MoodleSession=$request_id; path=/" always;
                return 303 /login/index.php?testsession=2;
            }}
            if ($arg_testsession) {{
                return 303 /my/;
            }}
            add_header Set-Cookie "MoodleSession=$request_id; path=/";
            try_files /login.html =404;
        }}
        location = /my/ {{ try_files /page.html =404; }}
        location = /course/view.php {{ try_files /page.html =404; }}
        location = /mod/forum/view.php {{ try_files /footer.html =404; }}
    }}
}}
"""


@dataclass
class Nginx:
    """A running nginx and what it serves."""

    port: int
    process: subprocess.Popen
    page_bytes: int
    footer_page_bytes: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def page_url(self) -> str:
        return f"{self.base_url}/course/view.php?id=10"


def nginx_version() -> str:
    result = subprocess.run(
        ["nginx", "-v"], capture_output=True, text=True, check=False
    )
    return result.stderr.strip().removeprefix("nginx version: nginx/")


def start_nginx(processes: Processes, root: Path) -> Nginx:
    """Write the config and pages under root and start nginx pinned to SERVER_CPU."""
    if shutil.which("nginx") is None:
        raise StepError("nginx is not installed (Debian: nginx-light or nginx)")
    html = root / "html"
    (root / "tmp").mkdir(parents=True)
    html.mkdir()
    sections = "".join(SECTION.format(n=n) for n in range(1, 9))
    page = PAGE_TEMPLATE.format(sections=sections, footer="")
    footer_page = PAGE_TEMPLATE.format(sections=sections, footer=PERFORMANCE_FOOTER)
    (html / "login.html").write_text(LOGIN_PAGE)
    (html / "page.html").write_text(page)
    (html / "footer.html").write_text(footer_page)
    # The worker runs as nobody: it needs to read the pages and walk the folders, so
    # the folders above root must be world-searchable too.
    for path in [root, html, *html.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    config = root / "nginx.conf"
    config.write_text(CONFIG_TEMPLATE.format(root=root, port=port))
    command = pinned(SERVER_CPU, ["nginx", "-p", str(root), "-c", str(config)])
    process = processes.start(command, log=root / "nginx.out")
    wait_for_port(port, 10, process)
    server = Nginx(
        port=port,
        process=process,
        page_bytes=len(page.encode()),
        footer_page_bytes=len(footer_page.encode()),
    )
    check_page(server.page_url, len(page.encode()), root / "error.log")
    return server


def check_page(url: str, expected_bytes: int, error_log: Path) -> None:
    """Raise StepError unless url returns 200 with the page written for it."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
    except OSError as error:
        log_tail = error_log.read_text(errors="replace")[-500:]
        raise StepError(f"nginx did not serve {url}: {error}; {log_tail}") from error
    if len(body) != expected_bytes:
        raise StepError(
            f"nginx served {len(body)} bytes at {url}, expected {expected_bytes}"
        )
