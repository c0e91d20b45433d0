"""A throwaway PostgreSQL server for tests and benchmarks, with Moodle-like databases.

start_server() runs initdb and pg_ctl into a new temporary folder and starts the
server on a free port of 127.0.0.1, with its Unix socket in the same folder. initdb
rejects root, so as root the folder is given to the `postgres` user and the server runs
as that user. The superuser `postgres` connects through the socket without a password.
The role `moodle` connects over TCP with a scram-sha-256 password, so tests can pass
that password as an option, in PGPASSWORD or in a password file.

create_moodle_database() creates a database owned by `moodle` with the user,
user_preferences and config tables of Moodle 5.1, guest, admin and any number of
generated users named like those of Moodle's test-site generator.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2

# Where Debian's `postgresql` package puts the server binaries, one folder a version.
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
# The role and password of moodle-docker's database; the '@' tests that passwords
# are passed as given.
ROLE = "moodle"
ROLE_PASSWORD = "m@0dl3ing"
HOST = "127.0.0.1"
DDL_FILE = Path(__file__).parent / "fixtures" / "moodle51_user_tables.sql"
START_TIMEOUT_S = 60
# A hash of the password "moodle" in the form Moodle 4.3 and later store:
# SHA-512 crypt with 10,000 rounds.
MOODLE_SHA512_HASH = (
    "$6$rounds=10000$Qm3TkZa8rLp2Wv7X$qg2wIU2w7n9OI9LfXMB8RSHGtHxbb6P4RbEUgNCElS/"
    "8IPzx9nF.O91U78THtuDqQPH.MYmVYfg7wd7QEyxsu1"
)
# The mdl_config rows a password tool reads, as a fresh Moodle 5.1 site has them.
DEFAULT_CONFIG_ROWS = {
    "guestloginbutton": "1",
    "lockoutthreshold": "0",
    "mnet_localhost_id": "1",
    "passwordpolicy": "1",
    "passwordpolicycheckonlogin": "0",
    "release": "5.1+ (Build: 20251017)",
    "siteadmins": "2",
    "version": "2025100600.02",
}
USER_COLUMNS = (
    "id", "auth", "confirmed", "deleted", "suspended", "mnethostid", "username",
    "password", "email", "firstname", "lastname",
)  # fmt: skip


class ServerUnavailable(RuntimeError):
    """The server cannot be started here; the message is the reason the tests skip."""


@dataclass
class PgServer:
    """A running throwaway server; stop() ends it and removes its folder."""

    bin_dir: Path
    folder: Path
    port: int
    run_as: str | None

    @property
    def socket_dir(self) -> Path:
        return self.folder / "socket"

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    def admin_connect(self, dbname: str = "postgres") -> Any:
        """Connect as the superuser through the socket, in autocommit mode."""
        conn = psycopg2.connect(
            host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname=dbname
        )
        conn.autocommit = True
        return conn

    def connect(self, dbname: str) -> Any:
        """Connect as the `moodle` role over TCP with its password."""
        return psycopg2.connect(
            host=HOST, port=self.port, user=ROLE, password=ROLE_PASSWORD, dbname=dbname
        )

    def stop(self) -> None:
        """Stop the server quickly and remove its folder."""
        command = [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir)]
        run_checked([*command, "-m", "fast", "-w"], self.run_as)
        shutil.rmtree(self.folder, ignore_errors=True)


def find_bin_dir() -> Path:
    """Return the folder of initdb, pg_ctl and postgres, newest version first."""
    env_dir = os.environ.get("PG_BIN_DIR")
    candidates = [Path(env_dir)] if env_dir else []
    versions = sorted(DEBIAN_PG_ROOT.glob("*/bin"), key=version_key, reverse=True)
    candidates += versions
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise ServerUnavailable(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found in {DEBIAN_PG_ROOT}"
        " or on PATH; install the Debian package `postgresql` or set PG_BIN_DIR"
    )


def version_key(path: Path) -> tuple[int, ...]:
    """Sort /usr/lib/postgresql/<version>/bin by version number."""
    digits = path.parent.name.split(".")
    return tuple(int(part) for part in digits if part.isdigit())


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def run_checked(command: list[str], run_as: str | None) -> None:
    """Run a server command, as run_as when given; raise with its output on failure."""
    result = subprocess.run(
        command, user=run_as, capture_output=True, text=True, timeout=START_TIMEOUT_S
    )
    if result.returncode != 0:
        raise ServerUnavailable(
            f"{Path(command[0]).name} failed with exit code {result.returncode}:"
            f" {result.stderr.strip() or result.stdout.strip()}"
        )


def make_folder() -> tuple[Path, str | None]:
    """Create the server's folder, owned by `postgres` when running as root."""
    folder = Path(tempfile.mkdtemp(prefix="moodle-load-pg-"))
    if os.geteuid() != 0:
        return folder, None
    try:
        owner = pwd.getpwnam(SUPERUSER)
    except KeyError:
        shutil.rmtree(folder)
        raise ServerUnavailable(
            "running as root, and initdb rejects root, but there is no `postgres`"
            " user to run it as; install the Debian package `postgresql`"
        ) from None
    os.chown(folder, owner.pw_uid, owner.pw_gid)
    return folder, SUPERUSER


def start_server(durable: bool = False) -> PgServer:
    """Create, start and return a server with the `moodle` role.

    durable=False turns fsync off, which is fine for data thrown away at the end.
    """
    bin_dir = find_bin_dir()
    folder, run_as = make_folder()
    try:
        server = PgServer(bin_dir, folder, free_port(), run_as)
        initdb = [str(bin_dir / "initdb"), "-D", str(server.data_dir), "-U", SUPERUSER]
        run_checked(
            [*initdb, "--auth-local=trust", "--auth-host=scram-sha-256",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            run_as,
        )  # fmt: skip
        run_checked(["mkdir", "-m", "700", str(server.socket_dir)], run_as)
        settings = (
            f"-c listen_addresses={HOST} -p {server.port} -k {server.socket_dir}"
            f" -c max_connections=30 -c fsync={'on' if durable else 'off'}"
        )
        log = str(folder / "server.log")
        run_checked(
            [str(bin_dir / "pg_ctl"), "start", "-D", str(server.data_dir), "-w",
             "-t", str(START_TIMEOUT_S), "-l", log, "-o", settings],
            run_as,
        )  # fmt: skip
        with contextlib.closing(server.admin_connect()) as conn:
            conn.cursor().execute(
                f"CREATE ROLE {ROLE} LOGIN PASSWORD %s", (ROLE_PASSWORD,)
            )
        return server
    except BaseException:
        with contextlib.suppress(ServerUnavailable, subprocess.SubprocessError):
            command = [str(bin_dir / "pg_ctl"), "stop", "-D", str(folder / "data")]
            run_checked([*command, "-m", "immediate"], run_as)
        shutil.rmtree(folder, ignore_errors=True)
        raise


@contextlib.contextmanager
def running_server(durable: bool = False) -> Iterator[PgServer]:
    """Start a server for the duration of a with block."""
    server = start_server(durable)
    try:
        yield server
    finally:
        server.stop()


def create_moodle_database(
    server: PgServer,
    name: str,
    prefix: str = "mdl_",
    generated_users: int = 0,
    config_rows: dict[str, str] | None = None,
) -> None:
    """Create database `name` owned by `moodle` with Moodle's user tables and rows.

    The rows are guest (id 1), admin (id 2) and generated_users users named
    tool_generator_000001 and on from id 3, all with the password "moodle".
    """
    with contextlib.closing(server.admin_connect()) as admin:
        admin.cursor().execute(f'CREATE DATABASE "{name}" OWNER {ROLE}')
    ddl = DDL_FILE.read_text(encoding="utf-8").replace("{prefix}", prefix)
    rows = config_rows if config_rows is not None else DEFAULT_CONFIG_ROWS
    with contextlib.closing(server.connect(name)) as conn, conn.cursor() as cursor:
        cursor.execute(ddl)
        cursor.executemany(
            f"INSERT INTO {prefix}config (name, value) VALUES (%s, %s)",
            list(rows.items()),
        )
        insert_users(cursor, prefix, [
            (1, "manual", 1, 0, 0, 1, "guest", MOODLE_SHA512_HASH,
             "root@localhost", "Guest user", " "),
            (2, "manual", 1, 0, 0, 1, "admin", MOODLE_SHA512_HASH,
             "admin@example.invalid", "Admin", "User"),
        ])  # fmt: skip
        cursor.execute(
            f"INSERT INTO {prefix}user (id, auth, confirmed, mnethostid, username,"
            " password, email, firstname, lastname, timecreated)"
            " SELECT n + 2, 'manual', 1, 1, 'tool_generator_' || lpad(n::text, 6, '0'),"
            " %s, 'user' || n || '@example.invalid', 'Test', 'User ' || n, 1733300000"
            " FROM generate_series(1, %s) AS n",
            (MOODLE_SHA512_HASH, generated_users),
        )
        sequence = f"{prefix}user_id_seq"
        cursor.execute(f"SELECT setval('{sequence}', max(id)) FROM {prefix}user")
        conn.commit()
    # Fresh statistics, as a site that has been running would have.
    with contextlib.closing(server.connect(name)) as conn:
        conn.autocommit = True
        conn.cursor().execute(f"VACUUM ANALYZE {prefix}user")


def clone_database(server: PgServer, source: str, name: str) -> None:
    """Create database `name` as a copy of `source`, which must have no connections."""
    with contextlib.closing(server.admin_connect()) as admin:
        admin.cursor().execute(
            f'CREATE DATABASE "{name}" TEMPLATE "{source}" OWNER {ROLE}'
        )


def insert_users(cursor: Any, prefix: str, rows: Iterable[tuple]) -> None:
    """Insert user rows given as tuples in USER_COLUMNS order."""
    columns = ", ".join(USER_COLUMNS)
    marks = ", ".join(["%s"] * len(USER_COLUMNS))
    cursor.executemany(
        f"INSERT INTO {prefix}user ({columns}) VALUES ({marks})", list(rows)
    )


def insert_preferences(
    cursor: Any, prefix: str, rows: Iterable[tuple[int, str, str]]
) -> None:
    """Insert (userid, name, value) rows into user_preferences."""
    cursor.executemany(
        f"INSERT INTO {prefix}user_preferences (userid, name, value)"
        " VALUES (%s, %s, %s)",
        list(rows),
    )
