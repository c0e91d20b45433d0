"""Child processes of the benchmark: start, measure, and stop them all at the end.

Every child starts in its own session, so Ctrl-C reaches only the benchmark, which
then stops each child's process group by its id. Measured clients are reaped with
os.wait4(), whose resource usage gives their CPU time and peak RSS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SPAWN_FRESH = Path(__file__).resolve().parent / "spawn_fresh.py"
CLIENT_CPU = "0"
SERVER_CPU = "1"


class StepError(RuntimeError):
    """A step could not be measured; the message gives the reason."""


def pinned(cpu: str, command: Sequence[str]) -> list[str]:
    """Prefix a command with taskset so that it runs on the given CPU only."""
    return ["taskset", "-c", cpu, *command]


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float, process: subprocess.Popen) -> None:
    """Wait until 127.0.0.1:port accepts connections, or raise StepError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StepError(f"{process.args[0]} exited with code {process.returncode}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    raise StepError(f"nothing listened on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class Measured:
    """Outcome of one measured client run."""

    command: list[str]
    returncode: int
    wall_s: float
    cpu_user_s: float
    cpu_system_s: float
    max_rss_kib: int
    stdout: str
    stderr: str
    timed_out: bool = False
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_system_s


class Processes:
    """Registry of the long-running children, stopped in reverse order at exit."""

    def __init__(self) -> None:
        self._children: list[subprocess.Popen] = []

    def start(
        self,
        command: Sequence[str],
        *,
        log: Path,
        env: dict[str, str] | None = None,
        stdout: int | None = None,
    ) -> subprocess.Popen:
        with open(log, "ab") as log_file:
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else log_file,
                stderr=log_file,
                env=env,
                start_new_session=True,
            )
        self._children.append(process)
        return process

    def stop(self, process: subprocess.Popen, timeout: float = 10.0) -> None:
        """Send SIGTERM to the child's process group, then SIGKILL when it lingers."""
        if process in self._children:
            self._children.remove(process)
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    def stop_all(self) -> None:
        for process in reversed(list(self._children)):
            self.stop(process)


# Pids of the clients that run_measured() is running, for kill_measured().
_measured_pids: set[int] = set()


def kill_measured() -> None:
    """SIGKILL every running measured client, so that threads waiting on them end."""
    for pid in list(_measured_pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def run_measured(
    command: Sequence[str],
    *,
    workdir: Path,
    name: str,
    timeout: float,
    env: dict[str, str] | None = None,
    watch: Callable[[int, str], None] | None = None,
    stop_after: float | None = None,
    stop_signal: int = signal.SIGTERM,
    discard_stdout: bool = False,
    own_peak_rss: bool = False,
) -> Measured:
    """Run a client to its end and return its exit code, CPU time and peak RSS.

    stdout and stderr go to files under workdir. watch, when given, is called about
    ten times a second with the child's pid and the stderr text written since the
    previous call.
    stop_after sends stop_signal after that many seconds (for clients that stream
    until stopped); timeout sends SIGKILL and marks the run as timed out.
    own_peak_rss starts the command through spawn_fresh.py, so that its peak RSS
    leaves out the benchmark's own memory, which a forked child starts with. watch
    then gets the command's pid.
    """
    rss_path = workdir / f"{name}.peak_rss_kib"
    pid_path = workdir / f"{name}.pid"
    if own_peak_rss:
        command = [sys.executable, str(SPAWN_FRESH), str(pid_path), str(rss_path),
                   *command]
    out_path = workdir / f"{name}.stdout"
    err_path = workdir / f"{name}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.monotonic()
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if discard_stdout else out,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    timed_out = False
    terminated = False
    stderr_offset = 0
    client_pid = None if own_peak_rss else process.pid
    _measured_pids.add(process.pid)
    try:
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.monotonic() - started
            if stop_after is not None and elapsed >= stop_after and not terminated:
                os.kill(process.pid, stop_signal)
                terminated = True
            if elapsed >= timeout and not timed_out:
                os.killpg(process.pid, signal.SIGKILL)
                timed_out = True
            if client_pid is None:
                with contextlib.suppress(OSError, ValueError):
                    client_pid = int(pid_path.read_text())
            if watch is not None and client_pid is not None:
                with open(err_path, "rb") as err:
                    err.seek(stderr_offset)
                    new_bytes = err.read()
                # Hand over whole lines only.
                complete = new_bytes[: new_bytes.rfind(b"\n") + 1]
                stderr_offset += len(complete)
                watch(client_pid, complete.decode(errors="replace"))
            time.sleep(0.1)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.wait4(process.pid, 0)
        process.returncode = -9
        raise
    finally:
        _measured_pids.discard(process.pid)
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    # The child may have left helpers in its process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    max_rss_kib = usage.ru_maxrss
    if own_peak_rss and rss_path.exists():
        max_rss_kib = int(rss_path.read_text())
    return Measured(
        command=list(command),
        returncode=process.returncode,
        wall_s=wall,
        cpu_user_s=usage.ru_utime,
        cpu_system_s=usage.ru_stime,
        max_rss_kib=max_rss_kib,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        timed_out=timed_out,
    )


def read_status_kib(pid: int, key: str) -> int | None:
    """Return a field such as VmHWM of /proc/<pid>/status in KiB, if readable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None
