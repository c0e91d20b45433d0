"""Tests of capture_docker_stats.py: formulas on recorded payloads, then real runs.

The formula tests use payloads recorded from Docker 20.10 on cgroup v1: a busy
container with 16 MiB in /dev/shm, 8 MiB of page cache and 3 processes, and the
payload the engine sends once that container stopped. The cgroup v2 pair is written
after the Engine API documentation's ContainerStatsResponse schema. Partial payloads
cover missing keys. The engine tests start busybox containers with
network_mode="none" and run the script as a subprocess.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import capture_docker_stats as cds
from tests import docker_engine

FIXTURES = Path(__file__).parent / "fixtures"
SCRIPT = Path(__file__).parent.parent / "capture_docker_stats.py"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
MIB = 1024 * 1024


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def v1_stream() -> list[dict[str, Any]]:
    """Three consecutive payloads of one stream: the first has no precpu_stats."""
    return copy.deepcopy(load_fixture("docker_stats_cgroup_v1_stream.json"))


@pytest.fixture
def v1_stopped() -> dict[str, Any]:
    return copy.deepcopy(load_fixture("docker_stats_cgroup_v1_stopped.json"))


@pytest.fixture
def v2_stream() -> list[dict[str, Any]]:
    return copy.deepcopy(load_fixture("docker_stats_cgroup_v2_stream.json"))


@pytest.fixture
def partial() -> dict[str, dict[str, Any]]:
    return copy.deepcopy(load_fixture("docker_stats_partial.json"))


# ---------------------------------------------------------------- CPU %


def test_cpu_percent_cgroup_v1_consecutive(v1_stream):
    container_delta = 5002222412 - 4055207765
    system_delta = 7976020000000 - 7974030000000
    expected = container_delta / system_delta * 2 * 100
    assert cds.cpu_percent(v1_stream[1], v1_stream[2]) == pytest.approx(expected)
    assert 95.0 < expected < 95.3


def test_cpu_percent_cgroup_v2_not_clamped(v2_stream):
    # 1.5 s of CPU time in 1 s on 4 online CPUs, no percpu_usage on cgroup v2.
    assert cds.cpu_percent(v2_stream[0], v2_stream[1]) == pytest.approx(150.0)


def test_cpu_percent_no_previous_is_none(v1_stream):
    assert cds.cpu_percent(None, v1_stream[0]) is None


def test_cpu_percent_counter_reset_is_zero(v1_stream):
    # A restarted container counts from zero again: the delta is negative.
    assert cds.cpu_percent(v1_stream[2], v1_stream[1]) == 0.0


def test_cpu_percent_same_sample_is_zero(v1_stream):
    assert cds.cpu_percent(v1_stream[1], v1_stream[1]) == 0.0


def test_cpu_percent_counts_percpu_without_online_cpus(partial):
    current = partial["percpu_without_online_cpus"]
    previous = copy.deepcopy(current)
    previous["cpu_stats"]["cpu_usage"]["total_usage"] = 1000000000
    previous["cpu_stats"]["system_cpu_usage"] = 6000000000
    # 1 s of CPU time over 4 s of system time on 4 CPUs.
    assert cds.cpu_percent(previous, current) == pytest.approx(100.0)


def test_cpu_percent_missing_system_usage_is_none(v1_stream, v1_stopped, partial):
    assert cds.cpu_percent(v1_stream[2], v1_stopped) is None
    assert cds.cpu_percent(v1_stream[2], partial["starting"]) is None


# ---------------------------------------------------------------- memory


def test_memory_used_cgroup_v1_subtracts_total_inactive_file(v1_stream):
    # 26361856 usage - 6291456 total_inactive_file; docker stats showed 19.14MiB.
    assert cds.memory_used(v1_stream[2]["memory_stats"]) == 20070400


def test_memory_used_cgroup_v2_subtracts_inactive_file(v2_stream):
    assert cds.memory_used(v2_stream[1]["memory_stats"]) == 104857600 - 20971520


def test_memory_used_falls_back_like_cli(partial):
    # total_inactive_file above usage: the CLI goes on to inactive_file.
    memory = partial["inactive_file_above_usage"]["memory_stats"]
    assert cds.memory_used(memory) == 4096000 - 1024000


def test_memory_used_without_usage_is_none(v1_stopped):
    assert cds.memory_used(v1_stopped["memory_stats"]) is None
    assert cds.memory_used(None) is None


# ---------------------------------------------------------------- network, block I/O


def test_network_sums_interfaces_cgroup_v2(v2_stream):
    assert cds.network_bytes(v2_stream[1]) == (5338 + 4641, 648 + 690)


def test_network_without_networks_is_none(v1_stream):
    assert "networks" not in v1_stream[2]
    assert cds.network_bytes(v1_stream[2]) == (None, None)


def test_block_io_cgroup_v2_lower_case_ops(v2_stream):
    assert cds.block_io_bytes(v2_stream[1]) == (7593984 + 4096, 4196 + 8192)


def test_block_io_cgroup_v1_skips_sync_async_total(partial):
    payload = partial["cgroup_v1_io_operations"]
    assert cds.block_io_bytes(payload) == (33792 + 20253184, 4096)


def test_block_io_empty_list_is_zero(v1_stream):
    assert v1_stream[2]["blkio_stats"]["io_service_bytes_recursive"] == []
    assert cds.block_io_bytes(v1_stream[2]) == (0, 0)


def test_block_io_null_list_is_none(partial, v1_stopped):
    assert cds.block_io_bytes(partial["null_io_list"]) == (None, None)
    assert cds.block_io_bytes(v1_stopped) == (None, None)
    assert cds.block_io_bytes(partial["starting"]) == (None, None)


# ---------------------------------------------------------------- whole rows


def test_compute_values_cgroup_v1(v1_stream):
    values = cds.compute_values(v1_stream[1], v1_stream[2])
    assert values.cpu_percent == pytest.approx(95.1773, abs=1e-3)
    assert values.mem_used_bytes == 20070400
    assert values.mem_limit_bytes == 25276203008
    assert values.pids == 3
    assert (values.net_rx_bytes, values.net_tx_bytes) == (None, None)
    assert (values.blk_read_bytes, values.blk_write_bytes) == (0, 0)


@pytest.mark.parametrize("which", ["stopped", "starting"])
def test_compute_values_partial_payload_empty_cells(
    which, v1_stream, v1_stopped, partial
):
    payload = v1_stopped if which == "stopped" else partial["starting"]
    values = cds.compute_values(v1_stream[2], payload)
    assert values.cpu_percent is None
    assert values.mem_used_bytes is None
    assert values.mem_limit_bytes is None
    assert values.pids is None
    assert values.blk_read_bytes is None
    assert cds.missing_fields(values) == [
        "mem_used_bytes",
        "mem_limit_bytes",
        "pids",
        "blk_read_bytes",
        "blk_write_bytes",
    ]


def test_format_row_exact_text_cgroup_v2(v2_stream):
    values = cds.compute_values(v2_stream[0], v2_stream[1])
    row = cds.format_row("2025-03-10T09:15:03.315Z", "db", values, human=True)
    assert cds.csv_line(row).decode() == (
        "2025-03-10T09:15:03.315Z,db,150.00,83886080,2147483648,12,9979,1338,"
        "7598080,12388,150.00%,80MiB / 2GiB,3.91%,9.98kB / 1.34kB,7.6MB / 12.4kB\n"
    )


def test_format_row_empty_cells_human_text(v1_stream):
    # Like the CLI: no CPU % yet is "--", no network interface is 0B / 0B.
    values = cds.compute_values(None, v1_stream[2])
    row = cds.format_row("2026-12-04T12:42:47.119Z", "busy", values, human=True)
    assert cds.csv_line(row).decode() == (
        "2026-12-04T12:42:47.119Z,busy,,20070400,25276203008,3,,,0,0,"
        "--,19.14MiB / 23.54GiB,0.08%,0B / 0B,0B / 0B\n"
    )


@pytest.mark.parametrize(
    ("size", "iec", "decimal"),
    [
        (0, "0B", "0B"),
        (648, "648B", "648B"),
        (1023, "1023B", "1.02kB"),
        (1024, "1KiB", "1.02kB"),
        (20070400, "19.14MiB", "20.1MB"),
        (25276203008, "23.54GiB", "25.3GB"),
    ],
)
def test_human_sizes_match_go_units(size, iec, decimal):
    assert cds.size_iec(size) == iec
    assert cds.size_decimal(size) == decimal


def test_iso_timestamp_milliseconds_utc():
    moment = cds.datetime(2026, 12, 4, 12, 0, 5, 123999, tzinfo=cds.UTC)
    assert cds.iso_timestamp(moment) == "2026-12-04T12:00:05.123Z"


def test_output_path_with_and_without_tag(tmp_path):
    stamp = "20261204-120005"
    assert cds.output_path(tmp_path, "db", stamp, "abc1").name == (
        "db_20261204-120005_abc1.csv"
    )
    assert cds.output_path(tmp_path, "db", stamp, None).name == "db_20261204-120005.csv"


@pytest.mark.parametrize(
    "row",
    [
        ["2026-12-04T12:00:05.123Z", "db", "", "20070400", "", "3", "", "", "0", "0"],
        ["t", "db", "1.00%", "80MiB / 2GiB", "--", "9.98kB / 1.34kB"],
        ["t", "a,b", "1"],
        ["t", 'say "hi"', "1"],
        ["t", "two\nlines", "1"],
        ["t", "carriage\rreturn", "1"],
        ["", "", ""],
    ],
)
def test_csv_line_matches_csv_writer(row):
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(row)
    assert cds.csv_line(row) == buffer.getvalue().encode()


# ---------------------------------------------------------------- recorder


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_recorder_repeats_stale_sample_and_resumes(tmp_path, v1_stream, caplog):
    recorder = cds.ContainerRecorder("busy", tmp_path / "busy.csv", human=False)
    recorder.create()
    snapshots = [
        cds.Snapshot(1, v1_stream[1], running=True),
        cds.Snapshot(2, v1_stream[2], running=True),
        cds.Snapshot(2, v1_stream[2], running=True),  # the engine sent nothing new
        cds.Snapshot(3, None, running=False),
        cds.Snapshot(4, None, running=False),
        cds.Snapshot(5, v1_stream[0], running=True),
        cds.Snapshot(6, v1_stream[1], running=True),
    ]
    for index, snapshot in enumerate(snapshots):
        recorder.on_tick(f"t{index}", snapshot)
    recorder.close()

    rows = read_rows(tmp_path / "busy.csv")
    assert rows[0] == list(cds.CSV_COLUMNS)
    assert [row[0] for row in rows[1:]] == ["t0", "t1", "t2", "t5", "t6"]
    cpu = [row[2] for row in rows[1:]]
    assert cpu[0] == ""
    assert cpu[1] == "95.18"
    assert cpu[2] == "95.18"
    assert cpu[3] == ""  # the first sample after a stop has no previous one
    assert float(cpu[4]) > 90
    assert "is not running" in caplog.text

    summary = recorder.summary()
    assert summary["samples"] == 5
    assert summary["repeated_samples"] == 1
    assert summary["ticks_not_running"] == 2
    assert summary["cpu_percent_max"] == pytest.approx(float(cpu[4]), abs=0.01)
    assert summary["mem_used_bytes_max"] == 20070400
    assert summary["net_rx_bytes"] is None
    assert summary["blk_read_bytes"] == 0


def test_recorder_warns_once_for_partial_payloads(tmp_path, partial, caplog):
    recorder = cds.ContainerRecorder("web", tmp_path / "web.csv", human=False)
    recorder.create()
    for sequence in range(1, 4):
        starting = copy.deepcopy(partial["starting"])
        recorder.on_tick(f"t{sequence}", cds.Snapshot(sequence, starting, True))
    recorder.close()
    warnings = [r for r in caplog.records if "lacks" in r.getMessage()]
    assert len(warnings) == 1
    rows = read_rows(tmp_path / "web.csv")
    assert len(rows) == 4
    assert rows[3][2:] == ["", "", "", "", "", "", "", ""]


def test_counter_total_sums_spans_across_restart():
    counter = cds.CounterTotal()
    for value in (100, 150, 400):
        counter.add(value)
    counter.add(20)  # restarted: counts from zero again
    counter.add(70)
    assert counter.result() == 300 + 50


def test_counter_total_never_seen_is_none():
    counter = cds.CounterTotal()
    counter.add(None)
    assert counter.result() is None


# ---------------------------------------------------------------- stats stream


class FakeResponse:
    """Fake of a streamed requests.Response that ends the run after its chunks."""

    def __init__(self, chunks: list[bytes], last: bool, stop: threading.Event):
        self.chunks = chunks
        self.last = last
        self.stop = stop
        self.closed = False

    def raise_for_status(self) -> None:
        pass

    def iter_content(self, chunk_size: int | None) -> Iterator[bytes]:
        assert chunk_size is None
        yield from self.chunks
        if self.last:
            self.stop.set()

    def close(self) -> None:
        self.closed = True


class FakeApi:
    """Fake of the SDK's APIClient session: each request streams the next chunks."""

    base_url = "http+docker://localhost"
    api_version = "1.41"
    timeout = 60

    def __init__(self, calls: list[list[bytes]], stop: threading.Event):
        self.calls = calls
        self.stop = stop
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.responses: list[FakeResponse] = []

    def get(self, url: str, **kwargs: Any) -> FakeResponse:
        self.requests.append((url, kwargs))
        index = len(self.requests) - 1
        last = index == len(self.calls) - 1
        response = FakeResponse(self.calls[index], last, self.stop)
        self.responses.append(response)
        return response


def read_payloads(calls: list[list[bytes]]) -> tuple[list[Any], Any]:
    """Run one StatsStream over the fake chunks; return what it published."""
    stop = threading.Event()
    api = FakeApi(calls, stop)
    stream = cds.StatsStream(SimpleNamespace(api=api), "db", stop)
    published: list[Any] = []
    original = stream.publish

    def record(payload: dict[str, Any] | None, running: bool) -> None:
        published.append((payload, running))
        original(payload, running)

    stream.publish = record  # type: ignore[method-assign]
    stream.run()
    return published, stream


def encoded(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n"


def test_stream_splits_and_joins_chunks(v1_stream):
    first, second, third = (encoded(p) for p in v1_stream)
    published, stream = read_payloads(
        [[first, second + third[:100], third[100:500], third[500:]]]
    )
    assert [payload for payload, _ in published] == v1_stream
    assert all(running for _, running in published)
    assert stream.snapshot.sequence == 3
    assert stream.snapshot.payload == v1_stream[2]


def test_stream_requests_versioned_stats_url(v1_stream):
    stop = threading.Event()
    api = FakeApi([[encoded(v1_stream[0])]], stop)
    cds.StatsStream(SimpleNamespace(api=api), "db", stop).run()
    assert api.requests == [
        (
            "http+docker://localhost/v1.41/containers/db/stats",
            {"params": {"stream": True}, "stream": True, "timeout": 60},
        )
    ]
    assert api.responses[0].closed


def test_stream_last_payload_without_newline(v1_stream):
    text = json.dumps(v1_stream[0]).encode()
    published, _ = read_payloads([[text[:700], text[700:]]])
    assert published == [(v1_stream[0], True)]


def test_stream_zero_read_time_is_stopped(v1_stream, v1_stopped):
    published, stream = read_payloads(
        [[encoded(v1_stream[0]), encoded(v1_stopped), encoded(v1_stream[1])]]
    )
    assert published == [(v1_stream[0], True), (None, False), (v1_stream[1], True)]
    assert stream.first_sample.is_set()


def test_stream_invalid_json_reconnects(v1_stream, caplog, monkeypatch):
    monkeypatch.setattr(cds, "RECONNECT_S", 0.01)
    published, stream = read_payloads([[b"{not json\n"], [encoded(v1_stream[0])]])
    assert published == [(None, False), (v1_stream[0], True)]
    assert stream.errors == 1
    assert "stats stream of db failed" in caplog.text


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "arguments",
    [
        ["--interval", "0"],
        ["--interval", "nan"],
        ["--interval", "fast"],
        ["--duration", "-1"],
        ["--duration", "1.5"],
        ["--tag", "a/b"],
        ["--tag", ""],
    ],
)
def test_parser_rejects_invalid_option(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cds.build_parser().parse_args(["--containers", "db", *arguments])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_parser_defaults():
    args = cds.build_parser().parse_args(["--containers", "db", "web"])
    assert args.containers == ["db", "web"]
    assert args.interval == 1.0
    assert args.duration == 600
    assert args.outdir == Path("stats")
    assert args.tag is None
    assert args.human is False


def run_script(
    arguments: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or dict(os.environ),
        check=False,
    )


def test_unreachable_engine_one_line_error(tmp_path):
    outdir = tmp_path / "out"
    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/missing.sock")
    result = run_script(["--containers", "db", "--outdir", str(outdir)], env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: cannot connect to the Docker engine, unix://")
    assert "DOCKER_HOST" in lines[0]
    assert not outdir.exists()


def test_human_net_io_without_networks_is_zero():
    values = cds.Values(None, 100, 200, 1, None, None, 0, 0)
    assert cds.human_cells(values)[3] == "0B / 0B"


def test_containers_given_twice_exit_2(tmp_path):
    outdir = tmp_path / "out"
    result = run_script(["--containers", "web", "db", "web", "--outdir", str(outdir)])
    assert result.returncode == 2
    assert "container given twice, web, list each container once" in result.stderr
    assert not outdir.exists()


def test_duration_fraction_says_whole_seconds():
    result = run_script(["--containers", "web", "--duration", "0.5"])
    assert result.returncode == 2
    assert "give whole seconds such as 300" in result.stderr


def test_outdir_that_is_a_file_rejected(tmp_path):
    outdir = tmp_path / "taken"
    outdir.write_text("not a folder")
    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/missing.sock")
    result = run_script(["--containers", "db", "--outdir", str(outdir)], env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: --outdir is not a folder, {outdir}," \
        " choose a folder path"
    assert outdir.read_text() == "not a folder"


# ---------------------------------------------------------------- real engine


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[Any, str]]:
    client = docker_engine.engine_client()
    try:
        for image in docker_engine.session_image(client):
            yield client, image
    finally:
        client.close()


@pytest.fixture
def containers(engine) -> Iterator[docker_engine.ContainerFactory]:
    client, image = engine
    factory = docker_engine.ContainerFactory(client, image)
    try:
        yield factory
    finally:
        factory.remove_all()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def csv_files(outdir: Path) -> dict[str, Path]:
    """Map container name to its CSV file; names never contain an underscore here."""
    if not outdir.exists():
        return {}
    return {path.name.split("_")[0]: path for path in outdir.glob("*.csv")}


def data_rows(path: Path) -> list[list[str]]:
    rows = read_rows(path)
    assert rows[0] == list(cds.CSV_COLUMNS)
    return rows[1:]


def assert_rows_whole(rows: list[list[str]]) -> None:
    for row in rows:
        assert len(row) == len(cds.CSV_COLUMNS), row
        assert TIMESTAMP.fullmatch(row[0]), row
        for number in row[3:6]:
            assert number.isdigit(), row


def start_capture(arguments: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_engine_busy_memory_and_pids(engine, containers, tmp_path):
    client, _ = engine
    busy = containers.start("busy", "yes > /dev/null")
    shm = containers.start(
        "shm", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=48 && sleep 600"
    )
    procs = containers.start("procs", "sleep 600 & sleep 600 & sleep 600 & wait")
    wait_until(
        lambda: b"records out" in client.containers.get(shm).logs(),
        15,
        "dd to fill /dev/shm",
    )
    outdir = tmp_path / "out"
    result = run_script(
        ["--containers", busy, shm, procs, "--interval", "1", "--duration", "5"]
        + ["--outdir", str(outdir), "--tag", "t1"]
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["stopped_by"] == "duration"
    assert summary["ticks"] == 5
    files = csv_files(outdir)
    assert sorted(files) == sorted([busy, shm, procs])
    for name, path in files.items():
        assert path.name.endswith("_t1.csv")
        rows = data_rows(path)
        assert len(rows) == 5
        assert_rows_whole(rows)
        assert summary["containers"][name]["samples"] == 5
        assert summary["containers"][name]["file"] == str(path)

    busy_cpu = [float(row[2]) for row in data_rows(files[busy])[1:]]
    busy_cpu.sort()
    assert 75.0 <= busy_cpu[len(busy_cpu) // 2] <= 105.0, busy_cpu

    shm_memory = [int(row[3]) for row in data_rows(files[shm])]
    assert min(shm_memory) >= 48 * MIB
    assert max(shm_memory) < 56 * MIB
    assert summary["containers"][shm]["mem_used_bytes_max"] == max(shm_memory)

    pids = {row[5] for row in data_rows(files[procs])}
    assert pids == {"4"}  # sh and its three sleeps


def test_engine_full_stdout_keeps_files(containers, tmp_path):
    name = containers.start("fullout", "sleep 600")
    outdir = tmp_path / "out"
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--containers", name, "--interval", "1",
             "--duration", "2", "--outdir", str(outdir)],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot write the summary to stdout (No space left on device); the CSV" \
        " files are complete" in result.stderr
    rows = data_rows(csv_files(outdir)[name])
    assert len(rows) == 2
    assert_rows_whole(rows)


def test_engine_container_exits_mid_run(containers, tmp_path):
    short = containers.start("short", "sleep 2")
    steady = containers.start("steady", "sleep 600")
    outdir = tmp_path / "out"
    result = run_script(
        ["--containers", short, steady, "--interval", "1", "--duration", "6"]
        + ["--outdir", str(outdir)]
    )
    assert result.returncode == 0, result.stderr
    assert f"container {short} is not running" in result.stderr
    summary = json.loads(result.stdout)["containers"]
    files = csv_files(outdir)
    short_rows = data_rows(files[short])
    assert 1 <= len(short_rows) <= 4
    assert_rows_whole(short_rows)
    assert summary[short]["ticks_not_running"] >= 2
    assert len(data_rows(files[steady])) == 6


def test_engine_restart_resumes_then_sigterm(engine, containers, tmp_path):
    client, _ = engine
    name = containers.start("restart", "sleep 600")
    outdir = tmp_path / "out"
    process = start_capture(
        ["--containers", name, "--interval", "0.5", "--duration", "0"]
        + ["--outdir", str(outdir)]
    )
    try:
        wait_until(lambda: name in csv_files(outdir), 15, "the CSV file")
        path = csv_files(outdir)[name]
        wait_until(lambda: len(read_rows(path)) >= 4, 15, "three rows")

        client.containers.get(name).stop(timeout=0)
        stopped_at = len(read_rows(path))
        time.sleep(2.5)  # the rows must stop coming while the container is down
        assert len(read_rows(path)) <= stopped_at + 2

        client.containers.get(name).start()
        wait_until(lambda: len(read_rows(path)) >= stopped_at + 4, 15, "resumed rows")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 143, stderr
    assert "runs again" in stderr
    summary = json.loads(stdout)
    assert summary["stopped_by"] == "SIGTERM"
    assert summary["containers"][name]["ticks_not_running"] >= 2

    rows = data_rows(path)
    assert_rows_whole(rows)
    gaps = [
        cds.datetime.fromisoformat(b[0]) - cds.datetime.fromisoformat(a[0])
        for a, b in zip(rows, rows[1:], strict=False)
    ]
    assert max(gap.total_seconds() for gap in gaps) >= 1.5
    resumed = [
        index for index, gap in enumerate(gaps, start=1) if gap.total_seconds() >= 1.5
    ][0]
    assert rows[resumed][2] == ""  # no CPU % on the first sample after the restart
    assert summary["containers"][name]["samples"] == len(rows)


def test_engine_sigint_exit_130(containers, tmp_path):
    name = containers.start("sigint", "sleep 600")
    outdir = tmp_path / "out"
    process = start_capture(
        ["--containers", name, "--interval", "0.5", "--duration", "0"]
        + ["--outdir", str(outdir)]
    )
    try:
        wait_until(lambda: name in csv_files(outdir), 15, "the CSV file")
        path = csv_files(outdir)[name]
        wait_until(lambda: len(read_rows(path)) >= 3, 15, "two rows")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    summary = json.loads(stdout)
    assert summary["stopped_by"] == "SIGINT"
    rows = data_rows(path)
    assert_rows_whole(rows)
    assert summary["containers"][name]["samples"] == len(rows)


def test_engine_sigkill_leaves_whole_rows(containers, tmp_path):
    name = containers.start("sigkill", "sleep 600")
    outdir = tmp_path / "out"
    process = start_capture(
        ["--containers", name, "--interval", "0.05", "--duration", "0", "--human"]
        + ["--outdir", str(outdir)]
    )
    try:
        wait_until(lambda: name in csv_files(outdir), 15, "the CSV file")
        path = csv_files(outdir)[name]
        wait_until(lambda: len(read_rows(path)) >= 20, 15, "19 rows")
    finally:
        process.kill()
        process.communicate()
    text = path.read_text()
    assert text.endswith("\n")
    rows = read_rows(path)
    assert len(rows[0]) == len(cds.CSV_COLUMNS) + len(cds.HUMAN_COLUMNS)
    for row in rows[1:]:
        assert len(row) == len(rows[0]), row
        assert TIMESTAMP.fullmatch(row[0]), row
        assert row[-1] == "0B / 0B", row


def test_engine_missing_container_no_file(containers, tmp_path):
    present = containers.start("present", "sleep 600")
    outdir = tmp_path / "out"
    missing = f"{docker_engine.SESSION_PREFIX}-absent"
    result = run_script(["--containers", present, missing, "--outdir", str(outdir)])
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"error: container not found, {missing}, check the name with docker ps -a"
    )
    assert not outdir.exists()


def test_engine_stopped_container_no_file(engine, containers, tmp_path):
    client, _ = engine
    name = containers.start("exited", "true")
    wait_until(lambda: client.containers.get(name).status == "exited", 15, "the exit")
    outdir = tmp_path / "out"
    result = run_script(["--containers", name, "--outdir", str(outdir)])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: container is not running, {name}")
    assert not outdir.exists()


class FakeListApi:
    def __init__(self, entries: list[dict[str, Any]]):
        self.entries = entries

    def containers(self, all: bool) -> list[dict[str, Any]]:
        assert all
        return self.entries


def test_list_containers_full_id_wins_over_name():
    entries = [
        {"Id": "a" * 64, "Names": ["/web", "/proxy/web"], "State": "running"},
        # A container whose name is another one's full ID.
        {"Id": "b" * 64, "Names": ["/" + "a" * 64], "State": "exited"},
        {"Id": "c" * 64, "Names": None, "State": "running"},
    ]
    known = cds.list_containers(SimpleNamespace(api=FakeListApi(entries)))
    assert known["web"] == cds.ContainerSummary("a" * 64, "web", "running")
    assert known["a" * 64].name == "web"
    assert "proxy/web" not in known
    assert "c" * 64 not in known


def test_engine_resolve_by_name_id_and_prefix(engine, containers):
    client, _ = engine
    name = containers.start("resolve", "sleep 600")
    container_id = client.containers.get(name).id
    assert cds.resolve_containers(client, [name]) == [name]
    assert cds.resolve_containers(client, [container_id]) == [name]
    # Prefixes and a leading slash are left to the engine's inspect endpoint.
    assert cds.resolve_containers(client, [container_id[:12]]) == [name]
    assert cds.resolve_containers(client, ["/" + name]) == [name]
    with pytest.raises(cds.CaptureError, match="container given twice"):
        cds.resolve_containers(client, [name, container_id[:12]])


def test_engine_resolve_stopped_names_status(engine, containers):
    client, _ = engine
    name = containers.start("resolve-exited", "true")
    wait_until(lambda: client.containers.get(name).status == "exited", 15, "the exit")
    with pytest.raises(cds.CaptureError) as error:
        cds.resolve_containers(client, [name])
    assert str(error.value) == (
        f"container is not running, {name} (status exited), "
        f"start it with docker start {name}"
    )


def test_engine_connect_skips_proxy_lookup_on_socket(engine):
    client = cds.connect(1)
    try:
        if client.api.base_url.startswith("http+docker://"):
            assert client.api.trust_env is False
        else:
            assert client.api.trust_env is True
    finally:
        client.close()


def test_engine_stream_missing_container_not_running(engine):
    client, _ = engine
    stop = threading.Event()
    missing = f"{docker_engine.SESSION_PREFIX}-never-created"
    stream = cds.StatsStream(client, missing, stop)
    stream.start()
    try:
        assert stream.first_sample.wait(15)
    finally:
        stop.set()
        stream.join(timeout=15)
    assert stream.snapshot.running is False
    assert stream.snapshot.payload is None
    assert stream.errors == 0  # NotFound is expected while a container is gone
