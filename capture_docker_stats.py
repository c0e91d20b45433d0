#!/usr/bin/env python3
"""Sample Docker containers at a fixed interval, counting as `docker stats` does.

During a load test this script records what each container spends: CPU %, memory,
PIDs, network and block I/O. It writes one CSV per container and one row per interval,
so the figures can be lined up with the latency of the same run. Each container has one
stats stream from the engine, read by a background thread. The main thread writes the
latest sample of every container on one monotonic schedule: tick k falls at start +
k x interval, so the rows do not drift. A tick that comes too late is skipped and
counted, never made up. Every row is written with one write() call, so SIGKILL loses
at most the row being written. SIGINT and SIGTERM end the run with every file
complete, and stdout gets a JSON summary.

Usage:
    capture_docker_stats.py --containers moodle-docker-webserver-1 \\
        moodle-docker-db-1 --interval 1 --duration 300 --tag 1a2b3c4

Exit codes:
    0   the duration ran out
    1   failure before sampling (engine unreachable, container not found or not
        running, output file not writable), and then no file is created; or a CSV
        write failed during the run; or the summary could not be written to stdout
        (the CSV files are complete)
    2   invalid command line (argparse)
    130 stopped by SIGINT (Ctrl-C); files complete, summary printed
    143 stopped by SIGTERM; files complete, summary printed

Limits:
    - Linux containers only; Windows payloads carry other keys.
    - The engine refreshes its figures about once a second (Docker 20.10's stats
      collector), so an interval below 1 s repeats the last sample in several rows
      and gives no finer resolution.
    - CPU % needs two samples of the same running container: the first row of a
      file, and the first after a restart, have an empty CPU % cell.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests

LOG = logging.getLogger("capture_docker_stats")

CSV_COLUMNS = (
    "timestamp",
    "container",
    "cpu_percent",
    "mem_used_bytes",
    "mem_limit_bytes",
    "pids",
    "net_rx_bytes",
    "net_tx_bytes",
    "blk_read_bytes",
    "blk_write_bytes",
)
# Named after the `docker stats --format` fields {{.CPUPerc}}, {{.MemUsage}} and so on.
HUMAN_COLUMNS = ("cpu_perc", "mem_usage", "mem_perc", "net_io", "block_io")

# Docker 20.10 sends one sample per stream about once a second (measured here: every
# 1.003 s), so rows closer together repeat a sample.
ENGINE_REFRESH_S = 1.0
# Shorter intervals only repeat rows, and the schedule's own jitter is a few ms.
MIN_INTERVAL_S = 0.05
# Time allowed for the first sample of every container before the ticks start. A new
# stream normally delivers its first sample within one second.
FIRST_SAMPLE_TIMEOUT_S = 5.0
# Pause before a stats stream that failed or ended is opened again.
RECONNECT_S = 1.0
# The engine reports a stopped container with this zero time in "read".
ZERO_TIME_PREFIX = "0001-01-01"
TAG_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_SOCKET = "unix:///var/run/docker.sock"


class CaptureError(Exception):
    """A failure reported as one `error: ...` line with exit code 1."""


@dataclass(frozen=True)
class Snapshot:
    """The newest state a stats stream saw; replaced whole, so reading it is safe."""

    sequence: int
    payload: dict[str, Any] | None
    running: bool


@dataclass
class Values:
    """One row's figures; None is an empty cell."""

    cpu_percent: float | None
    mem_used_bytes: int | None
    mem_limit_bytes: int | None
    pids: int | None
    net_rx_bytes: int | None
    net_tx_bytes: int | None
    blk_read_bytes: int | None
    blk_write_bytes: int | None


@dataclass
class CounterTotal:
    """Increase of one cumulative counter, summed over the spans the container ran."""

    total: int = 0
    span_first: int | None = None
    span_last: int | None = None
    seen: bool = False

    def add(self, value: int | None) -> None:
        if value is None:
            return
        self.seen = True
        if self.span_first is None or (
            self.span_last is not None and value < self.span_last
        ):
            # A restarted container starts its counters again from zero.
            self.close_span()
            self.span_first = value
        self.span_last = value

    def close_span(self) -> None:
        if self.span_first is not None and self.span_last is not None:
            self.total += self.span_last - self.span_first
        self.span_first = None
        self.span_last = None

    def result(self) -> int | None:
        self.close_span()
        return self.total if self.seen else None


@dataclass
class Totals:
    """Summary figures of one container, updated with every row."""

    samples: int = 0
    missed_ticks: int = 0
    ticks_not_running: int = 0
    repeated_samples: int = 0
    cpu_sum: float = 0.0
    cpu_count: int = 0
    cpu_max: float | None = None
    mem_max: int | None = None
    counters: dict[str, CounterTotal] = field(
        default_factory=lambda: {
            name: CounterTotal()
            for name in (
                "net_rx_bytes",
                "net_tx_bytes",
                "blk_read_bytes",
                "blk_write_bytes",
            )
        }
    )


# ---------------------------------------------------------------- formulas


def dig(payload: Any, *keys: str) -> Any:
    """Return payload[k1][k2]..., or None when a key is missing or a level is null."""
    value = payload
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def online_cpus(cpu_stats: Any) -> int | None:
    """Count CPUs as the Docker CLI does: online_cpus, else len(percpu_usage)."""
    count = dig(cpu_stats, "online_cpus")
    if isinstance(count, int) and count > 0:
        return count
    percpu = dig(cpu_stats, "cpu_usage", "percpu_usage")
    if isinstance(percpu, list) and percpu:
        return len(percpu)
    return None


def cpu_percent(
    previous: dict[str, Any] | None, current: dict[str, Any]
) -> float | None:
    """Compute CPU % between two samples of one container, as docker/cli does.

    The formula is calculateCPUPercentUnix of cli/command/container/stats_helpers.go:
    (container CPU delta / system CPU delta) x online CPUs x 100, not clamped at 100,
    0 when either delta is not positive, None without a previous sample or a key.
    """
    if previous is None:
        return None
    container_now = dig(current, "cpu_stats", "cpu_usage", "total_usage")
    container_before = dig(previous, "cpu_stats", "cpu_usage", "total_usage")
    system_now = dig(current, "cpu_stats", "system_cpu_usage")
    system_before = dig(previous, "cpu_stats", "system_cpu_usage")
    cpus = online_cpus(current.get("cpu_stats"))
    numbers = (container_now, container_before, system_now, system_before)
    if cpus is None or not all(isinstance(n, int) for n in numbers):
        return None
    container_delta = container_now - container_before
    system_delta = system_now - system_before
    if container_delta <= 0 or system_delta <= 0:
        return 0.0
    return container_delta / system_delta * cpus * 100.0


def memory_used(memory_stats: Any) -> int | None:
    """Compute memory used without the page cache, as the Docker CLI does.

    usage minus total_inactive_file (cgroup v1) when smaller than usage, else minus
    inactive_file (cgroup v2) when smaller, else usage. A missing counter in "stats"
    is 0 for the CLI too.
    """
    usage = dig(memory_stats, "usage")
    if not isinstance(usage, int):
        return None
    stats = dig(memory_stats, "stats") or {}
    v1_inactive = stats.get("total_inactive_file")
    if isinstance(v1_inactive, int) and v1_inactive < usage:
        return usage - v1_inactive
    v2_inactive = stats.get("inactive_file", 0)
    if isinstance(v2_inactive, int) and v2_inactive < usage:
        return usage - v2_inactive
    return usage


def network_bytes(payload: dict[str, Any]) -> tuple[int | None, int | None]:
    """Sum rx_bytes and tx_bytes over all interfaces, or None without "networks"."""
    networks = payload.get("networks")
    if not isinstance(networks, dict):
        return None, None
    received = sum(dig(nic, "rx_bytes") or 0 for nic in networks.values())
    sent = sum(dig(nic, "tx_bytes") or 0 for nic in networks.values())
    return received, sent


def block_io_bytes(payload: dict[str, Any]) -> tuple[int | None, int | None]:
    """Sum the Read and Write entries of io_service_bytes_recursive.

    cgroup v1 names the operations Read, Write, Sync, Async, Discard and Total,
    cgroup v2 read and write, so the names are compared without case and only read
    and write count. A null or missing list gives None.
    """
    entries = dig(payload, "blkio_stats", "io_service_bytes_recursive")
    if not isinstance(entries, list):
        return None, None
    read = write = 0
    for entry in entries:
        operation = str(dig(entry, "op") or "").lower()
        value = dig(entry, "value")
        if not isinstance(value, int):
            continue
        if operation == "read":
            read += value
        elif operation == "write":
            write += value
    return read, write


def compute_values(previous: dict[str, Any] | None, current: dict[str, Any]) -> Values:
    """Turn one stats payload (and the one before it) into one row's figures."""
    memory_stats = current.get("memory_stats")
    limit = dig(memory_stats, "limit")
    pids = dig(current, "pids_stats", "current")
    net_rx, net_tx = network_bytes(current)
    blk_read, blk_write = block_io_bytes(current)
    return Values(
        cpu_percent=cpu_percent(previous, current),
        mem_used_bytes=memory_used(memory_stats),
        mem_limit_bytes=limit if isinstance(limit, int) else None,
        pids=pids if isinstance(pids, int) else None,
        net_rx_bytes=net_rx,
        net_tx_bytes=net_tx,
        blk_read_bytes=blk_read,
        blk_write_bytes=blk_write,
    )


def missing_fields(values: Values) -> list[str]:
    """Name the row's empty cells. CPU % is left out: a first sample has none."""
    names = [
        "mem_used_bytes",
        "mem_limit_bytes",
        "pids",
        "blk_read_bytes",
        "blk_write_bytes",
    ]
    return [name for name in names if getattr(values, name) is None]


# ---------------------------------------------------------------- formatting


def iso_timestamp(moment: datetime) -> str:
    """Format a UTC time as ISO 8601 with milliseconds and a Z suffix."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def go_general(value: float, digits: int) -> str:
    """Format like Go's %.<digits>g, which go-units uses; Python's %g matches it."""
    return f"{value:.{digits}g}"


def size_iec(size: float) -> str:
    """Format bytes as go-units BytesSize: base 1024, 4 significant digits, KiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
    index = 0
    while size >= 1024 and index < len(units) - 1:
        size /= 1024
        index += 1
    return go_general(size, 4) + units[index]


def size_decimal(size: float) -> str:
    """Format bytes as go-units HumanSizeWithPrecision(size, 3): base 1000, kB."""
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
    index = 0
    while size >= 1000 and index < len(units) - 1:
        size /= 1000
        index += 1
    return go_general(size, 3) + units[index]


def human_cells(values: Values) -> list[str]:
    """Render the docker stats columns, with "--" where the CLI shows no value."""
    cpu = "--" if values.cpu_percent is None else f"{values.cpu_percent:.2f}%"
    used, limit = values.mem_used_bytes, values.mem_limit_bytes
    if used is None or limit is None:
        mem_usage, mem_perc = "-- / --", "--"
    else:
        mem_usage = f"{size_iec(used)} / {size_iec(limit)}"
        mem_perc = f"{used / limit * 100:.2f}%" if limit else "0.00%"
    net_io = network_cell(values.net_rx_bytes, values.net_tx_bytes)
    block_io = pair_cell(values.blk_read_bytes, values.blk_write_bytes)
    return [cpu, mem_usage, mem_perc, net_io, block_io]


def pair_cell(first: int | None, second: int | None) -> str:
    if first is None or second is None:
        return "--"
    return f"{size_decimal(first)} / {size_decimal(second)}"


def network_cell(received: int | None, sent: int | None) -> str:
    """Render NET I/O; without "networks" the CLI sums no interface and shows 0B."""
    return pair_cell(received or 0, sent or 0)


def cell(value: int | float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_row(timestamp: str, name: str, values: Values, human: bool) -> list[str]:
    row = [
        timestamp,
        name,
        cell(values.cpu_percent),
        cell(values.mem_used_bytes),
        cell(values.mem_limit_bytes),
        cell(values.pids),
        cell(values.net_rx_bytes),
        cell(values.net_tx_bytes),
        cell(values.blk_read_bytes),
        cell(values.blk_write_bytes),
    ]
    if human:
        row.extend(human_cells(values))
    return row


CSV_QUOTED_CHARACTERS = re.compile(r'["\r\n]')


def csv_line(row: list[str] | tuple[str, ...]) -> bytes:
    """Encode one CSV row, quoted as csv.writer quotes it (QUOTE_MINIMAL).

    Numbers, timestamps, container names and the human columns never contain a
    comma, a quote or a line break, so joining the cells gives csv.writer's output
    without a writer and a buffer per row. A row with such a cell goes through
    csv.writer.
    """
    line = ",".join(row)
    if line.count(",") == len(row) - 1 and not CSV_QUOTED_CHARACTERS.search(line):
        return (line + "\n").encode()
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue().encode()


def output_path(outdir: Path, name: str, stamp: str, tag: str | None) -> Path:
    suffix = f"_{tag}" if tag else ""
    return outdir / f"{name}_{stamp}{suffix}.csv"


def round_or_none(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


# ---------------------------------------------------------------- Docker edge


def engine_address() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET


def describe_engine_failure(err: Exception) -> str:
    """Build the one-line error for an engine that cannot be reached."""
    address = engine_address()
    origin = "DOCKER_HOST" if os.environ.get("DOCKER_HOST") else "the default socket"
    if "Permission denied" in str(err):
        return (
            f"permission denied on the Docker socket, {address} ({origin}), "
            "add your user to the docker group (sudo usermod -aG docker $USER, "
            "then log in again) or run as root"
        )
    return (
        f"cannot connect to the Docker engine, {address} ({origin}), "
        "start the engine or set DOCKER_HOST to its socket"
    )


def connect(container_count: int) -> docker.DockerClient:
    """Connect to the engine of DOCKER_HOST, with one pooled connection per stream.

    from_env requests the engine's API version, so an unreachable engine fails
    here without a separate ping.
    """
    try:
        client = docker.from_env(max_pool_size=container_count + 2)
    except (docker.errors.DockerException, requests.RequestException) as err:
        raise CaptureError(describe_engine_failure(err)) from err
    if client.api.base_url.startswith("http+docker://"):
        # With trust_env, requests looks up proxy variables and ~/.netrc on every
        # request. Neither applies to a local socket (unix, npipe or ssh), which
        # is where the SDK's base URL has this scheme. tcp:// hosts keep them.
        client.api.trust_env = False
    return client


@dataclass(frozen=True)
class ContainerSummary:
    """A container as the engine's list or inspect response describes it."""

    id: str
    name: str
    status: str


def list_containers(client: docker.DockerClient) -> dict[str, ContainerSummary]:
    """Map every container's full ID and name to it, from one list request.

    Names of legacy links ("/web/db") are left out, so only a container's own
    name maps to it.
    """
    try:
        entries = client.api.containers(all=True)
    except (docker.errors.DockerException, requests.RequestException) as err:
        raise CaptureError(describe_engine_failure(err)) from err
    by_name: dict[str, ContainerSummary] = {}
    by_id: dict[str, ContainerSummary] = {}
    for entry in entries:
        names = [n[1:] for n in entry.get("Names") or [] if n.count("/") == 1]
        status = entry.get("State")
        if len(names) != 1 or not isinstance(status, str):
            continue
        summary = ContainerSummary(entry["Id"], names[0], status)
        by_name[summary.name] = summary
        by_id[summary.id] = summary
    # The engine's own lookup tries a full ID before a name, so an ID entry
    # replaces a name entry with the same key.
    return by_name | by_id


def inspect_container(client: docker.DockerClient, reference: str) -> ContainerSummary:
    """Look a reference up with the engine, which also accepts ID prefixes."""
    try:
        container = client.containers.get(reference)
    except docker.errors.NotFound as err:
        raise CaptureError(
            f"container not found, {reference}, check the name with docker ps -a"
        ) from err
    except (docker.errors.DockerException, requests.RequestException) as err:
        raise CaptureError(describe_engine_failure(err)) from err
    return ContainerSummary(container.id, container.name, container.status)


def resolve_containers(client: docker.DockerClient, references: list[str]) -> list[str]:
    """Map names or IDs to container names. Each must exist and be running.

    One list request resolves full IDs and exact names, which saves an inspect
    request per container at start-up. Other references (ID prefixes, names with
    a leading slash, containers created since the list) go to the engine's
    inspect endpoint, which resolves them as docker inspect does.
    """
    known = list_containers(client)
    names: list[str] = []
    ids: set[str] = set()
    for reference in references:
        container = known.get(reference) or inspect_container(client, reference)
        if container.status != "running":
            raise CaptureError(
                f"container is not running, {reference} (status {container.status}), "
                f"start it with docker start {container.name}"
            )
        if container.id in ids:
            raise CaptureError(
                f"container given twice, {reference}, list each container once"
            )
        ids.add(container.id)
        names.append(container.name)
    return names


class StatsStream(threading.Thread):
    """Reads one container's stats stream and keeps its newest sample.

    The stream is opened by name, so a container removed and created again under
    the same name is found again. A stopped container stays subscribed: the engine
    then sends samples with a zero "read" time until the container runs again.
    """

    def __init__(self, client: docker.DockerClient, name: str, stop: threading.Event):
        super().__init__(name=f"stats-{name}", daemon=True)
        self.client = client
        self.container = name
        self.stop_event = stop
        self.snapshot = Snapshot(sequence=0, payload=None, running=True)
        self.first_sample = threading.Event()
        self.last_arrival = 0.0
        self.errors = 0

    def publish(self, payload: dict[str, Any] | None, running: bool) -> None:
        self.snapshot = Snapshot(self.snapshot.sequence + 1, payload, running)
        self.last_arrival = time.monotonic()
        if not self.first_sample.is_set():
            # set() takes the event's lock and notifies waiters, so it runs once.
            self.first_sample.set()

    def publish_payload(self, text: bytes) -> None:
        payload = json.loads(text)
        stopped = str(payload.get("read", "")).startswith(ZERO_TIME_PREFIX)
        self.publish(None if stopped else payload, running=not stopped)

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.read_stream()
            except docker.errors.NotFound:
                LOG.debug("container %s not found, retrying", self.container)
            except (
                docker.errors.DockerException,
                requests.RequestException,
                json.JSONDecodeError,
            ) as err:
                self.errors += 1
                if self.errors == 1:
                    LOG.warning(
                        "stats stream of %s failed, retrying every %.0f s: %s",
                        self.container,
                        RECONNECT_S,
                        err,
                    )
            if self.stop_event.is_set():
                return
            self.publish(None, running=False)
            self.stop_event.wait(RECONNECT_S)

    def open_stream(self) -> requests.Response:
        """Request the stats stream with the SDK's session and negotiated version.

        APIClient.stats reads each chunk with two urllib3 reads, one byte and then
        the rest. requests' iter_content reads each chunk whole, which took about
        a third less CPU per sample in the stats threads (10 busybox containers,
        Docker 20.10, docker 7.2.0, 2 cores). Errors become the SDK's APIError
        and NotFound as APIClient.stats raises them.
        """
        api = self.client.api
        container = urllib.parse.quote(self.container, safe="")
        response = api.get(
            f"{api.base_url}/v{api.api_version}/containers/{container}/stats",
            params={"stream": True},
            stream=True,
            timeout=api.timeout,
        )
        try:
            response.raise_for_status()
        except requests.HTTPError as err:
            response.close()
            # Raises NotFound for a 404 and APIError otherwise, as the SDK does.
            docker.errors.create_api_error_from_http_exception(err)
        return response

    def read_stream(self) -> None:
        """Split the stream into payloads and decode each with json.loads.

        The engine ends every payload with a newline (Go's json.Encoder, which
        escapes newlines inside strings), and one chunk normally carries one whole
        payload.
        """
        response = self.open_stream()
        try:
            pending = b""
            for chunk in response.iter_content(chunk_size=None):
                if self.stop_event.is_set():
                    return
                if not pending and chunk.find(b"\n") == len(chunk) - 1:
                    self.publish_payload(chunk)
                    continue
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    line = pending[:end]
                    pending = pending[end + 1 :]
                    if line.strip():
                        self.publish_payload(line)
            if pending.strip():
                self.publish_payload(pending)
        finally:
            response.close()


# ---------------------------------------------------------------- CSV files


class ContainerRecorder:
    """Writes one container's rows and keeps its summary figures."""

    def __init__(self, name: str, path: Path, human: bool):
        self.name = name
        self.path = path
        self.human = human
        self.file: io.FileIO | None = None
        self.previous: dict[str, Any] | None = None
        self.previous_id: str | None = None
        self.last_sequence = -1
        self.last_values: Values | None = None
        self.warned_missing = False
        self.stopped_logged = False
        self.totals = Totals()

    def create(self) -> None:
        columns = CSV_COLUMNS + (HUMAN_COLUMNS if self.human else ())
        self.file = open(self.path, "xb", buffering=0)  # noqa: SIM115
        self.write(csv_line(columns))

    def write(self, data: bytes) -> None:
        """Write one line with a single write() call, so a kill cannot split it."""
        assert self.file is not None
        try:
            written = self.file.write(data)
        except OSError as err:
            raise CaptureError(
                f"cannot write the CSV file, {self.path} ({err.strerror}), "
                "check the free disk space"
            ) from err
        if written != len(data):
            raise CaptureError(
                f"short write to the CSV file, {self.path}, check the free disk space"
            )

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def on_stopped(self) -> None:
        self.totals.ticks_not_running += 1
        self.previous = None
        for counter in self.totals.counters.values():
            counter.close_span()
        if self.file is not None:
            LOG.warning(
                "container %s is not running; its file is closed, sampling resumes "
                "when a container of that name runs again",
                self.name,
            )
            self.close()

    def on_tick(self, timestamp: str, snapshot: Snapshot) -> None:
        if not snapshot.running:
            self.on_stopped()
            return
        if snapshot.payload is None:
            self.totals.missed_ticks += 1
            return
        if self.file is None:
            LOG.info("container %s runs again, appending to %s", self.name, self.path)
            self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115
        values = self.values_for(snapshot)
        self.write(csv_line(format_row(timestamp, self.name, values, self.human)))
        self.count(values)

    def values_for(self, snapshot: Snapshot) -> Values:
        """Compute the row, or repeat the last one when the engine sent nothing new."""
        if snapshot.sequence == self.last_sequence and self.last_values is not None:
            self.totals.repeated_samples += 1
            return self.last_values
        payload = snapshot.payload
        assert payload is not None
        if payload.get("id") != self.previous_id:
            # Another container under the same name: its counters are unrelated.
            self.previous = None
        # NOTE: a restart quicker than one engine refresh sends no stopped sample, so
        # its first row gets CPU 0.00 (negative delta, as the CLI counts) not empty.
        values = compute_values(self.previous, payload)
        missing = missing_fields(values)
        if missing and not self.warned_missing:
            self.warned_missing = True
            LOG.warning(
                "container %s: the stats payload lacks %s, leaving those cells empty "
                "(warned once per container)",
                self.name,
                ", ".join(missing),
            )
        self.previous = payload
        self.previous_id = payload.get("id")
        self.last_sequence = snapshot.sequence
        self.last_values = values
        return values

    def count(self, values: Values) -> None:
        totals = self.totals
        totals.samples += 1
        if values.cpu_percent is not None:
            totals.cpu_sum += values.cpu_percent
            totals.cpu_count += 1
            totals.cpu_max = max(totals.cpu_max or 0.0, values.cpu_percent)
        if values.mem_used_bytes is not None:
            totals.mem_max = max(totals.mem_max or 0, values.mem_used_bytes)
        for name, counter in totals.counters.items():
            counter.add(getattr(values, name))

    def summary(self) -> dict[str, Any]:
        totals = self.totals
        mean = totals.cpu_sum / totals.cpu_count if totals.cpu_count else None
        result: dict[str, Any] = {
            "file": str(self.path),
            "samples": totals.samples,
            "missed_ticks": totals.missed_ticks,
            "ticks_not_running": totals.ticks_not_running,
            "repeated_samples": totals.repeated_samples,
            "cpu_percent_mean": round_or_none(mean),
            "cpu_percent_max": round_or_none(totals.cpu_max),
            "mem_used_bytes_max": totals.mem_max,
        }
        for name, counter in totals.counters.items():
            result[name] = counter.result()
        return result


# ---------------------------------------------------------------- schedule


def wait_for_signal(timeout_s: float) -> int | None:
    """Sleep up to timeout_s and return the stop signal that arrived, or None."""
    info = signal.sigtimedwait(STOP_SIGNALS, max(timeout_s, 0.0))
    return None if info is None else info.si_signo


def wait_for_first_samples(streams: list[StatsStream]) -> float:
    """Wait for every stream's first sample; return when ticks should start.

    Docker 20.10 sends the samples of all streams in one round each second (seen
    here: 60 rows of 3 containers at 1 s without a repeated sample). Starting half a
    refresh after the newest arrival puts the ticks between rounds, so at 1 s each
    tick finds a new sample.
    """
    deadline = time.monotonic() + FIRST_SAMPLE_TIMEOUT_S
    for stream in streams:
        if not stream.first_sample.wait(max(deadline - time.monotonic(), 0.0)):
            LOG.warning(
                "no sample of %s within %.0f s; its rows start when one arrives",
                stream.container,
                FIRST_SAMPLE_TIMEOUT_S,
            )
    newest = max(stream.last_arrival for stream in streams)
    if newest == 0.0:
        return time.monotonic()
    return max(newest + ENGINE_REFRESH_S / 2, time.monotonic())


@dataclass
class RunResult:
    """Outcome of the sampling loop: rows per container, skipped ticks, the stop."""

    ticks: int
    missed_ticks: int
    stopped_by: str
    exit_code: int


def run_schedule(
    recorders: list[ContainerRecorder],
    streams: list[StatsStream],
    interval_s: float,
    duration_s: int,
) -> RunResult:
    """Write one row per container at start + k x interval until the end or a signal."""
    start = wait_for_first_samples(streams)
    tick = 0
    ticks_written = 0
    missed = 0
    while True:
        due = start + tick * interval_s
        if duration_s and tick * interval_s >= duration_s - 1e-9:
            signum = wait_for_signal(start + duration_s - time.monotonic())
            if signum is None:
                return RunResult(ticks_written, missed, "duration", 0)
        else:
            signum = wait_for_signal(due - time.monotonic())
        if signum is not None:
            name = signal.Signals(signum).name
            return RunResult(ticks_written, missed, name, 128 + signum)
        late = int((time.monotonic() - due) / interval_s)
        if late > 0:
            # Skip the ticks whose time has passed instead of writing a burst.
            missed += late
            for recorder in recorders:
                recorder.totals.missed_ticks += late
            tick += late
            continue
        timestamp = iso_timestamp(datetime.now(UTC))
        for recorder, stream in zip(recorders, streams, strict=True):
            recorder.on_tick(timestamp, stream.snapshot)
        ticks_written += 1
        tick += 1


def drain_stop_signals() -> None:
    """Consume pending stop signals, so that unblocking them cannot kill us."""
    while wait_for_signal(0) is not None:
        pass


# ---------------------------------------------------------------- command line


def interval_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid interval: {text!r}, give seconds such as 1 or 0.5"
        ) from None
    if not math.isfinite(value) or value < MIN_INTERVAL_S:
        raise argparse.ArgumentTypeError(
            f"interval must be at least {MIN_INTERVAL_S} s, got {text}"
        )
    return value


def duration_seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid duration: {text!r}, give whole seconds such as 300, or 0 to run"
            " until stopped"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"duration must be 0 or more, got {text}")
    return value


def file_tag(text: str) -> str:
    if not TAG_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid tag {text!r}: use 1 to 64 of A-Z a-z 0-9 . _ -"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Sample Docker containers the way `docker stats` counts, one "
        "CSV per container, and print a JSON summary on stdout.",
    )
    target = parser.add_argument_group("containers and schedule")
    target.add_argument(
        "--containers",
        nargs="+",
        required=True,
        metavar="NAME",
        help="container names or IDs, each running (example: moodle-docker-db-1)",
    )
    target.add_argument(
        "--interval",
        type=interval_seconds,
        default=1.0,
        metavar="SECONDS",
        help="time between rows in seconds (default 1.0, minimum "
        f"{MIN_INTERVAL_S}); below 1 s rows repeat the engine's last sample",
    )
    target.add_argument(
        "--duration",
        type=duration_seconds,
        default=600,
        metavar="SECONDS",
        help="length of the capture in seconds (default 600); 0 runs until "
        "SIGINT or SIGTERM",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--outdir",
        type=Path,
        default=Path("stats"),
        metavar="PATH",
        help="folder for the CSV files, created when missing (default stats)",
    )
    output.add_argument(
        "--tag",
        type=file_tag,
        metavar="TAG",
        help="added to each file name, e.g. a commit id: NAME_STAMP_TAG.csv",
    )
    output.add_argument(
        "--human",
        action="store_true",
        help="append the docker stats columns cpu_perc, mem_usage, mem_perc, "
        "net_io and block_io as the CLI prints them",
    )
    return parser


def create_recorders(
    names: list[str], args: argparse.Namespace
) -> list[ContainerRecorder]:
    """Create every CSV file with its header, or none of them."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    recorders = [
        ContainerRecorder(
            name, output_path(args.outdir, name, stamp, args.tag), args.human
        )
        for name in names
    ]
    try:
        args.outdir.mkdir(parents=True, exist_ok=True)
        for recorder in recorders:
            recorder.create()
    except OSError as err:
        for recorder in recorders:
            if recorder.file is not None:
                recorder.close()
                recorder.path.unlink(missing_ok=True)
        raise CaptureError(
            f"cannot create the CSV file, {err.filename} ({err.strerror}), "
            "choose a writable --outdir"
        ) from err
    return recorders


def print_summary(summary: dict[str, Any]) -> bool:
    """Print the summary on stdout; return False when stdout cannot take it."""
    try:
        print(json.dumps(summary, indent=2), flush=True)
    except OSError as err:
        # A closed pipe or a full disk. The CSV files are complete, and one error line
        # states it. stdout then goes to /dev/null, so the flush at exit cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        reason = err.strerror or type(err).__name__
        LOG.error(
            "cannot write the summary to stdout (%s); the CSV files are complete",
            reason,
        )
        return False
    return True


def capture(args: argparse.Namespace) -> int:
    """Run the capture after the command line is valid; return the exit code."""
    if args.outdir.exists() and not args.outdir.is_dir():
        raise CaptureError(
            f"--outdir is not a folder, {args.outdir}, choose a folder path"
        )
    client = connect(len(args.containers))
    names = resolve_containers(client, args.containers)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    stop = threading.Event()
    recorders: list[ContainerRecorder] = []
    try:
        recorders = create_recorders(names, args)
        streams = [StatsStream(client, name, stop) for name in names]
        for stream in streams:
            stream.start()
        LOG.info(
            "sampling %s every %s s %s into %s",
            ", ".join(names),
            args.interval,
            f"for {args.duration} s" if args.duration else "until stopped",
            args.outdir,
        )
        # The imported modules and the SDK's objects live until the exit. Frozen,
        # they are left out of every later collection, including the one at exit.
        gc.freeze()
        result = run_schedule(recorders, streams, args.interval, args.duration)
    finally:
        stop.set()
        for recorder in recorders:
            recorder.close()
        drain_stop_signals()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    LOG.info("stopped by %s after %d ticks", result.stopped_by, result.ticks)
    printed = print_summary(
        {
            "interval_s": args.interval,
            "duration_s": args.duration,
            "ticks": result.ticks,
            "missed_ticks": result.missed_ticks,
            "stopped_by": result.stopped_by,
            "containers": {rec.name: rec.summary() for rec in recorders},
        }
    )
    if not printed and result.exit_code == 0:
        return 1
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    repeated = sorted({name for name in args.containers
                       if args.containers.count(name) > 1})
    if repeated:
        parser.error(
            f"container given twice, {', '.join(repeated)}, list each container once"
        )
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return capture(args)
    except CaptureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C before sampling started: no file exists yet.
        print(
            "error: interrupted before sampling started, no file written",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
