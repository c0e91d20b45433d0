"""Run a command as a grandchild of the benchmark, so that its peak RSS is its own.

Linux counts the resident memory that a process had before exec() in the peak that
wait4() reports, and a child forked from the benchmark starts with the benchmark's
memory. With the benchmark holding 150 MB, /bin/true read a peak of 168 MB. So the
86.7 MB exit peak of moodle_load.py in a full run, 43.5 MB during its load, was
most likely the benchmark's own memory after the earlier steps. This interpreter
forks the command from its own few MB instead, writes the
command's pid to PID_FILE once it runs and the command's peak RSS in KiB to
RSS_FILE after it exits, and then exits as the command did.

Usage: python spawn_fresh.py PID_FILE RSS_FILE COMMAND [ARGUMENT...]
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def write_atomic(path: Path, text: str) -> None:
    """Write text so that a reader never sees a partial file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def main() -> int:
    pid_path, rss_path, *command = sys.argv[1:]
    # The benchmark signals the whole process group. The command gets the signal,
    # and this process stays to reap it and report its peak.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)
    write_atomic(Path(pid_path), str(pid))
    _pid, status, usage = os.wait4(pid, 0)
    write_atomic(Path(rss_path), str(usage.ru_maxrss))
    if os.WIFSIGNALED(status):
        # Exit the way the command did, so that wait4() in the benchmark reports the
        # signal.
        signum = os.WTERMSIG(status)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
