"""Docker engine helpers for the stats tests: a local busybox image and containers.

No registry is reachable, so the image is made by importing a root file system that
contains Debian's static busybox and one link per applet. Every container runs with
network_mode="none", and every image and container name starts with a prefix unique
to the test session, so the cleanup removes only what the tests made.
"""

from __future__ import annotations

import gc
import io
import shutil
import subprocess
import tarfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
import requests

SESSION_PREFIX = f"mlcds-{uuid.uuid4().hex[:8]}"
IMAGE = f"{SESSION_PREFIX}-busybox:latest"


def engine_client() -> docker.DockerClient:
    """Connect to the engine of DOCKER_HOST, or skip the test with the reason."""
    try:
        client = docker.from_env()
        client.ping()
        return client
    except (docker.errors.DockerException, requests.RequestException) as err:
        reason = str(err)
    # docker-py leaves the socket of the failed version request to the garbage
    # collector, and pytest would turn its ResourceWarning into an error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    pytest.skip(f"no Docker engine reachable ({reason}); ./run-tests starts one")


def busybox_rootfs_tar() -> bytes:
    """Pack /bin/busybox and a link per applet into an in-memory tar archive."""
    found = shutil.which("busybox")
    if found is None:
        pytest.skip("busybox is not installed (Debian: busybox-static)")
    busybox = Path(found).resolve()
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for folder in ("bin", "tmp", "dev", "proc", "sys"):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if folder == "tmp" else 0o755
            archive.addfile(info)
        archive.add(str(busybox), arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            archive.addfile(link)
    return buffer.getvalue()


def import_busybox_image(client: docker.DockerClient) -> str:
    repository, tag = IMAGE.rsplit(":", 1)
    client.api.import_image_from_data(
        busybox_rootfs_tar(), repository=repository, tag=tag
    )
    return IMAGE


class ContainerFactory:
    """Starts busybox containers without network and removes them all at the end."""

    def __init__(self, client: docker.DockerClient, image: str):
        self.client = client
        self.image = image
        self.names: list[str] = []

    def start(self, suffix: str, command: str) -> str:
        name = f"{SESSION_PREFIX}-{suffix}"
        self.names.append(name)
        self.client.containers.run(
            self.image,
            ["sh", "-c", command],
            name=name,
            detach=True,
            network_mode="none",
        )
        return name

    def remove_all(self) -> None:
        for name in self.names:
            try:
                self.client.containers.get(name).remove(force=True)
            except docker.errors.NotFound:
                pass


def session_image(client: docker.DockerClient) -> Iterator[str]:
    """Import the image for the session and remove it afterwards, even on failure."""
    image = import_busybox_image(client)
    try:
        yield image
    finally:
        try:
            client.images.remove(image, force=True)
        except docker.errors.APIError:
            pass
