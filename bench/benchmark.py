"""Measure moodle-load's scripts side by side with peer tools, in one run.

Started by ``bench/run``. Steps, each recorded as measured or as not measured with
the reason:

- rate: moodle_load.py at 600, 6,000 and 60,000 RPM for 20 s against nginx;
- throughput: requests per second on one core of moodle_load.py, hey, wrk and
  Locust (FastHttpUser), at the same concurrency, against nginx on the other core;
- latency: p50 and p99 minus 20 ms of moodle_load.py and hey at 100 requests/s
  against a server that responds after exactly 20 ms (bench/delay_server.py);
- footer: the rate held with and without Moodle's performance footer in the page;
- passwords: set_moodle_passwords.py on 100,000 users in PostgreSQL at cost 12;
- stats: CPU time of capture_docker_stats.py and of the ``docker stats`` CLI
  sampling the same 10 busybox containers for 60 s, concurrently;
- memory: peak RSS of moodle_load.py after 100,000 and 1,000,000 requests.

Short steps run three times and report the median. Raw figures go to
bench/results/<UTC stamp>.json and the page to docs/benchmarks.md; with --quick (short
runs to check the harness) both go to bench/work/ instead.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from bench import dockerbench, postgres, report, tools
from bench.nginx import Nginx, nginx_version, start_nginx
from bench.procs import (
    CLIENT_CPU,
    SERVER_CPU,
    Processes,
    StepError,
    kill_measured,
    pinned,
    read_status_kib,
    run_measured,
)

REPO = tools.REPO
CONTAINER_PREFIX_TEXT = dockerbench.CONTAINER_PREFIX
STEPS = ["rate", "throughput", "latency", "footer", "passwords", "stats", "memory"]


@dataclass(frozen=True)
class Plan:
    """Durations and counts of one run."""

    repeats: int = 3
    rate_rpms: tuple[int, ...] = (600, 6000, 60000)
    rate_duration: int = 20
    throughput_duration: int = 10
    concurrency: int = 20
    latency_rps: int = 100
    latency_duration: int = 20
    footer_rpm: int = 6000
    footer_duration: int = 20
    footer_max_duration: int = 10
    overload_rpm: int = 1_200_000
    memory_counts: tuple[int, int] = (100_000, 1_000_000)
    password_users: int = 100_000
    password_cost: int = 12
    stats_containers: int = 10
    stats_duration: int = 60


FULL = Plan()
QUICK = Plan(
    repeats=1,
    rate_duration=5,
    throughput_duration=4,
    latency_duration=5,
    footer_duration=5,
    footer_max_duration=4,
    memory_counts=(10_000, 100_000),
    stats_duration=10,
)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


class Benchmark:
    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        self.processes = Processes()
        self.nginx: Nginx | None = None
        self.results: dict[str, Any] = {}

    # -- shared servers --------------------------------------------------------

    def ensure_nginx(self) -> Nginx:
        if self.nginx is None:
            self.nginx = start_nginx(self.processes, self.workdir / "nginx")
        return self.nginx

    def load_config(self, name: str, base_url: str, url_path: str) -> Path:
        return tools.write_load_config(
            self.workdir / f"{name}.json", base_url, url_path
        )

    # -- steps -----------------------------------------------------------------

    def step_rate(self) -> dict[str, Any]:
        nginx = self.ensure_nginx()
        config = self.load_config(
            "rate", nginx.base_url, "/course/view.php?id={courseid}"
        )
        rows = []
        for rpm in self.plan.rate_rpms:
            runs = []
            for repeat in range(self.plan.repeats):
                summary, measured = tools.run_moodle_load(
                    self.workdir,
                    f"rate-{rpm}-{repeat}",
                    config,
                    rpm=rpm,
                    duration=self.plan.rate_duration,
                    concurrency=self.plan.concurrency,
                )
                expected = rpm * self.plan.rate_duration / 60
                runs.append(
                    {
                        "observed_rpm": summary["req_per_min_observed"],
                        "ratio": summary["req_per_min_observed"] / rpm,
                        "requests_sent": summary["requests_sent"],
                        "requests_expected": expected,
                        "failures": summary["failures"],
                        "late_requests": summary["late_requests"],
                        "max_lag_ms": summary["max_lag_ms"],
                        "cpu_s": measured.cpu_s,
                    }
                )
            ratio = median([run["ratio"] for run in runs])
            rows.append(
                {
                    "target_rpm": rpm,
                    "observed_rpm": median([run["observed_rpm"] for run in runs]),
                    "ratio": ratio,
                    "met": abs(ratio - 1) <= 0.01,
                    "runs": runs,
                }
            )
        return {
            "duration_s": self.plan.rate_duration,
            "concurrency": self.plan.concurrency,
            "rows": rows,
            "met": all(row["met"] for row in rows),
        }

    def step_throughput(self) -> dict[str, Any]:
        nginx = self.ensure_nginx()
        config = self.load_config("tput", nginx.base_url, "/course/view.php?id=10")
        duration = self.plan.throughput_duration
        concurrency = self.plan.concurrency
        tools_runs: dict[str, list[dict[str, float]]] = {
            "moodle_load.py": [],
            "hey": [],
            "wrk": [],
            "Locust": [],
        }
        for repeat in range(self.plan.repeats):
            summary, measured = tools.run_moodle_load(
                self.workdir,
                f"tput-ml-{repeat}",
                config,
                rpm=self.plan.overload_rpm,
                duration=duration,
                concurrency=concurrency,
            )
            tools_runs["moodle_load.py"].append(
                {
                    "requests_per_s": summary["req_per_min_observed"] / 60,
                    "failures": summary["failures"],
                    "cpu_s": measured.cpu_s,
                }
            )
            figures, measured = tools.run_hey(
                self.workdir,
                f"tput-hey-{repeat}",
                nginx.page_url,
                duration=duration,
                concurrency=concurrency,
            )
            tools_runs["hey"].append(figures | {"cpu_s": measured.cpu_s})
            figures, measured = tools.run_wrk(
                self.workdir,
                f"tput-wrk-{repeat}",
                nginx.page_url,
                duration=duration,
                connections=concurrency,
            )
            tools_runs["wrk"].append(figures | {"cpu_s": measured.cpu_s})
            figures, measured = tools.run_locust(
                self.workdir,
                f"tput-locust-{repeat}",
                nginx.base_url,
                duration=duration,
                users=concurrency,
            )
            tools_runs["Locust"].append(figures | {"cpu_s": measured.cpu_s})
        rates = {
            name: median([run["requests_per_s"] for run in runs])
            for name, runs in tools_runs.items()
        }
        ours = rates["moodle_load.py"]
        return {
            "duration_s": duration,
            "concurrency": concurrency,
            "requests_per_s": rates,
            "ratio_to_wrk": {name: rate / rates["wrk"] for name, rate in rates.items()},
            "ratio_to_locust": ours / rates["Locust"],
            "ratio_to_hey": ours / rates["hey"],
            "met": ours > rates["Locust"] and ours >= rates["hey"] / 2,
            "runs": tools_runs,
        }

    def start_delay_server(self, name: str) -> tuple[subprocess.Popen, str, Path]:
        stats_path = self.workdir / f"{name}.holds.json"
        command = pinned(
            SERVER_CPU,
            [
                sys.executable,
                str(REPO / "bench" / "delay_server.py"),
                "--stats",
                str(stats_path),
            ],
        )
        process = self.processes.start(
            command, log=self.workdir / f"{name}.log", stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        if not line.startswith("listening "):
            raise StepError(f"the 20 ms server did not start: {line!r}")
        return process, "http://" + line.split(" ", 1)[1], stats_path

    def stop_delay_server(
        self, process: subprocess.Popen, stats_path: Path
    ) -> dict[str, Any]:
        self.processes.stop(process)
        return json.loads(stats_path.read_text())

    def step_latency(self) -> dict[str, Any]:
        delay_ms = 20.0
        rps = self.plan.latency_rps
        concurrency = self.plan.concurrency
        runs: dict[str, list[dict[str, Any]]] = {"moodle_load.py": [], "hey": []}
        for repeat in range(self.plan.repeats):
            name = f"latency-ml-{repeat}"
            process, base_url, holds = self.start_delay_server(name)
            config = self.load_config(name, base_url, "/course/view.php?id={courseid}")
            summary, _measured = tools.run_moodle_load(
                self.workdir,
                name,
                config,
                rpm=rps * 60,
                duration=self.plan.latency_duration,
                concurrency=concurrency,
            )
            runs["moodle_load.py"].append(
                {
                    "latency_ms_p50": summary["latency_ms_p50"],
                    "latency_ms_p99": summary["latency_ms_p99"],
                    "service_time_ms_p50": summary["service_time_ms_p50"],
                    "service_time_ms_p99": summary["service_time_ms_p99"],
                    "observed_rpm": summary["req_per_min_observed"],
                    "server": self.stop_delay_server(process, holds),
                }
            )
            name = f"latency-hey-{repeat}"
            process, base_url, holds = self.start_delay_server(name)
            figures, _measured = tools.run_hey(
                self.workdir,
                name,
                f"{base_url}/course/view.php?id=10",
                duration=self.plan.latency_duration,
                concurrency=concurrency,
                qps_per_worker=rps / concurrency,
            )
            runs["hey"].append(
                figures | {"server": self.stop_delay_server(process, holds)}
            )
        errors = {}
        for tool, tool_runs in runs.items():
            errors[tool] = {
                f"p{percent}_error_ms": median(
                    [run[f"latency_ms_p{percent}"] for run in tool_runs]
                )
                - delay_ms
                for percent in (50, 99)
            }
        ours, hey = errors["moodle_load.py"], errors["hey"]
        met = (
            ours["p50_error_ms"] <= 1
            and ours["p99_error_ms"] <= 3
            and ours["p50_error_ms"] <= hey["p50_error_ms"]
            and ours["p99_error_ms"] <= hey["p99_error_ms"]
        )
        return {
            "delay_ms": delay_ms,
            "requests_per_s": rps,
            "duration_s": self.plan.latency_duration,
            "concurrency": concurrency,
            "errors": errors,
            "met": met,
            "runs": runs,
        }

    def step_footer(self) -> dict[str, Any]:
        nginx = self.ensure_nginx()
        pages = {
            "without footer": "/course/view.php?id={courseid}",
            "with footer": "/mod/forum/view.php?id={courseid}",
        }
        modes = {
            f"{self.plan.footer_rpm:,} RPM": (
                self.plan.footer_rpm,
                self.plan.footer_duration,
            ),
            "one-core maximum": (self.plan.overload_rpm, self.plan.footer_max_duration),
        }
        table: dict[str, dict[str, Any]] = {}
        for mode, (rpm, duration) in modes.items():
            table[mode] = {}
            for page, path in pages.items():
                config = self.load_config(f"footer-{page[:4]}", nginx.base_url, path)
                runs = []
                for repeat in range(self.plan.repeats):
                    summary, measured = tools.run_moodle_load(
                        self.workdir,
                        f"footer-{rpm}-{page[:4]}-{repeat}",
                        config,
                        rpm=rpm,
                        duration=duration,
                        concurrency=self.plan.concurrency,
                    )
                    server = summary.get("server") or {}
                    load_cpu_s = measured.notes.get("load_cpu_s", measured.cpu_s)
                    runs.append(
                        {
                            "observed_rpm": summary["req_per_min_observed"],
                            "total": summary["total"],
                            "cpu_s": measured.cpu_s,
                            "load_cpu_s": load_cpu_s,
                            "cpu_ms_per_request": load_cpu_s
                            * 1000
                            / max(summary["total"], 1),
                            "responses_with_footer": server.get(
                                "responses_with_footer"
                            ),
                        }
                    )
                table[mode][page] = {
                    "observed_rpm": median([run["observed_rpm"] for run in runs]),
                    "cpu_ms_per_request": median(
                        [run["cpu_ms_per_request"] for run in runs]
                    ),
                    "runs": runs,
                }
            plain = table[mode]["without footer"]["observed_rpm"]
            parsed = table[mode]["with footer"]["observed_rpm"]
            table[mode]["rate_cost"] = 1 - parsed / plain
        return {
            "page_bytes": nginx.page_bytes,
            "footer_page_bytes": nginx.footer_page_bytes,
            "modes": table,
            # The target is the rate held at 6,000 RPM. The one-core maximum shows
            # the parse's cost per page, where nothing else hides it.
            "met": table[f"{self.plan.footer_rpm:,} RPM"]["rate_cost"] <= 0.10,
        }

    def step_passwords(self) -> dict[str, Any]:
        script = REPO / "set_moodle_passwords.py"
        if not script.exists():
            raise StepError("set_moodle_passwords.py is not in the repository yet")
        server = postgres.start_postgres()
        try:
            started = time.monotonic()
            postgres.create_template(server, self.plan.password_users)
            setup_s = time.monotonic() - started
            runs = []
            for repeat in range(self.plan.repeats):
                database = f"moodle_{repeat}"
                postgres.fresh_copy(server, database)
                config = self.workdir / f"passwords-{repeat}.json"
                command = [
                    sys.executable,
                    str(script),
                    "--db-host",
                    "127.0.0.1",
                    "--db-port",
                    str(server.port),
                    "--db-name",
                    database,
                    "--db-user",
                    postgres.ROLE,
                    "--count",
                    str(self.plan.password_users),
                    "--where",
                    "username LIKE 'tool_generator_%'",
                    "--password",
                    "Bench-Passw0rd!",
                    "--bcrypt-cost",
                    str(self.plan.password_cost),
                    "--config",
                    str(config),
                ]
                env = dict(os.environ, PGPASSWORD=postgres.ROLE_PASSWORD)
                measured = run_measured(
                    command,
                    workdir=self.workdir,
                    name=f"passwords-{repeat}",
                    timeout=600,
                    env=env,
                )
                if measured.returncode != 0:
                    raise StepError(
                        "set_moodle_passwords.py exited with code "
                        f"{measured.returncode}: {tools.tail(measured.stderr)}"
                    )
                changed = postgres.count_rows(
                    server,
                    database,
                    "SELECT count(*) FROM mdl_user WHERE password LIKE "
                    f"'$2y${self.plan.password_cost:02d}$%'",
                )
                written = len(json.loads(config.read_text())["users"])
                runs.append(
                    {
                        "wall_s": measured.wall_s,
                        "cpu_s": measured.cpu_s,
                        "users_changed": changed,
                        "users_in_config": written,
                        "stdout": measured.stdout.strip(),
                    }
                )
            wall = median([run["wall_s"] for run in runs])
            complete = all(
                run["users_changed"] == self.plan.password_users for run in runs
            )
            return {
                "users": self.plan.password_users,
                "bcrypt_cost": self.plan.password_cost,
                "postgres": postgres.server_version(server),
                "setup_s": setup_s,
                "wall_s": wall,
                "met": wall < 5 and complete,
                "all_users_changed": complete,
                "runs": runs,
            }
        finally:
            server.stop()

    def step_stats(self) -> dict[str, Any]:
        script = REPO / "capture_docker_stats.py"
        if not script.exists():
            raise StepError("capture_docker_stats.py is not in the repository yet")
        engine = dockerbench.start_engine(self.processes, self.workdir / "docker")
        try:
            dockerbench.import_busybox_image(engine, self.workdir / "image")
            names = dockerbench.start_containers(engine, self.plan.stats_containers)
            duration = self.plan.stats_duration
            runs = [
                self.stats_run(engine, names, script, repeat)
                for repeat in range(self.plan.repeats)
            ]
            # The start-up part of the capture's CPU time: the same interpreter and
            # module imports, then --help prints and exits.
            startup = run_measured(
                [sys.executable, str(script), "--help"],
                workdir=self.workdir,
                name="stats-capture-startup",
                timeout=60,
            )
            capture_cpu = median([run["capture_cpu_s"] for run in runs])
            cli_cpu = median([run["cli_cpu_s"] for run in runs])
            ratio = median([run["ratio_to_cli"] for run in runs])
            return {
                "containers": len(names),
                "duration_s": duration,
                "engine": engine.server_version,
                "cli": engine.client_version,
                "capture_cpu_s": capture_cpu,
                "capture_wall_s": median([run["capture_wall_s"] for run in runs]),
                "capture_startup_cpu_s": startup.cpu_s,
                "cli_cpu_s": cli_cpu,
                "cli_wall_s": median([run["cli_wall_s"] for run in runs]),
                "ratio_to_cli": ratio,
                "cli_rows_with_figures": runs[0]["cli_rows_with_figures"],
                "capture_rows": runs[0]["capture_rows"],
                "runs": runs,
                "met": ratio <= 1,
            }
        finally:
            dockerbench.stop_engine(self.processes, engine)

    def stats_run(
        self, engine: Any, names: list[str], script: Path, repeat: int
    ) -> dict[str, Any]:
        """Run the capture and the docker stats CLI side by side once."""
        duration = self.plan.stats_duration
        outdir = self.workdir / f"stats-{repeat}"
        capture_command = [
            sys.executable,
            str(script),
            "--containers",
            *names,
            "--interval",
            "1",
            "--duration",
            str(duration),
            "--outdir",
            str(outdir),
        ]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            capture = pool.submit(
                run_measured,
                capture_command,
                workdir=self.workdir,
                name=f"stats-capture-{repeat}",
                timeout=duration + 60,
                env=engine.env,
            )
            # docker stats streams until stopped. The 28.x CLI against a 20.10
            # engine was seen to ignore SIGINT and SIGTERM, so SIGKILL ends it.
            # Its output goes to a file, not /dev/null, so that the rows can be
            # checked for figures: about one short write a second.
            cli = pool.submit(
                run_measured,
                ["docker", "stats", *names],
                workdir=self.workdir,
                name=f"stats-cli-{repeat}",
                timeout=duration + 60,
                env=engine.env,
                stop_after=duration,
                stop_signal=signal.SIGKILL,
            )
            try:
                capture_run, cli_run = capture.result(), cli.result()
            except BaseException:
                # Ctrl-C: end both clients now instead of waiting for them.
                kill_measured()
                raise
        if capture_run.returncode != 0:
            raise StepError(
                f"capture_docker_stats.py exited with code "
                f"{capture_run.returncode}: {tools.tail(capture_run.stderr)}"
            )
        if not cli_run.cpu_s:
            raise StepError("docker stats used no CPU time: it did not run")
        # A row with a CPU figure such as "0.00%" shows that the CLI got samples;
        # "--" means it had none for that container yet.
        cli_rows_with_figures = sum(
            1
            for line in cli_run.stdout.splitlines()
            if CONTAINER_PREFIX_TEXT in line and "%" in line
        )
        return {
            "capture_cpu_s": capture_run.cpu_s,
            "capture_wall_s": capture_run.wall_s,
            "cli_cpu_s": cli_run.cpu_s,
            "cli_wall_s": cli_run.wall_s,
            "ratio_to_cli": capture_run.cpu_s / cli_run.cpu_s,
            "capture_summary": tools.last_json_object(capture_run.stdout) or {},
            "cli_rows_with_figures": cli_rows_with_figures,
            "capture_rows": sum(
                len(path.read_text().splitlines()) - 1
                for path in outdir.glob("*.csv")
            ),
        }

    def step_memory(self) -> dict[str, Any]:
        nginx = self.ensure_nginx()
        config = self.load_config(
            "memory", nginx.base_url, "/course/view.php?id={courseid}"
        )
        first, second = self.plan.memory_counts
        throughput = self.results.get("throughput", {})
        max_rps = throughput.get("requests_per_s", {}).get("moodle_load.py")
        if max_rps:
            # 85 % of the one-core maximum, so that the rate is held and the count
            # of requests follows from rate x duration.
            rpm = int(max_rps * 0.85 * 60 / 1000) * 1000
        else:
            rpm = 60000
        # A margin of 3 % and two progress intervals, so that a progress line is
        # read after the second count even when the rate dips a little.
        duration = math.ceil(second * 1.03 / (rpm / 60)) + 4
        readings: list[dict[str, int]] = []
        marks: dict[str, dict[str, int]] = {}

        def watch(pid: int, new_text: str) -> None:
            for line in new_text.splitlines():
                if not line.startswith("[PROGRESS] "):
                    continue
                total = json.loads(line.removeprefix("[PROGRESS] "))["total"]
                hwm = read_status_kib(pid, "VmHWM")
                rss = read_status_kib(pid, "VmRSS")
                if hwm is None or rss is None:
                    continue
                reading = {"total": total, "vm_hwm_kib": hwm, "vm_rss_kib": rss}
                readings.append(reading)
                if total >= first and "first" not in marks:
                    marks["first"] = reading

        summary, measured = tools.run_moodle_load(
            self.workdir,
            "memory",
            config,
            rpm=rpm,
            duration=duration,
            concurrency=self.plan.concurrency,
            progress=2,
            watch=watch,
            own_peak_rss=True,
        )
        if "first" not in marks:
            raise StepError(f"no progress reading reached {first} requests")
        # Both points are VmHWM at progress lines during the load, read the same
        # way; the exit peak from wait4() also covers the stop and the summary.
        first_kib = marks["first"]["vm_hwm_kib"]
        final_kib = measured.max_rss_kib
        growth_mb = (readings[-1]["vm_hwm_kib"] - first_kib) * 1024 / 1e6
        return {
            "rpm": rpm,
            "duration_s": duration,
            "observed_rpm": summary["req_per_min_observed"],
            "first_count": first,
            "first_reading_total": marks["first"]["total"],
            "first_peak_rss_mb": first_kib * 1024 / 1e6,
            "second_count": second,
            "final_total": summary["total"],
            "final_peak_rss_mb": final_kib * 1024 / 1e6,
            "exit_peak_own_memory": True,
            "growth_mb": growth_mb,
            "reached_second_count": summary["total"] >= second,
            "met": growth_mb <= 10 and readings[-1]["total"] >= second,
            "readings": readings,
        }

    # -- driver ----------------------------------------------------------------

    def run(self, steps: list[str], write: Callable[[], None]) -> None:
        for step in steps:
            started = time.monotonic()
            print(f"[bench] {step}: started", file=sys.stderr, flush=True)
            try:
                result = getattr(self, f"step_{step}")()
                result["measured"] = True
            except Exception as error:
                # One broken step or tool is recorded with the reason, and the other
                # steps still run.
                reason = str(error) if isinstance(error, StepError) else repr(error)
                result = {"measured": False, "reason": reason}
                traceback.print_exc()
            result["seconds"] = round(time.monotonic() - started, 1)
            self.results[step] = result
            state = (
                "done" if result["measured"] else f"NOT MEASURED: {result['reason']}"
            )
            print(
                f"[bench] {step}: {state} ({result['seconds']} s)",
                file=sys.stderr,
                flush=True,
            )
            write()


def debian_version(package: str) -> str | None:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 and result.stdout else None


def machine_info() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    packages = {}
    for name in ("aiohttp", "psycopg2-binary", "bcrypt", "docker"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    packages["nginx"] = nginx_version()
    for name in ("wrk", "hey", "docker.io", "busybox-static", "postgresql-15"):
        packages[name] = debian_version(name) or "not installed"
    packages["locust"] = tools.tool_version([str(tools.LOCUST), "--version"])
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(int(meminfo[1]) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": packages,
        "commit": commit,
        "client_cpu": CLIENT_CPU,
        "server_cpu": SERVER_CPU,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="bench/run", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short runs, one repeat, output under bench/work/ (to check the harness)",
    )
    parser.add_argument(
        "--steps",
        default=",".join(STEPS),
        help=f"comma-separated steps to run (default: {','.join(STEPS)})",
    )
    args = parser.parse_args()
    steps = [step.strip() for step in args.steps.split(",") if step.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {','.join(STEPS)}")

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a shell without job control starts background commands with SIGINT
    # ignored, and Python then installs no handler of its own.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    plan = QUICK if args.quick else FULL
    started_at = dt.datetime.now(dt.UTC)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    if args.quick:
        results_path = REPO / "bench" / "work" / f"results-{stamp}.json"
        page_path = REPO / "bench" / "work" / "benchmarks.md"
    else:
        results_path = REPO / "bench" / "results" / f"{stamp}.json"
        page_path = REPO / "docs" / "benchmarks.md"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    command = "bench/run " + " ".join(sys.argv[1:])
    record: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "command": command.strip(),
        "quick": args.quick,
        "plan": plan.__dict__,
        "machine": machine_info(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="moodle-load-bench."))
    # nginx's worker runs as nobody and must reach the pages inside this folder.
    workdir.chmod(0o755)
    bench = Benchmark(plan, workdir)
    record["steps"] = bench.results
    clock = time.monotonic()

    def write() -> None:
        record["elapsed_s"] = round(time.monotonic() - clock, 1)
        results_path.write_text(json.dumps(record, indent=2) + "\n")

    interrupted = False
    try:
        bench.run(steps, write)
    except KeyboardInterrupt:
        interrupted = True
        print("[bench] interrupted: stopping every server", file=sys.stderr)
    finally:
        bench.processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    record["interrupted"] = interrupted
    write()
    print(f"[bench] raw results: {results_path}", file=sys.stderr)
    if interrupted:
        return 130
    page_path.write_text(report.render(record, results_path.relative_to(REPO)))
    print(f"[bench] page: {page_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
