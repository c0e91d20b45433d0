"""Run moodle_load.py and the peer tools (hey, wrk, Locust) and parse their output.

Every client runs pinned to CLIENT_CPU. Each function returns the figures the
benchmark compares plus the Measured record of the process (CPU time, peak RSS).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.procs import CLIENT_CPU, Measured, StepError, pinned, run_measured

REPO = Path(__file__).resolve().parent.parent
LOCUST = REPO / "bench" / "work" / "locust-venv" / "bin" / "locust"
LOCUSTFILE = REPO / "bench" / "locustfile.py"
USER_COUNT = 100


def write_load_config(path: Path, base_url: str, url_path: str) -> Path:
    """Write a moodle_load.py config with USER_COUNT users and one URL template."""
    config = {
        "base_url": base_url,
        "login_path": "/login/index.php",
        "users": [
            {"username": f"tool_generator_{n:06d}", "password": "moodle"}
            for n in range(1, USER_COUNT + 1)
        ],
        "parameters": {"courseid": {"min": 10, "max": 13}},
        "urls": [{"path": url_path}],
    }
    path.write_text(json.dumps(config, indent=2))
    return path


def last_json_object(text: str) -> dict[str, Any] | None:
    """Return the JSON document that a tool printed on stdout, if there is one."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def run_moodle_load(
    workdir: Path,
    name: str,
    config: Path,
    *,
    rpm: int,
    duration: int,
    concurrency: int = 20,
    progress: int = 30,
    watch: Callable[[int, str], None] | None = None,
    own_peak_rss: bool = False,
) -> tuple[dict[str, Any], Measured]:
    """Run moodle_load.py once and return its JSON summary and process record.

    own_peak_rss: see run_measured; the memory step needs it.
    """
    script = REPO / "moodle_load.py"
    if not script.exists():
        raise StepError("moodle_load.py is not in the repository yet")
    command = pinned(
        CLIENT_CPU,
        [
            sys.executable,
            str(script),
            "--config",
            str(config),
            "--rpm",
            str(rpm),
            "--duration",
            str(duration),
            "--concurrency",
            str(concurrency),
            "--progress",
            str(progress),
        ],
    )
    load_start_cpu_s: list[float] = []

    def watch_load_start(pid: int, new_text: str) -> None:
        # CPU time used before the load phase (start-up and logins) is left out of
        # the per-request figures: it is read at the "[INFO] Load:" line.
        if not load_start_cpu_s and "[INFO] Load:" in new_text:
            cpu = read_cpu_s(pid)
            if cpu is not None:
                load_start_cpu_s.append(cpu)
        if watch is not None:
            watch(pid, new_text)

    measured = run_measured(
        command,
        workdir=workdir,
        name=name,
        timeout=duration + 180,
        watch=watch_load_start,
        own_peak_rss=own_peak_rss,
    )
    if load_start_cpu_s:
        measured.notes["load_cpu_s"] = measured.cpu_s - load_start_cpu_s[0]
    summary = last_json_object(measured.stdout)
    if measured.returncode != 0 or summary is None:
        raise StepError(
            f"moodle_load.py exited with code {measured.returncode}: "
            f"{tail(measured.stderr)}"
        )
    return summary, measured


def run_hey(
    workdir: Path,
    name: str,
    url: str,
    *,
    duration: int,
    concurrency: int,
    qps_per_worker: float | None = None,
) -> tuple[dict[str, float], Measured]:
    """Run hey for a fixed time; GOMAXPROCS=1 keeps its Go runtime on one core."""
    command = ["hey", "-z", f"{duration}s", "-c", str(concurrency)]
    if qps_per_worker is not None:
        command += ["-q", str(qps_per_worker)]
    env = dict(os.environ, GOMAXPROCS="1")
    measured = run_measured(
        pinned(CLIENT_CPU, [*command, url]),
        workdir=workdir,
        name=name,
        timeout=duration + 60,
        env=env,
    )
    text = measured.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if measured.returncode != 0 or rate is None:
        raise StepError(f"hey exited with code {measured.returncode}: {tail(text)}")
    figures = {"requests_per_s": float(rate.group(1))}
    for percent in ("50", "99"):
        match = re.search(rf"{percent}% in ([\d.]+) secs", text)
        if match:
            figures[f"latency_ms_p{percent}"] = float(match.group(1)) * 1000
    statuses = re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)
    figures["responses_not_200"] = sum(
        int(count) for code, count in statuses if code != "200"
    )
    errors = re.search(r"Error distribution:(.*)", text, re.S)
    figures["errors"] = (
        0 if errors is None else len(errors.group(1).strip().split("\n"))
    )
    return figures, measured


def run_wrk(
    workdir: Path, name: str, url: str, *, duration: int, connections: int
) -> tuple[dict[str, float], Measured]:
    """Run wrk with one thread for a fixed time."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", url]
    measured = run_measured(
        pinned(CLIENT_CPU, command),
        workdir=workdir,
        name=name,
        timeout=duration + 60,
    )
    text = measured.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if measured.returncode != 0 or rate is None:
        raise StepError(f"wrk exited with code {measured.returncode}: {tail(text)}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "requests_per_s": float(rate.group(1)),
        "responses_not_2xx_3xx": int(bad.group(1)) if bad else 0,
    }, measured


def run_locust(
    workdir: Path, name: str, host: str, *, duration: int, users: int
) -> tuple[dict[str, float], Measured]:
    """Run Locust headless with FastHttpUser in one process.

    The rate is the mean of Locust's per-second counts without the first and the last
    second, so the spawn and the partial last second do not lower it. Locust's own
    total rate divides by a span that includes the spawning.
    """
    if not LOCUST.exists():
        raise StepError(f"Locust is not installed at {LOCUST}; run bench/run")
    command = [
        str(LOCUST),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{duration}s",
        "--host",
        host,
        "--only-summary",
        "--json",
        "--skip-log",
    ]
    measured = run_measured(
        pinned(CLIENT_CPU, command),
        workdir=workdir,
        name=name,
        timeout=duration + 60,
    )
    try:
        stats = json.loads(measured.stdout)
        entry = stats[0]
    except (json.JSONDecodeError, IndexError, KeyError) as error:
        raise StepError(
            f"Locust exited with code {measured.returncode} and no JSON stats: "
            f"{tail(measured.stderr)}"
        ) from error
    per_second = [count for _, count in sorted(entry["num_reqs_per_sec"].items())]
    steady = per_second[1:-1] or per_second
    return {
        "requests_per_s": statistics.fmean(steady),
        "requests": entry["num_requests"],
        "failures": entry["num_failures"],
    }, measured


def read_cpu_s(pid: int) -> float | None:
    """Return user plus system CPU seconds of a live process from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # utime and stime are fields 14 and 15 of stat(5), counted after the ")".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tool_version(command: list[str], pattern: str = r"[\d]+(?:\.[\d]+)+") -> str:
    """Return the first version-looking string that a tool prints, or 'unknown'."""
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(pattern, result.stdout + result.stderr)
    return match.group(0) if match else "unknown"
