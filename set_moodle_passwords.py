#!/usr/bin/env python3
"""Give a set of Moodle test users one known password and list them in config.json.

The load generator logs in as real users of a Moodle test site, so before a load test
those users need a password that the load generator has. This script picks the users
a load test can use from the site's PostgreSQL database, writes one bcrypt hash of the
password into them, and removes the preferences that would block or redirect their
login. It writes the users with the plain password into the `users` key of
config.json. The database changes happen in one transaction, and the new config file
is prepared before the commit and renamed into place after it, so a failure leaves
both as they were.

Usage:
    set_moodle_passwords.py --db-name moodle --db-user moodle --prefix m_ \\
        --password 'Load-test-1' --count 100 --config config.json

Connection options that are left out come from libpq's environment variables
(PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, PGSSLMODE) and ~/.pgpass.

Exit codes:
    0   users updated and config written, or the dry run listed them
    1   failure: cannot connect, not a Moodle database, --where failed, too few users,
        invalid config file; nothing was changed
    2   invalid command line (argparse)
    130 interrupted with Ctrl-C; the open transaction is rolled back

Limits:
    - PostgreSQL only, the database type of moodle-docker's default setup.
    - Every chosen user gets the same hash, salt included. That is fine for a test
      site and wrong for a production one.
    - policyagreed is left alone: on a site with a site policy, the users are sent to
      it at their first login.
    - When renaming the prepared config into place fails after the commit, the
      database is changed and the new config stays in the temporary file, whose path
      the error names.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import psycopg2
from psycopg2 import sql

LOG = logging.getLogger("set_moodle_passwords")

# bcrypt uses only the first 72 bytes of a password, and Python's bcrypt 5 raises
# ValueError for longer ones.
BCRYPT_MAX_PASSWORD_BYTES = 72
# Cost range that bcrypt's salt format and PHP's password_verify accept.
BCRYPT_MIN_COST = 4
BCRYPT_MAX_COST = 31
# PHP's password_hash writes $2y$, so every PHP that Moodle 4 and 5 run on verifies
# it. Python's bcrypt writes $2b$, which is the same algorithm under OpenBSD's name.
PHP_BCRYPT_PREFIX = "$2y$"
# Table prefixes look like mdl_ or m_. Anything else is rejected before it can reach
# an SQL statement.
PREFIX_PATTERN = re.compile(r"[a-z0-9_]*")
# Moodle forces a password change at login for a manual user whose password is this.
MOODLE_FORCED_CHANGE_PASSWORD = "changeme"
# User preferences that make Moodle 5.1 reject the login (lockout) or redirect it to
# the password change page.
BLOCKING_PREFERENCES = (
    "auth_forcepasswordchange",
    "login_lockout",
    "login_lockout_secret",
    "login_failed_count",
    "login_failed_last",
    "login_failed_count_since_success",
)
# The mdl_config rows that decide which users may be touched.
CONFIG_SITEADMINS = "siteadmins"
CONFIG_MNET_LOCALHOST_ID = "mnet_localhost_id"
CONFIG_POLICY_CHECK_ON_LOGIN = "passwordpolicycheckonlogin"
# Without connect_timeout, libpq waits as long as the kernel does for a silent host.
CONNECT_TIMEOUT_S = 10
DEFAULT_HOST = "localhost"
DEFAULT_PORT = "5432"
# A user the load test can log in as: not deleted or suspended, not guest, not a site
# admin, and of this site's own MNet host. The update repeats this test, so no --where
# can widen the set of users that change.
ELIGIBLE_SQL = (
    "deleted = 0 AND suspended = 0 AND username <> 'guest'"
    " AND mnethostid = %(mnethostid)s"
    " AND NOT (id = ANY(%(admin_ids)s::bigint[]))"
)


class SetPasswordsError(Exception):
    """A failure to report as one line on stderr; nothing was changed."""


@dataclass(frozen=True)
class Connection:
    """Connection parameters after libpq's fallbacks, for connect() and messages.

    password is None when it should come from PGPASSWORD or the password file.
    """

    host: str
    port: str
    dbname: str
    user: str
    password: str | None


@dataclass(frozen=True)
class SiteConfig:
    """The mdl_config values that decide which users are eligible."""

    mnethostid: int
    admin_ids: list[int]
    policy_check_on_login: bool


@dataclass(frozen=True)
class User:
    """A chosen user: its id and username."""

    id: int
    username: str


# ---------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """Parse --count: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def bcrypt_cost(text: str) -> int:
    """Parse --bcrypt-cost: the log2 of bcrypt's rounds, 4 to 31."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not BCRYPT_MIN_COST <= value <= BCRYPT_MAX_COST:
        raise argparse.ArgumentTypeError(
            f"must be {BCRYPT_MIN_COST} to {BCRYPT_MAX_COST}, got {value}"
        )
    return value


def port_number(text: str) -> str:
    """Parse --db-port: a TCP port, 1 to 65535, kept as text for libpq."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1 to 65535, got {text!r}")
    return str(int(text))


def table_prefix(text: str) -> str:
    """Parse --prefix: lower-case letters, digits and underscores only."""
    if not PREFIX_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid prefix {text!r}: use lower-case letters, digits and underscores,"
            " as in mdl_ or m_"
        )
    return text


def user_password(text: str) -> str:
    """Parse --password: 1 to 72 bytes in UTF-8, and not Moodle's forced-change one.

    The error never repeats the password.
    """
    size = len(text.encode("utf-8"))
    if size == 0:
        raise argparse.ArgumentTypeError("must not be empty")
    if size > BCRYPT_MAX_PASSWORD_BYTES:
        raise argparse.ArgumentTypeError(
            f"is {size} bytes in UTF-8, bcrypt uses at most"
            f" {BCRYPT_MAX_PASSWORD_BYTES}; choose a shorter one"
        )
    if text == MOODLE_FORCED_CHANGE_PASSWORD:
        raise argparse.ArgumentTypeError(
            "is the one password for which Moodle forces a password change at"
            " login; choose another"
        )
    return text


def where_condition(text: str) -> str:
    """Parse --where: one SQL condition, without a ';' that could start a statement."""
    if ";" in text:
        raise argparse.ArgumentTypeError(
            "must be one condition without ';' (a second statement is not allowed)"
        )
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty; leave --where out instead")
    return text


# ---------------------------------------------------------------- pure helpers


def resolve_connection(args: argparse.Namespace) -> Connection:
    """Fill each connection option that was left out as libpq would.

    libpq's own default host is the Unix socket, but a Moodle database usually sits
    behind TCP, so with neither --db-host nor PGHOST the host is localhost.
    """
    env = os.environ
    user = args.db_user or env.get("PGUSER") or getpass.getuser()
    return Connection(
        host=args.db_host or env.get("PGHOST") or DEFAULT_HOST,
        port=args.db_port or env.get("PGPORT") or DEFAULT_PORT,
        dbname=args.db_name or env.get("PGDATABASE") or user,
        user=user,
        password=args.db_pass,
    )


def make_php_hash(password: str, cost: int) -> str:
    """Hash the password with bcrypt and return it with PHP's $2y$ prefix."""
    salt = bcrypt.gensalt(rounds=cost, prefix=b"2b")
    hashed = bcrypt.hashpw(password.encode("utf-8"), salt).decode("ascii")
    return PHP_BCRYPT_PREFIX + hashed[len(PHP_BCRYPT_PREFIX) :]


def parse_site_config(rows: dict[str, str], table: str) -> SiteConfig:
    """Build the SiteConfig from mdl_config rows; a missing row means not Moodle."""
    if CONFIG_MNET_LOCALHOST_ID not in rows:
        raise SetPasswordsError(
            f"no {CONFIG_MNET_LOCALHOST_ID} row in {table}, is this a Moodle database,"
            " and is --prefix right?"
        )
    try:
        mnethostid = int(rows[CONFIG_MNET_LOCALHOST_ID])
        admin_text = rows.get(CONFIG_SITEADMINS, "")
        admin_ids = [int(part) for part in admin_text.split(",") if part.strip()]
    except ValueError as err:
        raise SetPasswordsError(
            f"invalid {CONFIG_MNET_LOCALHOST_ID} or {CONFIG_SITEADMINS} in {table}"
            f" ({err}), check these rows in the Moodle database"
        ) from None
    policy = rows.get(CONFIG_POLICY_CHECK_ON_LOGIN, "0").strip() not in {"", "0"}
    return SiteConfig(mnethostid, admin_ids, policy)


def one_line(text: str) -> str:
    """Join a multi-line libpq or server message into one line."""
    return " ".join(str(text).split())


def database_reason(err: psycopg2.Error) -> str:
    """Return the server's primary message, or libpq's text when there is none."""
    diag = getattr(err, "diag", None)
    primary = diag.message_primary if diag is not None else None
    return one_line(primary or str(err))


def build_config(old: dict[str, Any], users: list[User], password: str) -> str:
    """Return the new config text: the old keys with `users` replaced."""
    config = dict(old)
    config["users"] = [{"username": u.username, "password": password} for u in users]
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- config file


def read_config(path: Path) -> dict[str, Any]:
    """Read config.json as a JSON object; a missing file is an empty object."""
    if not path.parent.is_dir():
        raise SetPasswordsError(
            f"folder {path.parent} of --config does not exist, create it first"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise SetPasswordsError(f"cannot read config {path}: {err}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise SetPasswordsError(
            f"config {path} is not valid JSON ({err}), fix it or point --config"
            " elsewhere; it was left as it was"
        ) from None
    if not isinstance(config, dict):
        raise SetPasswordsError(
            f"config {path} holds a JSON {type(config).__name__}, not an object,"
            " fix it or point --config elsewhere; it was left as it was"
        )
    return config


def prepare_config(path: Path, text: str) -> Path:
    """Write text to a mode-0600 temporary file beside path, fsync it, return its path.

    The file holds plain passwords, so only its owner may read it.
    """
    fd, temp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            os.fchmod(stream.fileno(), 0o600)
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        os.unlink(temp_name)
        raise
    return Path(temp_name)


def install_config(temp: Path, path: Path) -> None:
    """Rename the prepared file over path and fsync the folder so the rename lasts."""
    os.replace(temp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


# ---------------------------------------------------------------- database


def connect(target: Connection) -> Any:
    """Open a connection; libpq adds PGSSLMODE, PGPASSWORD and ~/.pgpass itself."""
    params: dict[str, Any] = {
        "host": target.host,
        "port": target.port,
        "dbname": target.dbname,
        "user": target.user,
        "application_name": "set_moodle_passwords",
    }
    if target.password is not None:
        params["password"] = target.password
    if "PGCONNECT_TIMEOUT" not in os.environ:
        params["connect_timeout"] = CONNECT_TIMEOUT_S
    try:
        return psycopg2.connect(**params)
    except psycopg2.Error as err:
        raise SetPasswordsError(
            f"cannot connect to PostgreSQL at host {target.host} port {target.port},"
            f" database {target.dbname}, user {target.user}: {one_line(err)};"
            " check --db-host, --db-port, --db-name, --db-user and the password"
            " (--db-pass, PGPASSWORD or ~/.pgpass)"
        ) from None


def require_tables(cursor: Any, prefix: str, dbname: str) -> None:
    """Fail unless the user, user_preferences and config tables exist."""
    for name in ("user", "user_preferences", "config"):
        table = prefix + name
        cursor.execute("SELECT to_regclass(quote_ident(%s))", (table,))
        if cursor.fetchone()[0] is None:
            raise SetPasswordsError(
                f"no table {table} in database {dbname}, is this a Moodle database,"
                f" and is --prefix right? (given: {prefix!r})"
            )


def read_site_config(cursor: Any, prefix: str) -> SiteConfig:
    """Read the mdl_config rows that decide which users are eligible."""
    names = [CONFIG_MNET_LOCALHOST_ID, CONFIG_SITEADMINS, CONFIG_POLICY_CHECK_ON_LOGIN]
    query = sql.SQL("SELECT name, value FROM {} WHERE name = ANY(%s)").format(
        sql.Identifier(prefix + "config")
    )
    cursor.execute(query, (names,))
    return parse_site_config(dict(cursor.fetchall()), prefix + "config")


def select_users(
    cursor: Any, prefix: str, site: SiteConfig, where: str | None, count: int
) -> list[User]:
    """Return the first `count` eligible users by id that also match --where.

    The condition is the operator's own SQL, put in parentheses on lines of its own
    so that a trailing `--` comment cannot swallow the rest. Every % is doubled
    because psycopg2 reads % as a placeholder.
    """
    condition = sql.SQL("")
    if where is not None:
        condition = sql.SQL(" AND (\n{}\n)").format(sql.SQL(where.replace("%", "%%")))
    query = sql.SQL(
        "SELECT id, username FROM {table} WHERE " + ELIGIBLE_SQL + "{condition}"
        "\nORDER BY id LIMIT %(count)s"
    ).format(table=sql.Identifier(prefix + "user"), condition=condition)
    params = {"mnethostid": site.mnethostid, "admin_ids": site.admin_ids}
    try:
        cursor.execute(query, {**params, "count": count})
    except psycopg2.Error as err:
        what = "the --where condition" if where is not None else "selecting users"
        raise SetPasswordsError(
            f"{what} failed in the database: {database_reason(err)}"
            f" (--where {where!r}); fix the condition"
        ) from None
    return [User(row[0], row[1]) for row in cursor.fetchall()]


def update_users(
    cursor: Any, prefix: str, site: SiteConfig, users: list[User], password_hash: str
) -> int:
    """Set the hash, manual auth and confirmed on the users; delete blocking prefs.

    Returns the number of preferences deleted. Both statements are set-based, one
    round trip each whatever the number of users.
    """
    ids = [user.id for user in users]
    update = sql.SQL(
        "UPDATE {table} SET password = %(hash)s, auth = 'manual', confirmed = 1,"
        " timemodified = %(now)s WHERE id = ANY(%(ids)s::bigint[]) AND " + ELIGIBLE_SQL
    ).format(table=sql.Identifier(prefix + "user"))
    cursor.execute(
        update,
        {
            "hash": password_hash,
            "now": int(time.time()),
            "ids": ids,
            "mnethostid": site.mnethostid,
            "admin_ids": site.admin_ids,
        },
    )
    if cursor.rowcount != len(ids):
        raise SetPasswordsError(
            f"{len(ids)} users were chosen but {cursor.rowcount} were still eligible"
            " at the update (changed meanwhile, or --where broke out of its"
            " parentheses); nothing was changed, check --where and run again"
        )

    delete = sql.SQL(
        "DELETE FROM {table} WHERE userid = ANY(%s::bigint[]) AND name = ANY(%s)"
    ).format(table=sql.Identifier(prefix + "user_preferences"))
    cursor.execute(delete, (ids, list(BLOCKING_PREFERENCES)))
    return cursor.rowcount


# ---------------------------------------------------------------- the run


def choose_users(
    cursor: Any, args: argparse.Namespace, dbname: str
) -> tuple[SiteConfig, list[User]]:
    """Check the tables, read the site config and select the users to change."""
    require_tables(cursor, args.prefix, dbname)
    site = read_site_config(cursor, args.prefix)
    if site.policy_check_on_login:
        LOG.warning(
            "warning: the site checks the password policy at login"
            " (%s=1); a password that fails it forces a password change",
            CONFIG_POLICY_CHECK_ON_LOGIN,
        )

    users = select_users(cursor, args.prefix, site, args.where, args.count)
    if len(users) < args.count:
        raise SetPasswordsError(
            f"only {len(users)} users match, --count asks for {args.count}; lower"
            " --count or widen --where (nothing was changed)"
        )
    LOG.info("chose %d users, ids %d to %d", len(users), users[0].id, users[-1].id)
    return site, users


def apply_changes(
    conn: Any,
    args: argparse.Namespace,
    site: SiteConfig,
    users: list[User],
    config: dict[str, Any],
) -> None:
    """Update the users, prepare the config, commit, then rename the config in place."""
    LOG.info("hashing the password with bcrypt at cost %d", args.bcrypt_cost)
    password_hash = make_php_hash(args.password, args.bcrypt_cost)
    try:
        with conn.cursor() as cursor:
            deleted = update_users(cursor, args.prefix, site, users, password_hash)
    except psycopg2.Error as err:
        raise SetPasswordsError(
            f"updating {args.prefix}user failed: {database_reason(err)};"
            " nothing was changed"
        ) from None
    LOG.info("updated %d users, deleted %d blocking preferences", len(users), deleted)

    text = build_config(config, users, args.password)
    try:
        temp = prepare_config(args.config, text)
    except OSError as err:
        raise SetPasswordsError(
            f"cannot write a temporary file beside {args.config}: {err};"
            " nothing was changed"
        ) from None
    committed = False
    try:
        conn.commit()
        committed = True
    except psycopg2.Error as err:
        raise SetPasswordsError(
            f"the commit failed: {database_reason(err)}; nothing was changed"
        ) from None
    finally:
        if not committed:
            temp.unlink(missing_ok=True)

    try:
        install_config(temp, args.config)
    except OSError as err:
        raise SetPasswordsError(
            f"the users were updated but renaming {temp} to {args.config} failed:"
            f" {err}; move it into place by hand"
        ) from None


def redact(text: str, secrets: list[str | None]) -> str:
    """Replace every secret in text with ***, so no message can leak a password."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def write_stdout(line: str) -> None:
    """Print one line on stdout; a reader that closed the pipe is no failure."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def build_parser() -> argparse.ArgumentParser:
    """Define the command line; every check that needs no database is done here."""
    parser = argparse.ArgumentParser(
        description="Give Moodle test users one known password, all in one"
        " transaction, and write them into the load generator's config.json.",
        epilog="Options left out fall back to PGHOST, PGPORT, PGDATABASE, PGUSER,"
        " PGPASSWORD, PGSSLMODE and ~/.pgpass, as in libpq.",
    )
    db = parser.add_argument_group("database")
    db.add_argument("--db-host", metavar="HOST",
                    help="host name, IP address or Unix socket folder"
                    " (default: $PGHOST, else localhost)")
    db.add_argument("--db-port", metavar="PORT", type=port_number,
                    help="TCP port (default: $PGPORT, else 5432)")
    db.add_argument("--db-name", metavar="NAME",
                    help="database (default: $PGDATABASE, else the user name)")
    db.add_argument("--db-user", metavar="USER",
                    help="role (default: $PGUSER, else the login name)")
    db.add_argument("--db-pass", metavar="PASSWORD",
                    help="role password (default: $PGPASSWORD, else ~/.pgpass);"
                    " other local users can see it in the process list")
    db.add_argument("--prefix", metavar="PREFIX", type=table_prefix, default="mdl_",
                    help="Moodle table prefix, $CFG->prefix (default: mdl_;"
                    " moodle-docker uses m_)")

    chosen = parser.add_argument_group("users")
    chosen.add_argument("--count", metavar="N", type=positive_int, default=100,
                        help="number of users to change, the first N eligible by id;"
                        " fewer eligible is an error (default: 100)")
    chosen.add_argument("--where", metavar="SQL", type=where_condition,
                        help="extra SQL condition on the user table, ANDed with the"
                        " eligibility rules, e.g. \"username LIKE 'tool_generator_%%'\""
                        " (default: none)")

    secret = parser.add_argument_group("password")
    secret.add_argument("--password", metavar="PASSWORD", type=user_password,
                        required=True,
                        help="new password of the users, 1 to 72 bytes in UTF-8")
    secret.add_argument("--bcrypt-cost", metavar="COST", type=bcrypt_cost, default=12,
                        help="bcrypt cost, log2 of the rounds, 4 to 31 (default: 12)")

    output = parser.add_argument_group("output")
    output.add_argument("--config", metavar="FILE", type=Path,
                        default=Path("config.json"),
                        help="load generator config whose `users` key is replaced;"
                        " created when missing, mode 0600 (default: config.json)")
    output.add_argument("--dry-run", action="store_true",
                        help="print the users that would change, one 'id<TAB>username'"
                        " line each, and change nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, choose the users, change them and write the config."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    target = resolve_connection(args)
    conn = None
    try:
        config = read_config(args.config)
        conn = connect(target)
        conn.set_session(readonly=args.dry_run)
        LOG.info("connected to database %s at %s:%s as %s",
                 target.dbname, target.host, target.port, target.user)

        with conn.cursor() as cursor:
            site, users = choose_users(cursor, args, target.dbname)

        if args.dry_run:
            write_stdout("\n".join(f"{user.id}\t{user.username}" for user in users))
            LOG.info("dry run: %d users would be updated and written to %s;"
                     " nothing was changed", len(users), args.config)
            return 0

        apply_changes(conn, args, site, users, config)
    except SetPasswordsError as err:
        LOG.error("error: %s", redact(str(err), [args.password, args.db_pass]))
        return 1
    except psycopg2.Error as err:
        LOG.error("error: a database statement failed: %s; nothing was changed,"
                  " check the database and run again",
                  redact(database_reason(err), [args.password, args.db_pass]))
        return 1
    except KeyboardInterrupt:
        LOG.error("error: interrupted; an open transaction was rolled back")
        return 130
    finally:
        if conn is not None:
            conn.close()

    write_stdout(f"updated {len(users)} users, config written to {args.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
