#!/usr/bin/env python3
"""Give a set of Moodle test users one known password and list them in config.json.

The load generator logs in as real users of a Moodle test site, so before a load test
those users need a password that the load generator has. This script picks the users
a load test can use from the site's PostgreSQL database, writes one bcrypt hash of the
password into them, and removes the preferences that would block or redirect their
login. It writes the users with the plain password into the `users` key of
config.json. The database changes happen in one transaction, and the new config file
is prepared before the commit and renamed into place after it, so a failure leaves
both as they were. A new config file gets mode 0600 because it contains passwords; an
existing one keeps its mode and owner.

Usage:
    set_moodle_passwords.py --db-name moodle --db-user moodle --prefix m_ \\
        --password 'Load-test-1' --count 100 --config config.json

Connection options that are left out come from libpq's environment variables
(PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, PGSSLMODE) and ~/.pgpass.

Exit codes:
    0   users updated and config written, or the dry run listed them
    1   failure: cannot connect, not a Moodle database, --where failed, too few users,
        invalid or unwritable config file; nothing was changed. Two failures come
        after the commit, and their messages state it: renaming the config into
        place, and writing the result line to stdout.
    2   invalid command line (argparse)
    130 interrupted with Ctrl-C (SIGINT); the open transaction is rolled back
    143 terminated with SIGTERM; the open transaction is rolled back

Once the commit has started, SIGINT and SIGTERM are held until the run finishes, so
that the database and config.json still end up changed together.

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
import secrets
import signal
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
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
# A password inside a libpq connection string: a `password=` item, quoted or not, or
# the password of a URI's user info (postgresql://user:password@host). libpq 17
# repeats the host in its connection errors, so a connection string put in PGHOST or
# --db-host shows up there.
CONNINFO_PASSWORD = re.compile(
    r"(?P<keyword>\bpassword\s*=\s*)(?:'(?:\\.|[^'\\])*'?|(?:\\.|\S)+)"
    r"|(?P<userinfo>\bpostgres(?:ql)?://[^:@/\s]*:)[^@\s]*@",
    re.IGNORECASE,
)
# A config file that does not exist yet is created with this mode, because it
# contains plain passwords.
NEW_CONFIG_MODE = 0o600
# Signals that roll the run back before the commit. The exit code is 128 + the signal
# number, as shells report a process ended by a signal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The opening of a PostgreSQL dollar-quoted string: $$ or $tag$, where the tag is an
# identifier without `$`, and every non-ASCII character counts as a letter.
DOLLAR_QUOTE_TAG = re.compile(
    r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$"
)
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


class Interrupted(BaseException):
    """The exception for a SIGINT or SIGTERM that arrives before the commit.

    It derives from BaseException, as KeyboardInterrupt does, so that no `except
    Exception` on the way up swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """The SIGINT and SIGTERM handler: roll back before the commit, wait after it.

    Raising Interrupted aborts the run and the open transaction with it. From the
    commit on, a rollback is no longer possible, so a signal is only recorded and the
    run finishes renaming the config and printing its result.
    """

    def __init__(self) -> None:
        self.holding = False
        self.held_signal: int | None = None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)

    def hold(self) -> None:
        """Record signals from now on instead of raising Interrupted."""
        self.holding = True

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.holding:
            self.held_signal = signum
            return
        # A second signal during the cleanup must not cut the rollback short.
        self.holding = True
        raise Interrupted(signum)


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


def host_name(text: str) -> str:
    """Parse --db-host: a host name, IP address or socket folder, not a URI.

    libpq would look a URI up as a host name, which sends its password to the DNS
    server and echoes it in the error. The error here never repeats the value.
    """
    if "://" in text:
        raise argparse.ArgumentTypeError(
            "is a connection URI, not a host name; pass its parts as --db-host,"
            " --db-port, --db-name and --db-user, and the password in PGPASSWORD"
        )
    return text


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


def utf8_size(text: str) -> int:
    """Return the size of text in UTF-8, or raise without repeating the text.

    A command-line argument that is not valid UTF-8 reaches Python with surrogate
    escapes, which do not encode. argparse would print the value of a ValueError in
    its message, and psycopg2 would raise UnicodeEncodeError, so both get this error.
    """
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            "is not valid UTF-8, pass it in UTF-8"
        ) from None


def db_password(text: str) -> str:
    """Parse --db-pass: any text that is valid UTF-8; the error never repeats it."""
    utf8_size(text)
    return text


def user_password(text: str) -> str:
    """Parse --password: 1 to 72 bytes in UTF-8, and not Moodle's forced-change one.

    The error never repeats the password.
    """
    size = utf8_size(text)
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
    """Parse --where: one SQL condition that stays inside the parentheses around it.

    A ';' could start a second statement. A ')' that closes more than the condition
    opened would end the parentheses the SELECT puts around it, and an OR after it
    would bring in users that the eligibility rules exclude.
    """
    if ";" in text:
        raise argparse.ArgumentTypeError(
            "must be one condition without ';' (a second statement is not allowed)"
        )
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty; leave --where out instead")
    depth = parenthesis_depth(text)
    if depth != 0:
        detail = "a ')' has no matching '('" if depth < 0 else "a '(' is not closed"
        raise argparse.ArgumentTypeError(
            f"has unbalanced parentheses outside string literals and comments"
            f" ({detail}), write one condition whose parentheses balance"
        )
    return text


def parenthesis_depth(text: str) -> int:
    """Return the parenthesis depth at the end of SQL text, or -1 once it drops below 0.

    Parentheses inside string literals ('...', E'...' with backslash escapes),
    quoted identifiers ("..."), dollar-quoted strings ($tag$...$tag$), -- comments and
    nested /* */ comments do not count, as in PostgreSQL's lexer with
    standard_conforming_strings on, its default since 9.1. An unterminated literal or
    comment ends the scan, and PostgreSQL then rejects the statement.
    """
    depth = 0
    position = 0
    while position < len(text):
        char = text[position]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return -1
        elif char == "'":
            escape_string = text[position - 1 : position] in ("e", "E") and not (
                follows_identifier(text, position - 1)
            )
            position = skip_quoted(text, position, "'", backslash=escape_string)
            continue
        elif char == '"':
            position = skip_quoted(text, position, '"', backslash=False)
            continue
        elif text.startswith("--", position):
            end = text.find("\n", position)
            position = len(text) if end < 0 else end
            continue
        elif text.startswith("/*", position):
            position = skip_block_comment(text, position)
            continue
        elif char == "$" and not follows_identifier(text, position):
            tag = DOLLAR_QUOTE_TAG.match(text, position)
            if tag is not None:
                end = text.find(tag.group(), tag.end())
                position = len(text) if end < 0 else end + len(tag.group())
                continue
        position += 1
    return depth


def follows_identifier(text: str, position: int) -> bool:
    """Tell whether text[position] continues an identifier or keyword.

    `$` inside an identifier is part of it (a$b$), and `E` at the end of one is no
    escape-string prefix. PostgreSQL counts every non-ASCII character as a letter.
    """
    if position == 0:
        return False
    before = text[position - 1]
    return before.isalnum() or before in "_$" or ord(before) >= 0x80


def skip_quoted(text: str, start: int, quote: str, backslash: bool) -> int:
    """Return the index after the literal or identifier that opens at start.

    A doubled quote stands for one quote. With backslash, a backslash escapes the next
    character, as in PostgreSQL's E'...' strings.
    """
    position = start + 1
    while position < len(text):
        char = text[position]
        if backslash and char == "\\":
            position += 2
        elif char == quote:
            if text.startswith(quote * 2, position):
                position += 2
            else:
                return position + 1
        else:
            position += 1
    return len(text)


def skip_block_comment(text: str, start: int) -> int:
    """Return the index after the /* */ comment at start; PostgreSQL nests them."""
    nesting = 0
    position = start
    while position < len(text):
        if text.startswith("/*", position):
            nesting += 1
            position += 2
        elif text.startswith("*/", position):
            nesting -= 1
            position += 2
            if nesting == 0:
                return position
        else:
            position += 1
    return len(text)


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


def count_of(count: int, noun: str) -> str:
    """Return the count with the noun in singular or plural: 1 user, 2 users."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def was_or_were(count: int) -> str:
    """Return the past tense of "to be" that agrees with count."""
    return "was" if count == 1 else "were"


def mask_conninfo_passwords(text: str) -> str:
    """Replace the password of every connection string in text with ***.

    Only the value after `password=` and the password of a URI's user info change,
    so a password that also occurs as a database, user or option name stays visible
    there.
    """

    def masked(match: re.Match[str]) -> str:
        if match.group("keyword") is not None:
            return match.group("keyword") + "***"
        return match.group("userinfo") + "***@"

    return CONNINFO_PASSWORD.sub(masked, text)


def database_reason(err: psycopg2.Error) -> str:
    """Return the server's primary message, or libpq's text when there is none."""
    diag = getattr(err, "diag", None)
    primary = diag.message_primary if diag is not None else None
    return one_line(primary or str(err))


def build_config(old: dict[str, Any], users: list[User], password: str) -> str:
    """Return the new config text: the old keys with `users` replaced.

    Each user goes on one line, as in config.example.json. That also keeps the
    encoding of the users in json's C encoder: json.dumps with indent= runs in
    Python and took a second for 100,000 users.
    """
    config = dict(old)
    # A random placeholder marks where the user lines go in the indented text.
    placeholder = f"users-{secrets.token_hex(16)}"
    config["users"] = placeholder
    text = json.dumps(config, indent=2, ensure_ascii=False)

    encode = json.JSONEncoder(ensure_ascii=False).encode
    password_json = encode(password)
    lines = ",\n".join(
        f'    {{"username": {encode(user.username)}, "password": {password_json}}}'
        for user in users
    )
    return text.replace(f'"{placeholder}"', f"[\n{lines}\n  ]", 1) + "\n"


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


def check_config_folder(path: Path) -> None:
    """Create and remove a temporary file beside path, before any database work.

    Trying is the only exact test: permission bits do not stop root, and a read-only
    mount or a folder like /proc stops everyone.
    """
    try:
        fd, temp_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        os.close(fd)
        os.unlink(temp_name)
    except OSError as err:
        raise SetPasswordsError(
            f"cannot create a file in folder {path.parent} of --config"
            f" ({err.strerror}), make the folder writable or point --config"
            " elsewhere; nothing was changed"
        ) from None


def prepare_config(path: Path, text: str) -> Path:
    """Write text to a temporary file beside path, fsync it, return its path.

    The file gets the mode and owner of the config it replaces, because that file is
    the operator's. A new config gets mode 0600 because it contains plain passwords.
    """
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    fd, temp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            if old is None:
                os.fchmod(stream.fileno(), NEW_CONFIG_MODE)
            else:
                keep_owner(stream.fileno(), old)
                os.fchmod(stream.fileno(), stat.S_IMODE(old.st_mode))
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        os.unlink(temp_name)
        raise
    return Path(temp_name)


def keep_owner(fd: int, old: os.stat_result) -> None:
    """Give the open file the owner and group of the old config where allowed.

    Root may give it any owner. Another user can keep only its own uid and a group it
    belongs to, and otherwise ends up owning the new file, as with any editor.
    """
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        LOG.warning(
            "warning: cannot keep owner %d and group %d of the config, so the new"
            " file belongs to the user running this script",
            old.st_uid,
            old.st_gid,
        )


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
        # The password is not part of this message. A connection string given as
        # the host is, and libpq echoes it, so its password is masked.
        host = mask_conninfo_passwords(target.host)
        reason = mask_conninfo_passwords(one_line(err))
        raise SetPasswordsError(
            f"cannot connect to PostgreSQL at host {host} port {target.port},"
            f" database {target.dbname}, user {target.user}: {reason};"
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
    cursor: Any, prefix: str, site: SiteConfig, where: str | None, count: int,
    verify: bool = True,
) -> list[User]:
    """Return the first `count` eligible users by id that also match --where.

    The condition is the operator's own SQL, put in parentheses on lines of its own
    so that a trailing `--` comment cannot swallow the rest. Every % is doubled
    because psycopg2 reads % as a placeholder. With verify, a second statement
    without the condition checks the result (see check_eligible).
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
    users = [User(row[0], row[1]) for row in cursor.fetchall()]
    if verify and where is not None:
        check_eligible(cursor, prefix, site, users, where)
    return users


def check_eligible(
    cursor: Any, prefix: str, site: SiteConfig, users: list[User], where: str
) -> None:
    """Fail unless a statement without --where returns exactly the selected users.

    where_condition() rejects a condition that closes the parentheses around it, but
    it only approximates PostgreSQL's lexer. This check does not depend on it, so a
    dry run never lists a user that the update would reject.
    """
    query = sql.SQL(
        "SELECT id, username FROM {table} WHERE id = ANY(%(ids)s::bigint[]) AND "
        + ELIGIBLE_SQL
        + " ORDER BY id"
    ).format(table=sql.Identifier(prefix + "user"))
    cursor.execute(
        query,
        {
            "ids": [user.id for user in users],
            "mnethostid": site.mnethostid,
            "admin_ids": site.admin_ids,
        },
    )
    eligible = [User(row[0], row[1]) for row in cursor.fetchall()]
    if eligible == users:
        return
    excluded = [user.username for user in users if user not in eligible]
    examples = ", ".join(excluded[:3]) + (", ..." if len(excluded) > 3 else "")
    raise SetPasswordsError(
        f"the --where condition selected users that the eligibility rules exclude"
        f" ({examples or 'duplicate rows'}), it reaches outside its parentheses"
        f" (--where {where!r}); nothing was changed, fix the condition"
    )


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
            f"{count_of(len(ids), 'user')} {was_or_were(len(ids))} chosen but only"
            f" {cursor.rowcount} {was_or_were(cursor.rowcount)} still eligible at the"
            " update (changed meanwhile, or --where broke out of its parentheses);"
            " nothing was changed, check --where and run again"
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

    # The update repeats the eligibility test and compares the row count, so only
    # a dry run, which has no update, needs the separate check. For 100,000 users it
    # cost 0.8 s.
    users = select_users(cursor, args.prefix, site, args.where, args.count,
                         verify=args.dry_run)
    if len(users) < args.count:
        verb = "matches" if len(users) == 1 else "match"
        raise SetPasswordsError(
            f"only {count_of(len(users), 'user')} {verb}, --count asks for"
            f" {args.count}; lower --count or widen --where (nothing was changed)"
        )
    if len(users) == 1:
        LOG.info("chose 1 user, id %d", users[0].id)
    else:
        LOG.info("chose %d users, ids %d to %d", len(users), users[0].id, users[-1].id)
    return site, users


def apply_changes(
    conn: Any,
    args: argparse.Namespace,
    site: SiteConfig,
    users: list[User],
    config: dict[str, Any],
    signals: StopSignals,
) -> int:
    """Update the users, prepare the config, commit, then rename the config in place.

    Returns the number of blocking preferences deleted. Signals are held from the
    commit on, because the run can no longer roll back after it.
    """
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

    text = build_config(config, users, args.password)
    temp: Path | None = None
    committed = False
    try:
        temp = prepare_config(args.config, text)
        signals.hold()
        conn.commit()
        committed = True
    except OSError as err:
        raise SetPasswordsError(
            f"cannot write a temporary file beside {args.config}: {err};"
            " nothing was changed"
        ) from None
    except psycopg2.Error as err:
        raise SetPasswordsError(
            f"the commit failed: {database_reason(err)}; nothing was changed"
        ) from None
    finally:
        if not committed and temp is not None:
            temp.unlink(missing_ok=True)

    try:
        install_config(temp, args.config)
    except OSError as err:
        raise SetPasswordsError(
            f"the users were updated but renaming {temp} to {args.config} failed:"
            f" {err}; move it into place by hand"
        ) from None
    return deleted


def write_stdout(line: str) -> None:
    """Print one line on stdout; a reader that closed the pipe is no failure.

    Any other OSError (a full disk) is raised. In both cases stdout is pointed at
    /dev/null first, so that Python's flush at exit does not fail a second time.
    """
    try:
        print(line, flush=True)
    except BrokenPipeError:
        discard_stdout()
    except OSError:
        discard_stdout()
        raise


def discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null, dropping what is still buffered there."""
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
    db.add_argument("--db-host", metavar="HOST", type=host_name,
                    help="host name, IP address or Unix socket folder"
                    " (default: $PGHOST, else localhost)")
    db.add_argument("--db-port", metavar="PORT", type=port_number,
                    help="TCP port (default: $PGPORT, else 5432)")
    db.add_argument("--db-name", metavar="NAME",
                    help="database (default: $PGDATABASE, else the user name)")
    db.add_argument("--db-user", metavar="USER",
                    help="role (default: $PGUSER, else the login name)")
    db.add_argument("--db-pass", metavar="PASSWORD", type=db_password,
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
                        " created with mode 0600 when missing, an existing file keeps"
                        " its mode (default: config.json)")
    output.add_argument("--dry-run", action="store_true",
                        help="print the users that would change, one 'id<TAB>username'"
                        " line each, and change nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, and turn a failure into one line on stderr."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    signals = StopSignals()
    signals.install()
    try:
        status = run(args, signals)
    except Interrupted as err:
        if err.signum == signal.SIGINT:
            cause = "interrupted by Ctrl-C (SIGINT)"
        else:
            cause = f"terminated by {signal.Signals(err.signum).name}"
        LOG.error(
            "error: %s, any open transaction was rolled back and nothing was"
            " changed; run again to set the passwords",
            cause,
        )
        return 128 + err.signum
    if signals.held_signal is not None:
        LOG.warning(
            "warning: %s arrived after the commit had started, so the run finished"
            " first",
            signal.Signals(signals.held_signal).name,
        )
    return status


def run(args: argparse.Namespace, signals: StopSignals) -> int:
    """Check the config, choose the users, change them and write the config.

    Returns the exit code. The connection is closed before any result is printed,
    and closing it rolls back a transaction that was not committed.
    """
    target = resolve_connection(args)
    conn = None
    deleted = 0
    try:
        config = read_config(args.config)
        if not args.dry_run:
            check_config_folder(args.config)
        conn = connect(target)
        conn.set_session(readonly=args.dry_run)
        LOG.info("connected to database %s at %s:%s as %s",
                 target.dbname, target.host, target.port, target.user)

        with conn.cursor() as cursor:
            site, users = choose_users(cursor, args, target.dbname)

        if not args.dry_run:
            deleted = apply_changes(conn, args, site, users, config, signals)
    except SetPasswordsError as err:
        LOG.error("error: %s", err)
        return 1
    except psycopg2.Error as err:
        LOG.error("error: a database statement failed: %s; nothing was changed,"
                  " check the database and run again", database_reason(err))
        return 1
    finally:
        if conn is not None:
            conn.close()

    if args.dry_run:
        return print_dry_run(users, args.config)
    LOG.info("deleted %s that blocked the login",
             count_of(deleted, "user preference"))
    try:
        write_stdout(f"updated {count_of(len(users), 'user')}, config written to"
                     f" {args.config}")
    except OSError as err:
        LOG.error("error: cannot write the result to stdout (%s), but the users"
                  " were updated and %s was written; check where stdout goes",
                  err.strerror, args.config)
        return 1
    return 0


def print_dry_run(users: list[User], config: Path) -> int:
    """Print the chosen users, one `id<TAB>username` line each; return the exit code."""
    try:
        write_stdout("\n".join(f"{user.id}\t{user.username}" for user in users))
    except OSError as err:
        LOG.error("error: cannot write the user list to stdout (%s), check where"
                  " stdout goes; nothing was changed", err.strerror)
        return 1
    LOG.info("dry run: %s would be updated and written to %s; nothing was changed",
             count_of(len(users), "user"), config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
