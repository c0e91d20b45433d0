"""Tests of set_moodle_passwords.py against a real PostgreSQL server and PHP.

Every database test gets its own copy of a template database with rows like those of
a Moodle 5.1 test site. Besides guest, two site admins and generated users, it has
users a load test must not touch: deleted, suspended, of another MNet host. The script
runs as a subprocess, as an operator runs it, so exit codes, stdout and stderr are
checked as they are.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

import set_moodle_passwords as script
from tests import pg_server
from tests.pg_server import MOODLE_SHA512_HASH as OLD_HASH

SCRIPT = Path(__file__).resolve().parent.parent / "set_moodle_passwords.py"
PASSWORD = "Load-test-1"
COST = "4"
TEMPLATE_DB = "moodle_template"
OTHER_PREFIX_TEMPLATE_DB = "moodle_docker_template"
# siteadmins lists a second admin, id 6, to test that the comma-separated list is read.
SITE_CONFIG = {**pg_server.DEFAULT_CONFIG_ROWS, "siteadmins": "2,6"}
# Rows after guest (1) and admin (2), in pg_server.USER_COLUMNS order.
SAMPLE_USERS = [
    (3, "manual", 1, 0, 0, 1, "tool_generator_000001", OLD_HASH,
     "alex.fakeson@example.invalid", "Alex", "Fakeson"),
    (4, "manual", 1, 0, 0, 1, "tool_generator_000002", OLD_HASH,
     "sam.mockley@example.invalid", "Sam", "Mockley"),
    (5, "manual", 1, 0, 0, 1, "tool_generator_000003", OLD_HASH,
     "robin.testwood@example.invalid", "Robin", "Testwood"),
    (6, "manual", 1, 0, 0, 1, "tool_generator_000004", OLD_HASH,
     "kim.sampleby@example.invalid", "Kim", "Sampleby"),
    (7, "manual", 1, 0, 0, 1, "tool_generator_000005", OLD_HASH,
     "jordan.dummett@example.invalid", "Jordan", "Dummett"),
    (8, "email", 0, 0, 0, 1, "tool_generator_000006", OLD_HASH,
     "taylor.placeholt@example.invalid", "Taylor", "Placeholt"),
    (9, "nologin", 1, 0, 0, 1, "tool_generator_000007", OLD_HASH,
     "casey.examplar@example.invalid", "Casey", "Examplar"),
    (10, "manual", 1, 1, 0, 1, "riley.stubbins@example.invalid.1733300000", "",
     "riley.stubbins@example.invalid", "Riley", "Stubbins"),
    (11, "manual", 1, 0, 1, 1, "tool_generator_000009", OLD_HASH,
     "jamie.fixturo@example.invalid", "Jamie", "Fixturo"),
    (12, "mnet", 1, 0, 0, 3, "tool_generator_000010", "not cached",
     "morgan.loadman@example.invalid", "Morgan", "Loadman"),
    (13, "manual", 1, 0, 0, 1, "teacher1", OLD_HASH,
     "avery.benchley@example.invalid", "Avery", "Benchley"),
    (14, "manual", 1, 0, 0, 1, "tool_generator_000011", OLD_HASH,
     "quinn.probert@example.invalid", "Quinn", "Probert"),
]  # fmt: skip
# Users the script may change, by id: not guest (1), not an admin (2, 6), not deleted
# (10), not suspended (11), not of MNet host 3 (12).
ELIGIBLE_IDS = [3, 4, 5, 7, 8, 9, 13, 14]
SAMPLE_PREFERENCES = [
    (5, "auth_forcepasswordchange", "1"),
    (5, "login_lockout", "1733300000"),
    (5, "login_lockout_secret", "Xq3kP0aZ19"),
    (5, "login_failed_count", "7"),
    (5, "login_failed_last", "1733300000"),
    (5, "login_failed_count_since_success", "7"),
    (5, "email_bounce_count", "2"),
    (4, "auth_forcepasswordchange", "1"),
    (11, "auth_forcepasswordchange", "1"),
    (11, "login_lockout", "1733300000"),
    (2, "login_failed_count", "1"),
]
OLD_CONFIG = {
    "base_url": "http://127.0.0.1:8080",
    "login_path": "/login/index.php",
    "users": [{"username": "someone_else", "password": "old"}],
    "parameters": {"courseid": {"min": 10, "max": 13}},
    "urls": [{"path": "/my/", "weight": 1}],
}
# The only user columns the script may write.
CHANGED_COLUMNS = {"password", "auth", "confirmed", "timemodified"}
database_numbers = itertools.count(1)


# ---------------------------------------------------------------- fixtures


def fill_sample(server: pg_server.PgServer, name: str, prefix: str) -> None:
    """Create database `name` with the sample rows under the given prefix."""
    pg_server.create_moodle_database(server, name, prefix, config_rows=SITE_CONFIG)
    with contextlib.closing(server.connect(name)) as conn, conn.cursor() as cursor:
        pg_server.insert_users(cursor, prefix, SAMPLE_USERS)
        pg_server.insert_preferences(cursor, prefix, SAMPLE_PREFERENCES)
        conn.commit()


@pytest.fixture(scope="session")
def server() -> Iterator[pg_server.PgServer]:
    try:
        running = pg_server.start_server()
    except pg_server.ServerUnavailable as err:
        pytest.skip(str(err))
    try:
        fill_sample(running, TEMPLATE_DB, "mdl_")
        fill_sample(running, OTHER_PREFIX_TEMPLATE_DB, "m_")
        yield running
    finally:
        running.stop()


@pytest.fixture
def db(server: pg_server.PgServer) -> str:
    """Return the name of a fresh copy of the sample database (prefix mdl_)."""
    name = f"moodle_{next(database_numbers)}"
    pg_server.clone_database(server, TEMPLATE_DB, name)
    return name


@pytest.fixture
def php() -> str:
    path = shutil.which("php")
    if path is None:
        pytest.skip("php-cli not found; install the Debian package php-cli")
    return path


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """Return an environment without libpq variables and with an empty HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    home = tmp_path / "home"
    home.mkdir()
    env["HOME"] = str(home)
    return env


# ---------------------------------------------------------------- helpers


def db_options(server: pg_server.PgServer, name: str) -> list[str]:
    return [
        "--db-host", pg_server.HOST, "--db-port", str(server.port),
        "--db-name", name, "--db-user", pg_server.ROLE,
        "--db-pass", pg_server.ROLE_PASSWORD,
    ]  # fmt: skip


def run_script(
    args: list[str], env: dict[str, str], secrets: tuple[str, ...] = (PASSWORD,)
) -> subprocess.CompletedProcess[str]:
    """Run the script; check that no output contains a traceback or a secret."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    for secret in secrets:
        assert secret not in result.stdout
        assert secret not in result.stderr
    return result


def run_on(
    server: pg_server.PgServer, name: str, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    """Run the script on database `name` at cost 4 with the test password."""
    options = ["--password", PASSWORD, "--bcrypt-cost", COST, *extra]
    return run_script([*db_options(server, name), *options], env)


def user_rows(server: pg_server.PgServer, name: str, prefix: str = "mdl_") -> dict:
    """Return every user row, all columns, by id."""
    with contextlib.closing(server.connect(name)) as conn, conn.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {prefix}user ORDER BY id")
        columns = [column.name for column in cursor.description]
        return {row[0]: dict(zip(columns, row, strict=True)) for row in cursor}


def preference_rows(
    server: pg_server.PgServer, name: str, prefix: str = "mdl_"
) -> set[tuple[int, str, str]]:
    with contextlib.closing(server.connect(name)) as conn, conn.cursor() as cursor:
        cursor.execute(f"SELECT userid, name, value FROM {prefix}user_preferences")
        return set(cursor.fetchall())


def snapshot(server: pg_server.PgServer, name: str, prefix: str = "mdl_") -> tuple:
    return user_rows(server, name, prefix), preference_rows(server, name, prefix)


def write_config(path: Path, content: Any) -> bytes:
    text = content if isinstance(content, str) else json.dumps(content, indent=2)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)
    return path.read_bytes()


def assert_changed_exactly(before: dict, after: dict, ids: list[int]) -> None:
    """Check that only the given users changed, and only in the four columns."""
    assert sorted(after) == sorted(before)
    for user_id, row in after.items():
        if user_id not in ids:
            assert row == before[user_id], f"user {user_id} changed"
            continue
        assert row["auth"] == "manual"
        assert row["confirmed"] == 1
        assert bcrypt.checkpw(PASSWORD.encode(), row["password"].encode())
        assert row["timemodified"] >= int(time.time()) - 60
        for column, value in row.items():
            if column not in CHANGED_COLUMNS:
                assert value == before[user_id][column], f"{user_id}.{column}"


def stray_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def sample_site() -> script.SiteConfig:
    """Return the SiteConfig that the script reads from the sample database."""
    return script.SiteConfig(
        mnethostid=1, admin_ids=[2, 6], policy_check_on_login=False
    )


def wait_until_blocked_on_lock(
    server: pg_server.PgServer, process: subprocess.Popen[str]
) -> None:
    """Wait until the script's connection waits for a row lock the test holds."""
    deadline = time.monotonic() + 60
    with contextlib.closing(server.admin_connect()) as admin, admin.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                " 'set_moodle_passwords' AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0] == 1:
                return
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
    pytest.fail("the script never waited for the row lock held by the test")


# ---------------------------------------------------------------- runs that change



def test_build_config_one_user_per_line():
    old = {"base_url": "http://127.0.0.1:8080", "users": [{"username": "x"}],
           "urls": [{"path": "/my/"}], "note": "users-\u00e9 \"quoted\""}
    users = [script.User(3, "tool_generator_000001"), script.User(4, 'ünï "q"')]

    text = script.build_config(old, users, 'pa"ss\\wörd')

    assert json.loads(text) == {
        "base_url": "http://127.0.0.1:8080",
        "users": [
            {"username": "tool_generator_000001", "password": 'pa"ss\\wörd'},
            {"username": 'ünï "q"', "password": 'pa"ss\\wörd'},
        ],
        "urls": [{"path": "/my/"}],
        "note": 'users-é "quoted"',
    }
    lines = text.splitlines()
    assert lines[2] == '  "users": ['
    assert lines[3] == ('    {"username": "tool_generator_000001",'
                        ' "password": "pa\\"ss\\\\wörd"},')
    assert lines[4].startswith('    {"username": "ünï \\"q\\""')
    assert lines[5] == "  ],"
    assert text.endswith("\n")

def test_run_changes_eligible_users_and_config(server, db, clean_env, tmp_path):
    config = tmp_path / "config.json"
    write_config(config, OLD_CONFIG)
    before_users, before_prefs = snapshot(server, db)

    result = run_on(server, db, clean_env, "--count", "5", "--config", str(config))

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"updated 5 users, config written to {config}\n"
    after_users, after_prefs = snapshot(server, db)
    assert_changed_exactly(before_users, after_users, [3, 4, 5, 7, 8])
    hashes = {after_users[i]["password"] for i in (3, 4, 5, 7, 8)}
    assert len(hashes) == 1
    assert hashes.pop().startswith("$2y$04$")
    blocking = set(script.BLOCKING_PREFERENCES)
    removed = {p for p in before_prefs if p[0] in (4, 5) and p[1] in blocking}
    assert len(removed) == 7
    assert after_prefs == before_prefs - removed
    assert (5, "email_bounce_count", "2") in after_prefs
    assert (11, "auth_forcepasswordchange", "1") in after_prefs

    written = json.loads(config.read_text(encoding="utf-8"))
    assert written["users"] == [
        {"username": f"tool_generator_00000{n}", "password": PASSWORD}
        for n in (1, 2, 3, 5, 6)
    ]
    assert {k: v for k, v in written.items() if k != "users"} == {
        k: v for k, v in OLD_CONFIG.items() if k != "users"
    }
    assert list(written) == list(OLD_CONFIG)
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    assert stray_files(tmp_path) == []


def test_run_new_config_mode_0600(server, db, clean_env, tmp_path):
    config = tmp_path / "new" / "config.json"
    config.parent.mkdir()

    result = run_on(server, db, clean_env, "--count", "1", "--config", str(config))

    assert result.returncode == 0, result.stderr
    assert json.loads(config.read_text())["users"] == [
        {"username": "tool_generator_000001", "password": PASSWORD}
    ]
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_run_existing_config_keeps_mode(server, db, clean_env, tmp_path, mode):
    config = tmp_path / "config.json"
    write_config(config, OLD_CONFIG)
    config.chmod(mode)

    result = run_on(server, db, clean_env, "--count", "1", "--config", str(config))

    assert result.returncode == 0, result.stderr
    assert json.loads(config.read_text())["users"][0]["password"] == PASSWORD
    assert stat.S_IMODE(config.stat().st_mode) == mode


def test_run_existing_config_keeps_owner(server, db, clean_env, tmp_path):
    """Run as root on another user's config, the new file still belongs to them."""
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    config = tmp_path / "config.json"
    write_config(config, OLD_CONFIG)
    os.chown(config, 65534, 65534)

    result = run_on(server, db, clean_env, "--count", "1", "--config", str(config))

    assert result.returncode == 0, result.stderr
    assert json.loads(config.read_text())["users"][0]["password"] == PASSWORD
    assert config.stat().st_uid == 65534
    assert config.stat().st_gid == 65534


def test_run_all_eligible_never_touches_others(server, db, clean_env, tmp_path):
    before = user_rows(server, db)

    result = run_on(server, db, clean_env, "--count", str(len(ELIGIBLE_IDS)),
                    "--config", str(tmp_path / "c.json"))  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert_changed_exactly(before, user_rows(server, db), ELIGIBLE_IDS)


def test_run_php_password_verify_accepts_hash(server, db, clean_env, tmp_path, php):
    result = run_on(server, db, clean_env, "--count", "1",
                    "--config", str(tmp_path / "c.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    stored = user_rows(server, db)[3]["password"]

    def php_verify(password: str) -> str:
        code = "var_dump(password_verify($argv[1], $argv[2]));"
        verdict = subprocess.run(
            [php, "-r", code, "--", password, stored],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return verdict.stdout.strip()

    assert stored.startswith("$2y$04$")
    assert php_verify(PASSWORD) == "bool(true)"
    assert php_verify(PASSWORD + "x") == "bool(false)"


def test_run_default_cost_is_12(server, db, clean_env, tmp_path):
    options = ["--password", PASSWORD, "--count", "1"]
    result = run_script(
        [*db_options(server, db), *options, "--config", str(tmp_path / "c.json")],
        clean_env,
    )

    assert result.returncode == 0, result.stderr
    assert user_rows(server, db)[3]["password"].startswith("$2y$12$")


@pytest.mark.parametrize("password", ["a" * 72, "é" * 36, "pässwörd €"])
def test_run_multibyte_and_72_byte_passwords(server, db, clean_env, tmp_path, password):
    config = tmp_path / "c.json"
    options = ["--password", password, "--bcrypt-cost", COST, "--count", "1"]
    result = run_script(
        [*db_options(server, db), *options, "--config", str(config)],
        clean_env, secrets=(password,),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    stored = user_rows(server, db)[3]["password"]
    assert bcrypt.checkpw(password.encode("utf-8"), stored.encode())
    assert json.loads(config.read_text("utf-8"))["users"][0]["password"] == password


@pytest.mark.parametrize(
    "where",
    [
        "username LIKE 'tool_generator_%'",
        "username LIKE 'tool_generator_%' -- a trailing comment",
        "username LIKE 'tool\\_generator\\_%' AND email LIKE '%@example.invalid'",
        "(username LIKE 'tool_generator_%') AND email <> ')(' /* ) */ -- )(",
        "username LIKE $$tool_generator_%$$ AND \"username\" <> E'\\')'",
    ],
)
def test_run_where_with_percent(server, db, clean_env, tmp_path, where):
    before = user_rows(server, db)
    config = tmp_path / "c.json"

    result = run_on(server, db, clean_env, "--count", "7", "--config", str(config),
                    "--where", where)  # fmt: skip

    assert result.returncode == 0, result.stderr
    chosen = [3, 4, 5, 7, 8, 9, 14]
    assert_changed_exactly(before, user_rows(server, db), chosen)
    names = [user["username"] for user in json.loads(config.read_text())["users"]]
    assert "teacher1" not in names
    assert len(names) == 7


@pytest.mark.parametrize("dry_run", [False, True])
def test_where_breaking_out_rejected(server, db, clean_env, tmp_path, dry_run):
    """A --where that closes the parentheses cannot bring guest or admins in."""
    config = tmp_path / "c.json"
    original = write_config(config, OLD_CONFIG)
    before = snapshot(server, db)
    extra = ["--dry-run"] if dry_run else []

    result = run_on(server, db, clean_env, "--count", "3", "--config", str(config),
                    "--where", "true) OR (1=1", *extra)  # fmt: skip

    assert result.returncode == 2
    assert result.stdout == ""
    assert (
        "argument --where: has unbalanced parentheses outside string literals and"
        " comments (a ')' has no matching '('), write one condition whose"
        " parentheses balance"
    ) in result.stderr
    assert snapshot(server, db) == before
    assert config.read_bytes() == original


def test_select_rejects_ineligible_rows(server, db):
    """The check after the SELECT works even for a --where the parser let through."""
    with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cursor:
        with pytest.raises(script.SetPasswordsError) as caught:
            script.select_users(cursor, "mdl_", sample_site(), "true) OR (1=1", 20)

    assert str(caught.value) == (
        "the --where condition selected users that the eligibility rules exclude"
        " (guest, admin, tool_generator_000004, ...), it reaches outside its"
        " parentheses (--where 'true) OR (1=1'); nothing was changed, fix the"
        " condition"
    )


def test_update_rejects_ineligible_user(server, db):
    before = snapshot(server, db)
    with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cursor:
        with pytest.raises(script.SetPasswordsError) as caught:
            script.update_users(cursor, "mdl_", sample_site(),
                                [script.User(1, "guest")], "$2y$04$x")  # fmt: skip
        conn.rollback()

    assert str(caught.value).startswith(
        "1 user was chosen but only 0 were still eligible at the update"
    )
    assert snapshot(server, db) == before


@pytest.mark.parametrize(
    "where",
    [
        "username = ')'",
        "username = 'it''s )'",
        "\"user)name\" = 'x'",
        "username <> $$)$$ AND username <> $tag$)$tag$",
        "E'\\')' <> username",
        "true -- )",
        "true /* ) /* ( */ ) */",
        "(id > 3) AND (id < 9)",
        "(a$b$c = 1)",
    ],
)
def test_where_balanced_accepted(where):
    assert script.where_condition(where) == where


@pytest.mark.parametrize(
    "where",
    [
        "true) OR (1=1",
        "(true",
        "'a\\') OR (1=1 --'",
        "true /* */ ) OR (1=1",
        "E'\\'' ) OR (1=1",
        "\"a\"\"\") OR (1=1",
        "a$b$ ) OR (1=1 $b$",
    ],
)
def test_where_unbalanced_rejected(where):
    with pytest.raises(script.argparse.ArgumentTypeError, match="unbalanced"):
        script.where_condition(where)


def test_run_moodle_docker_prefix(server, clean_env, tmp_path):
    name = f"moodle_{next(database_numbers)}"
    pg_server.clone_database(server, OTHER_PREFIX_TEMPLATE_DB, name)
    before = user_rows(server, name, "m_")

    result = run_on(server, name, clean_env, "--prefix", "m_", "--count", "2",
                    "--config", str(tmp_path / "c.json"))  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert_changed_exactly(before, user_rows(server, name, "m_"), [3, 4])


# ---------------------------------------------------------------- runs without change


def test_dry_run_lists_and_changes_nothing(server, db, clean_env, tmp_path):
    config = tmp_path / "config.json"
    original = write_config(config, OLD_CONFIG)
    before = snapshot(server, db)

    result = run_on(server, db, clean_env, "--count", "3", "--config", str(config),
                    "--dry-run")  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "3\ttool_generator_000001\n4\ttool_generator_000002\n5\ttool_generator_000003\n"
    )
    assert "nothing was changed" in result.stderr
    assert snapshot(server, db) == before
    assert config.read_bytes() == original
    assert stat.S_IMODE(config.stat().st_mode) == 0o644


def test_where_sql_error_changes_nothing(server, db, clean_env, tmp_path):
    config = tmp_path / "config.json"
    original = write_config(config, OLD_CONFIG)
    before = snapshot(server, db)

    result = run_on(server, db, clean_env, "--count", "1", "--config", str(config),
                    "--where", "nosuchcolumn = 1")  # fmt: skip

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("connected to database")
    error = result.stderr.splitlines()[-1]
    assert error.startswith("error: the --where condition failed")
    assert 'column "nosuchcolumn" does not exist' in error
    assert snapshot(server, db) == before
    assert config.read_bytes() == original


def test_too_few_users_exit_1(server, db, clean_env, tmp_path):
    config = tmp_path / "config.json"
    original = write_config(config, OLD_CONFIG)
    before = snapshot(server, db)

    result = run_on(server, db, clean_env, "--count", "9", "--config", str(config))

    assert result.returncode == 1
    assert result.stdout == ""
    assert "error: only 8 users match, --count asks for 9" in result.stderr
    assert snapshot(server, db) == before
    assert config.read_bytes() == original


def test_invalid_json_config_left_as_is(server, db, clean_env, tmp_path):
    config = tmp_path / "config.json"
    original = write_config(config, '{"base_url": "http://127.0.0.1:8080",')
    before = snapshot(server, db)

    result = run_on(server, db, clean_env, "--count", "1", "--config", str(config))

    assert result.returncode == 1
    assert f"error: config {config} is not valid JSON" in result.stderr
    assert snapshot(server, db) == before
    assert config.read_bytes() == original
    assert stat.S_IMODE(config.stat().st_mode) == 0o644


def test_config_not_an_object_rejected(server, db, clean_env, tmp_path):
    config = tmp_path / "config.json"
    original = write_config(config, [{"username": "a"}])

    result = run_on(server, db, clean_env, "--count", "1", "--config", str(config))

    assert result.returncode == 1
    assert "holds a JSON list, not an object" in result.stderr
    assert config.read_bytes() == original


def test_commit_failure_leaves_db_and_config(server, db, clean_env, tmp_path):
    """A deferred trigger fails the commit after the new config file was prepared."""
    with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION reject_commit() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'commit rejected by the test'; END $$;"
            " CREATE CONSTRAINT TRIGGER reject_commit AFTER UPDATE ON mdl_user"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
            " EXECUTE FUNCTION reject_commit()"
        )
        conn.commit()
    config = tmp_path / "config.json"
    original = write_config(config, OLD_CONFIG)
    before = snapshot(server, db)

    result = run_on(server, db, clean_env, "--count", "2", "--config", str(config))

    assert result.returncode == 1
    assert result.stdout == ""
    assert "deleted" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: the commit failed: commit rejected by the test; nothing was changed"
    )
    assert snapshot(server, db) == before
    assert config.read_bytes() == original
    assert stray_files(tmp_path) == []


def test_no_user_table_with_wrong_prefix(server, db, clean_env, tmp_path):
    result = run_on(server, db, clean_env, "--prefix", "m_",
                    "--config", str(tmp_path / "c.json"))  # fmt: skip

    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"error: no table m_user in database {db}, is this a Moodle database,"
        " and is --prefix right? (given: 'm_')"
    )
    assert not (tmp_path / "c.json").exists()


def test_cannot_connect_names_target(clean_env, tmp_path):
    port = pg_server.free_port()
    args = ["--db-host", "127.0.0.1", "--db-port", str(port), "--db-name", "moodle",
            "--db-user", "moodle", "--db-pass", "s3cret-db", "--password", PASSWORD,
            "--config", str(tmp_path / "c.json")]  # fmt: skip

    result = run_script(args, clean_env, secrets=(PASSWORD, "s3cret-db"))

    assert result.returncode == 1
    assert result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith(
        f"error: cannot connect to PostgreSQL at host 127.0.0.1 port {port},"
        " database moodle, user moodle: "
    )
    assert "Connection refused" in line


def test_wrong_db_password_reason_shown(server, db, clean_env, tmp_path):
    args = [*db_options(server, db)[:-1], "wrong-db-pass", "--password", PASSWORD,
            "--config", str(tmp_path / "c.json")]  # fmt: skip

    result = run_script(args, clean_env, secrets=(PASSWORD, "wrong-db-pass"))

    assert result.returncode == 1
    assert 'password authentication failed for user "moodle"' in result.stderr


@pytest.mark.parametrize("password", ["moodle", "a"])
def test_error_keeps_names_equal_to_password(clean_env, tmp_path, password):
    """A password that is also a database, user or word is no reason to mask them."""
    port = pg_server.free_port()
    args = ["--db-host", "127.0.0.1", "--db-port", str(port), "--db-name", "moodle",
            "--db-user", "moodle", "--db-pass", password, "--password", password,
            "--config", str(tmp_path / "c.json")]  # fmt: skip

    result = run_script(args, clean_env, secrets=())

    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith(
        f"error: cannot connect to PostgreSQL at host 127.0.0.1 port {port},"
        " database moodle, user moodle: connection to server at"
    )
    assert line.endswith(
        "; check --db-host, --db-port, --db-name, --db-user and the password"
        " (--db-pass, PGPASSWORD or ~/.pgpass)"
    )
    assert "***" not in line


def test_socket_host_with_password_masked(clean_env, tmp_path):
    """libpq echoes the host it could not reach; a password item in it is masked."""
    host = f"{tmp_path}/none password=Sock-Secret-8"
    args = ["--db-host", host, "--db-port", "1", "--db-name", "moodle",
            "--db-user", "moodle", "--password", PASSWORD,
            "--config", str(tmp_path / "c.json")]  # fmt: skip

    result = run_script(args, clean_env, secrets=(PASSWORD, "Sock-Secret-8"))

    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith(
        f"error: cannot connect to PostgreSQL at host {tmp_path}/none password=***"
        " port 1, database moodle, user moodle: connection to server on socket"
        f' "{tmp_path}/none password=***'
    )


@pytest.mark.parametrize("option", ["--password", "--db-pass"])
def test_non_utf8_secret_not_echoed(clean_env, tmp_path, option):
    """argparse repeats the value of a ValueError, and psycopg2 cannot encode it."""
    secret = "Echo-me-\udcff"  # the byte 0xff, which is not UTF-8, as Python decodes it
    args = ["--db-host", "127.0.0.1", "--db-port", "1", "--password", PASSWORD,
            "--config", str(tmp_path / "c.json"), option, secret]  # fmt: skip

    result = run_script(args, clean_env, secrets=(PASSWORD, "Echo-me-"))

    assert result.returncode == 2
    assert f"argument {option}: is not valid UTF-8, pass it in UTF-8" in result.stderr


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("host=h password=abc dbname=d", "host=h password=*** dbname=d"),
        ("password = 'a b\\' c' user=u", "password = *** user=u"),
        ("PASSWORD=x", "PASSWORD=***"),
        ('"postgresql://moodle:s3cret@127.0.0.1:5432/moodle" to address',
         '"postgresql://moodle:***@127.0.0.1:5432/moodle" to address'),
        ("postgres://u:p@h/db?password=x&sslmode=require",
         "postgres://u:***@h/db?password=***"),
        ("database moodle, user moodle", "database moodle, user moodle"),
        ('password authentication failed for user "moodle"',
         'password authentication failed for user "moodle"'),
        ("postgresql://moodle@h/db", "postgresql://moodle@h/db"),
    ],
)  # fmt: skip
def test_mask_conninfo_passwords(text, masked):
    assert script.mask_conninfo_passwords(text) == masked


# ---------------------------------------------------------------- output and signals


def test_unwritable_config_folder_stops_before_db(server, db, clean_env):
    """/proc takes no new files, not even from root, so the check cannot pass."""
    before = snapshot(server, db)

    result = run_on(server, db, clean_env, "--count", "2",
                    "--config", "/proc/moodle-load-config.json")  # fmt: skip

    assert result.returncode == 1
    assert result.stdout == ""
    assert "connected to database" not in result.stderr
    assert "hashing" not in result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: cannot create a file in folder /proc of --config (")
    assert line.endswith(
        "), make the folder writable or point --config elsewhere; nothing was changed"
    )
    assert snapshot(server, db) == before


def test_dry_run_ignores_unwritable_config_folder(server, db, clean_env):
    result = run_on(server, db, clean_env, "--count", "1", "--dry-run",
                    "--config", "/proc/moodle-load-config.json")  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout == "3\ttool_generator_000001\n"


def run_with_full_stdout(
    args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run the script with stdout on /dev/full, where every write fails."""
    with open("/dev/full", "w") as full:
        return subprocess.run(
            [sys.executable, str(SCRIPT), *args],
            env=env, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip


def test_stdout_full_after_commit(server, db, clean_env, tmp_path):
    config = tmp_path / "config.json"
    before = user_rows(server, db)
    args = [*db_options(server, db), "--password", PASSWORD, "--bcrypt-cost", COST,
            "--count", "1", "--config", str(config)]  # fmt: skip

    result = run_with_full_stdout(args, clean_env)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: cannot write the result to stdout (No space left on device), but the"
        f" users were updated and {config} was written; check where stdout goes"
    )
    assert_changed_exactly(before, user_rows(server, db), [3])
    assert json.loads(config.read_text())["users"][0]["password"] == PASSWORD


def test_stdout_full_in_dry_run(server, db, clean_env, tmp_path):
    args = [*db_options(server, db), "--password", PASSWORD, "--count", "1",
            "--dry-run", "--config", str(tmp_path / "c.json")]  # fmt: skip

    result = run_with_full_stdout(args, clean_env)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: cannot write the user list to stdout (No space left on device),"
        " check where stdout goes; nothing was changed"
    )


@pytest.mark.parametrize(
    ("signum", "code", "what"),
    [
        (signal.SIGTERM, 143, "terminated by SIGTERM"),
        (signal.SIGINT, 130, "interrupted by Ctrl-C (SIGINT)"),
    ],
)
def test_signal_rolls_back_transaction(
    server, db, clean_env, tmp_path, signum, code, what
):
    """The signal arrives while the UPDATE waits for a row lock that the test holds."""
    config = tmp_path / "config.json"
    original = write_config(config, OLD_CONFIG)
    before = snapshot(server, db)
    args = [*db_options(server, db), "--password", PASSWORD, "--bcrypt-cost", COST,
            "--count", "2", "--config", str(config)]  # fmt: skip

    with contextlib.closing(server.connect(db)) as blocker:
        blocker.cursor().execute("SELECT id FROM mdl_user WHERE id = 3 FOR UPDATE")
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args], env=clean_env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            wait_until_blocked_on_lock(server, process)
            process.send_signal(signum)
        finally:
            blocker.rollback()
        stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == code, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (
        f"error: {what}, any open transaction was rolled back and nothing was"
        " changed; run again to set the passwords"
    )
    assert snapshot(server, db) == before
    assert config.read_bytes() == original
    assert stray_files(tmp_path) == []


def test_stop_signals_held_after_commit_start():
    """A signal raises until hold(), and is only recorded from then on."""
    signals = script.StopSignals()

    with pytest.raises(script.Interrupted) as caught:
        signals.handle(signal.SIGTERM, None)
    assert caught.value.signum == signal.SIGTERM

    signals = script.StopSignals()
    signals.hold()
    signals.handle(signal.SIGINT, None)
    assert signals.held_signal == signal.SIGINT


def test_stop_signals_second_signal_recorded():
    """A second signal during the rollback does not interrupt the cleanup."""
    signals = script.StopSignals()
    with pytest.raises(script.Interrupted):
        signals.handle(signal.SIGTERM, None)

    signals.handle(signal.SIGTERM, None)

    assert signals.held_signal == signal.SIGTERM


def test_counts_of_one_singular(server, db, clean_env, tmp_path):
    config = tmp_path / "c.json"

    dry = run_on(server, db, clean_env, "--count", "1", "--dry-run",
                 "--config", str(config))  # fmt: skip
    one = run_on(server, db, clean_env, "--count", "1", "--config", str(config))
    two = run_on(server, db, clean_env, "--count", "2", "--config", str(config))

    assert "chose 1 user, id 3\n" in dry.stderr
    assert "dry run: 1 user would be updated and written to" in dry.stderr
    assert one.stdout == f"updated 1 user, config written to {config}\n"
    assert "deleted 0 user preferences that blocked the login\n" in one.stderr
    assert "chose 2 users, ids 3 to 4\n" in two.stderr
    assert "deleted 1 user preference that blocked the login\n" in two.stderr
    assert two.stdout == f"updated 2 users, config written to {config}\n"


def test_too_few_users_singular(server, db, clean_env, tmp_path):
    result = run_on(server, db, clean_env, "--count", "2", "--where",
                    "username = 'teacher1'", "--config", str(tmp_path / "c.json"))

    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "error: only 1 user matches, --count asks for 2; lower --count or widen"
        " --where (nothing was changed)"
    )


# ---------------------------------------------------------------- libpq conventions


def test_libpq_environment_variables(server, db, clean_env, tmp_path):
    env = {**clean_env, "PGHOST": pg_server.HOST, "PGPORT": str(server.port),
           "PGUSER": pg_server.ROLE, "PGPASSWORD": pg_server.ROLE_PASSWORD,
           "PGDATABASE": db}  # fmt: skip
    before = user_rows(server, db)
    args = ["--password", PASSWORD, "--bcrypt-cost", COST, "--count", "1"]

    result = run_script([*args, "--config", str(tmp_path / "c.json")], env)

    assert result.returncode == 0, result.stderr
    assert f"connected to database {db} at 127.0.0.1:{server.port}" in result.stderr
    assert_changed_exactly(before, user_rows(server, db), [3])


def test_libpq_sslmode_from_environment(server, db, clean_env, tmp_path):
    """The test server has no TLS, so PGSSLMODE=require must make libpq fail."""
    env = {**clean_env, "PGSSLMODE": "require"}
    args = [*db_options(server, db), "--password", PASSWORD]

    result = run_script([*args, "--config", str(tmp_path / "c.json")], env)

    assert result.returncode == 1
    assert "server does not support SSL" in result.stderr


@pytest.mark.parametrize("via", ["home", "pgpassfile"])
def test_password_file_supplies_db_password(server, db, clean_env, tmp_path, via):
    line = f"{pg_server.HOST}:{server.port}:{db}:{pg_server.ROLE}:"
    if via == "home":
        passfile = Path(clean_env["HOME"]) / ".pgpass"
        env = clean_env
    else:
        passfile = tmp_path / "passwords"
        env = {**clean_env, "PGPASSFILE": str(passfile)}
    passfile.write_text(line + pg_server.ROLE_PASSWORD + "\n")
    passfile.chmod(0o600)
    args = db_options(server, db)[:-2]
    options = ["--password", PASSWORD, "--bcrypt-cost", COST, "--count", "1"]

    result = run_script([*args, *options, "--config", str(tmp_path / "c.json")], env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("updated 1 user,")


def test_no_db_password_anywhere_fails(server, db, clean_env, tmp_path):
    args = [*db_options(server, db)[:-2], "--password", PASSWORD]

    result = run_script([*args, "--config", str(tmp_path / "c.json")], clean_env)

    assert result.returncode == 1
    assert "error: cannot connect to PostgreSQL" in result.stderr
    assert "no password supplied" in result.stderr


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--count", "0", "must be at least 1, got 0"),
        ("--count", "-5", "must be at least 1, got -5"),
        ("--count", "ten", "invalid number 'ten'"),
        ("--bcrypt-cost", "3", "must be 4 to 31, got 3"),
        ("--bcrypt-cost", "32", "must be 4 to 31, got 32"),
        ("--password", "b" * 73, "is 73 bytes in UTF-8, bcrypt uses at most 72"),
        ("--password", "é" * 37, "is 74 bytes in UTF-8, bcrypt uses at most 72"),
        ("--password", "", "must not be empty"),
        ("--password", "changeme", "Moodle forces a password change at login"),
        ("--prefix", "mdl_; DROP TABLE x; --", "invalid prefix"),
        ("--prefix", "MDL_", "invalid prefix"),
        ("--prefix", "m-", "invalid prefix"),
        ("--db-port", "70000", "must be 1 to 65535"),
        ("--where", "1=1; DROP TABLE x", "must be one condition without ';'"),
        ("--db-host", "postgresql://moodle:Uri-Secret-5@127.0.0.1/moodle",
         "is a connection URI, not a host name"),
    ],
)
def test_invalid_option_exits_2(clean_env, tmp_path, option, value, message):
    """Validation happens before connecting: port 1 would fail with exit code 1."""
    args = ["--db-host", "127.0.0.1", "--db-port", "1", "--password", PASSWORD,
            "--config", str(tmp_path / "c.json"), option, value]  # fmt: skip
    secret_options = ("--password", "--db-host")
    secrets = (PASSWORD, value) if option in secret_options and value else (PASSWORD,)

    result = run_script(args, clean_env, secrets=secrets)

    assert result.returncode == 2
    assert result.stdout == ""
    assert f"argument {option}" in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "c.json").exists()


def test_hostile_prefix_drops_nothing(server, db, clean_env, tmp_path):
    with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE x (id int)")
        conn.commit()

    result = run_on(server, db, clean_env, "--prefix", "mdl_; DROP TABLE x; --",
                    "--config", str(tmp_path / "c.json"))  # fmt: skip

    assert result.returncode == 2
    with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT to_regclass('x') IS NOT NULL")
        assert cursor.fetchone()[0] is True


# ---------------------------------------------------------------- scale


def test_run_100k_users_at_cost_12(server, clean_env, tmp_path):
    """100,000 users change in one run at the default cost (bench/ times it)."""
    name = f"moodle_{next(database_numbers)}"
    pg_server.create_moodle_database(server, name, "m_", generated_users=100_000)
    config = tmp_path / "config.json"
    args = [*db_options(server, name), "--prefix", "m_", "--count", "100000",
            "--password", PASSWORD, "--config", str(config)]  # fmt: skip

    result = run_script(args, clean_env)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"updated 100000 users, config written to {config}\n"
    assert len(json.loads(config.read_text())["users"]) == 100_000
    with contextlib.closing(server.connect(name)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT count(DISTINCT password), min(password) FROM m_user"
                       " WHERE id BETWEEN 3 AND 100002")  # fmt: skip
        distinct, stored = cursor.fetchone()
    assert distinct == 1
    assert stored.startswith("$2y$12$")
