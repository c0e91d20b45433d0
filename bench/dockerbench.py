"""Docker for the stats step: an engine, a local busybox image and idle containers.

When no engine responds, a private dockerd starts as run-tests starts it: data root,
exec root and socket in a temporary folder, ``--bridge=none --iptables=false
--ip6tables=false`` so that it creates no network. The image is made with
``docker import`` of a folder holding Debian's static busybox and one link per applet,
since no registry is reachable. Containers run with ``--network none``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Processes, StepError

IMAGE = "moodle-load-bench-busybox:latest"
CONTAINER_PREFIX = "moodle-load-bench-"


@dataclass
class DockerEngine:
    """The engine the step talks to, and whether the benchmark started it."""

    env: dict[str, str]
    private: bool
    process: subprocess.Popen | None = None
    containers: list[str] = field(default_factory=list)
    server_version: str = "unknown"
    client_version: str = "unknown"

    def docker(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            ["docker", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise StepError(f"docker {args[0]} failed: {result.stderr.strip()}")
        return result.stdout


def engine_responds(env: dict[str, str]) -> bool:
    result = subprocess.run(
        ["docker", "info"], env=env, capture_output=True, timeout=30, check=False
    )
    return result.returncode == 0


def start_engine(processes: Processes, root: Path) -> DockerEngine:
    """Use the engine that responds, or start a private one under root."""
    if shutil.which("docker") is None:
        raise StepError("the docker CLI is not installed (Debian: docker.io)")
    env = dict(os.environ)
    if engine_responds(env):
        engine = DockerEngine(env=env, private=False)
    else:
        if shutil.which("dockerd") is None or os.getuid() != 0:
            raise StepError("no Docker engine responds and none can be started here")
        root.mkdir(parents=True)
        socket_path = root / "docker.sock"
        command = [
            "dockerd",
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "dockerd.pid"),
            "-H",
            f"unix://{socket_path}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
        ]
        process = processes.start(command, log=root / "dockerd.log")
        env["DOCKER_HOST"] = f"unix://{socket_path}"
        deadline = time.monotonic() + 60
        while not engine_responds(env):
            if process.poll() is not None or time.monotonic() > deadline:
                log = (root / "dockerd.log").read_text(errors="replace")[-800:]
                raise StepError(f"the private Docker engine did not start: {log}")
            time.sleep(0.3)
        engine = DockerEngine(env=env, private=True, process=process)
    engine.server_version = engine.docker(
        "version", "--format", "{{.Server.Version}}"
    ).strip()
    engine.client_version = engine.docker(
        "version", "--format", "{{.Client.Version}}"
    ).strip()
    return engine


def import_busybox_image(engine: DockerEngine, root: Path) -> None:
    """docker import a root file system of busybox and its applet links."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise StepError("busybox is not installed (Debian: busybox-static)")
    rootfs = root / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "tmp").mkdir()
    shutil.copy2(Path(busybox).resolve(), rootfs / "bin" / "busybox")
    applets = subprocess.run(
        [busybox, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        link = rootfs / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    tar = subprocess.Popen(
        ["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
    )
    result = subprocess.run(
        ["docker", "import", "-", IMAGE],
        stdin=tar.stdout,
        env=engine.env,
        capture_output=True,
        text=True,
        check=False,
    )
    tar.wait()
    if result.returncode != 0:
        raise StepError(f"docker import failed: {result.stderr.strip()}")


def start_containers(engine: DockerEngine, count: int) -> list[str]:
    """Start count idle busybox containers without network."""
    names = [f"{CONTAINER_PREFIX}{index:02d}" for index in range(1, count + 1)]
    for name in names:
        # A container of that name left by an interrupted run would block the name.
        subprocess.run(
            ["docker", "rm", "-f", name],
            env=engine.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        engine.docker(
            "run", "-d", "--network", "none", "--name", name, IMAGE, "sleep", "86400"
        )
        engine.containers.append(name)
    return names


def stop_engine(processes: Processes, engine: DockerEngine) -> None:
    """Remove the containers; stop the engine and its containerd if it is private."""
    for name in engine.containers:
        subprocess.run(
            ["docker", "rm", "-f", name],
            env=engine.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
    engine.containers.clear()
    if engine.private and engine.process is not None:
        processes.stop(engine.process, timeout=30)
