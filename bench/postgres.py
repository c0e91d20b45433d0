"""The password step's database: tests/pg_server.py's throwaway PostgreSQL server.

The server runs with fsync on (durable=True), so the timed UPDATE pays for a durable
commit as on a real site. The tables are Moodle 5.1's mdl_user, mdl_user_preferences
and mdl_config with their indexes, from the DDL the tests use. The users get the
preferences that the reset deletes: every 10th must change the password and every
20th has failed logins.
"""

from __future__ import annotations

import contextlib
import subprocess

from bench.procs import StepError
from tests import pg_server

TEMPLATE_DATABASE = "moodle_template"
ROLE = pg_server.ROLE
ROLE_PASSWORD = pg_server.ROLE_PASSWORD

PREFERENCES = """
INSERT INTO mdl_user_preferences (userid, name, value)
SELECT n + 2, pref.name, pref.value
FROM generate_series(1, %(users)s) AS n
CROSS JOIN (VALUES ('email_bounce_count', '1'), ('email_send_count', '1'))
    AS pref (name, value);
INSERT INTO mdl_user_preferences (userid, name, value)
SELECT n + 2, 'auth_forcepasswordchange', '1'
FROM generate_series(10, %(users)s, 10) AS n;
INSERT INTO mdl_user_preferences (userid, name, value)
SELECT n + 2, pref.name, pref.value
FROM generate_series(20, %(users)s, 20) AS n
CROSS JOIN (VALUES ('login_failed_count', '3'), ('login_failed_last', '1700000000'),
                   ('login_failed_count_since_success', '3')) AS pref (name, value);
"""


def start_postgres() -> pg_server.PgServer:
    try:
        return pg_server.start_server(durable=True)
    except (pg_server.ServerUnavailable, subprocess.SubprocessError) as error:
        raise StepError(f"PostgreSQL did not start: {error}") from error


def server_version(server: pg_server.PgServer) -> str:
    with contextlib.closing(server.admin_connect()) as conn, conn.cursor() as cursor:
        cursor.execute("SHOW server_version")
        return f"PostgreSQL {cursor.fetchone()[0]}"


def create_template(server: pg_server.PgServer, users: int) -> None:
    """Create the Moodle tables, users and preferences once, as a template."""
    pg_server.create_moodle_database(server, TEMPLATE_DATABASE, generated_users=users)
    with contextlib.closing(server.connect(TEMPLATE_DATABASE)) as conn:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(PREFERENCES, {"users": users})
            cursor.execute("VACUUM ANALYZE")


def fresh_copy(server: pg_server.PgServer, name: str) -> None:
    """Copy the template to a new database, so that each repeat starts alike."""
    pg_server.clone_database(server, TEMPLATE_DATABASE, name)
    with contextlib.closing(server.admin_connect()) as conn, conn.cursor() as cursor:
        cursor.execute("CHECKPOINT")


def count_rows(server: pg_server.PgServer, database: str, query: str) -> int:
    with contextlib.closing(server.connect(database)) as conn, conn.cursor() as cursor:
        cursor.execute(query)
        return int(cursor.fetchone()[0])
