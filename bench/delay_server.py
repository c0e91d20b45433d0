"""HTTP/1.1 server that responds to every request 20 ms after it arrived.

The benchmark's latency step subtracts this fixed delay from the percentiles that a
load generator reports, so the delay must not drift with load. One thread runs a
select() loop that waits until just before an answer is due and spins for the rest.
An asyncio server is not used, because epoll_wait() times out in whole milliseconds
and so would answer up to 1 ms late. The timer slack is set to 1 ns for the same
reason.

The login form and the 303 redirect chain answer like Moodle's, so that
moodle_load.py can log users in first. Every other path returns a small page.

The server prints ``listening 127.0.0.1:PORT`` on stdout once it accepts connections.
On SIGTERM or SIGINT it stops and, with ``--stats PATH``, writes the measured hold
times (from the end of the request to the send of the answer) there as JSON.

Usage: python bench/delay_server.py [--port 0] [--delay-ms 20] [--stats PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import heapq
import json
import math
import secrets
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

PR_SET_TIMERSLACK = 29
MAX_HEADER_BYTES = 65536
SPIN_NS = 200_000

LOGIN_PAGE = """<!DOCTYPE html>
<html lang="en"><head><title>Log in to the site</title></head><body>
<form class="login-form" action="/login/index.php" method="post" id="login">
<input type="hidden" name="anchor" value="">
<input type="hidden" name="logintoken" value="{token}">
<input type="text" name="username" id="username" value="">
<input type="password" name="password" id="password" value="">
<button type="submit" id="loginbtn">Log in</button>
</form></body></html>
"""

PAGE = (
    '<!DOCTYPE html>\n<html lang="en"><head><title>Course: Bench</title></head>'
    '<body><div id="page"><h1>Bench course</h1>'
    + "<p>Section text of a small course page.</p>" * 20
    + "</div></body></html>\n"
)


def reduce_timer_slack() -> None:
    """Ask Linux to end timed waits on time instead of up to 50 us late."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def nearest_rank(values: list[int], fraction: float) -> int:
    """Return the smallest value with at least that fraction of values at or below."""
    return values[max(0, math.ceil(len(values) * fraction) - 1)]


def summarize(holds_ns: list[int]) -> dict[str, float | int]:
    values = sorted(holds_ns)
    if not values:
        return {"requests": 0}
    return {
        "requests": len(values),
        "hold_ms_min": values[0] / 1e6,
        "hold_ms_p50": nearest_rank(values, 0.50) / 1e6,
        "hold_ms_p99": nearest_rank(values, 0.99) / 1e6,
        "hold_ms_max": values[-1] / 1e6,
    }


def split_request(buffer: bytearray) -> bytes | None:
    """Remove one complete request from the buffer and return its head, if any."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head_end += 4
    head = bytes(buffer[:head_end])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip() or b"0")
    if len(buffer) < head_end + length:
        return None
    del buffer[: head_end + length]
    return head


def build_response(head: bytes) -> tuple[bytes, bool]:
    """Build the response to a request head and whether to keep the connection."""
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    method, _, rest = request_line.partition(" ")
    target, _, version = rest.rpartition(" ")
    lower = head.lower()
    keep_alive = b"connection: close" not in lower and (
        version != "HTTP/1.0" or b"connection: keep-alive" in lower
    )
    path = target.split("?", 1)[0]
    status = "200 OK"
    headers = ["Content-Type: text/html; charset=utf-8"]
    body = PAGE
    if path == "/login/index.php":
        if method == "POST":
            status = "303 See Other"
            headers.append(f"Set-Cookie: MoodleSession={secrets.token_hex(13)}; path=/")
            headers.append("Location: /login/index.php?testsession=2")
            body = ""
        elif "testsession=" in target:
            status = "303 See Other"
            headers.append("Location: /my/")
            body = ""
        else:
            headers.append(f"Set-Cookie: MoodleSession={secrets.token_hex(13)}; path=/")
            body = LOGIN_PAGE.format(token=secrets.token_urlsafe(24))
    payload = body.encode()
    headers.append(f"Content-Length: {len(payload)}")
    if not keep_alive:
        headers.append("Connection: close")
    head_out = f"HTTP/1.1 {status}\r\n" + "\r\n".join(headers) + "\r\n\r\n"
    return head_out.encode() + payload, keep_alive


@dataclass(order=True)
class PendingAnswer:
    due_ns: int
    sequence: int
    arrived_ns: int = field(compare=False)
    conn: socket.socket = field(compare=False)
    payload: bytes = field(compare=False)
    keep_alive: bool = field(compare=False)


class DelayServer:
    """Single-threaded select() loop that delays each response until it is due.

    select() takes its timeout in microseconds, unlike epoll_wait() and poll(), and
    one thread avoids waiting for the GIL, so responses leave within a few microseconds
    of the due time.
    """

    def __init__(self, listener: socket.socket, delay_ns: int) -> None:
        self.listener = listener
        self.delay_ns = delay_ns
        self.buffers: dict[socket.socket, bytearray] = {}
        self.pending: list[PendingAnswer] = []
        self.sequence = 0
        self.holds_ns: list[int] = []
        self.stopping = False

    def close(self, conn: socket.socket) -> None:
        self.buffers.pop(conn, None)
        conn.close()

    def accept(self) -> None:
        conn, _address = self.listener.accept()
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffers[conn] = bytearray()

    def receive(self, conn: socket.socket) -> None:
        try:
            chunk = conn.recv(65536)
        except OSError:
            chunk = b""
        arrived = time.monotonic_ns()
        if not chunk:
            self.close(conn)
            return
        buffer = self.buffers[conn]
        buffer += chunk
        while (head := split_request(buffer)) is not None:
            payload, keep_alive = build_response(head)
            self.sequence += 1
            due = arrived + self.delay_ns
            answer = PendingAnswer(
                due, self.sequence, arrived, conn, payload, keep_alive
            )
            heapq.heappush(self.pending, answer)
        if len(buffer) > MAX_HEADER_BYTES:
            self.close(conn)

    def send_due(self) -> None:
        while self.pending:
            head = self.pending[0]
            now = time.monotonic_ns()
            if head.due_ns - now > SPIN_NS:
                return
            while time.monotonic_ns() < head.due_ns:
                pass
            heapq.heappop(self.pending)
            if head.conn not in self.buffers:
                continue
            self.holds_ns.append(time.monotonic_ns() - head.arrived_ns)
            try:
                head.conn.sendall(head.payload)
            except OSError:
                self.close(head.conn)
                continue
            if not head.keep_alive:
                self.close(head.conn)

    def serve(self) -> None:
        while not self.stopping:
            timeout = 0.2
            if self.pending:
                wait_ns = self.pending[0].due_ns - time.monotonic_ns() - SPIN_NS
                timeout = min(timeout, max(0.0, wait_ns / 1e9))
            readable, _, _ = select.select(
                [self.listener, *self.buffers], [], [], timeout
            )
            for sock in readable:
                if sock is self.listener:
                    self.accept()
                elif sock in self.buffers:
                    self.receive(sock)
            self.send_due()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="TCP port, 0 picks one")
    parser.add_argument(
        "--delay-ms", type=float, default=20.0, help="time before each response, ms"
    )
    parser.add_argument("--stats", help="write the hold times here as JSON at exit")
    args = parser.parse_args()

    reduce_timer_slack()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(512)
    server = DelayServer(listener, int(args.delay_ms * 1e6))

    def request_stop(signum: int, frame: FrameType | None) -> None:
        server.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    print(f"listening {args.host}:{listener.getsockname()[1]}", flush=True)
    server.serve()
    listener.close()
    if args.stats:
        with open(args.stats, "w", encoding="utf-8") as out:
            summary = summarize(server.holds_ns) | {"delay_ms": args.delay_ms}
            json.dump(summary, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
