"""The badges file: every way it can be wrong, each a one-line error naming file, badge and key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from replicator.badges import spec as badge_spec
from replicator.badges.catalog import bind_sync
from replicator.badges.spec import parse
from replicator.errors import BadgeFileError, SchemaError
from tests.conftest import Database

GOOD = """
[[badge]]
name = "alerts"
table = "ops.alerts"
user = "owner"
where = "acked is false"
"""


def one(text: str) -> str:
    return f'[[badge]]\nname = "b"\ntable = "t"\nuser = "u"\n{text}\n'


def test_the_default_file_is_the_contract() -> None:
    specs = badge_spec.load(None)
    assert [(s.name, s.schema, s.table, s.user, s.counterpart) for s in specs] == [
        ("unread_messages", "public", "messages", "recipient_id", "sender_id"),
        ("missed_calls", "public", "calls", "callee_id", "caller_id"),
    ]
    assert [badge_spec.predicate.to_text(s.where) for s in specs] == [
        "read_at is null",
        "status = 'missed' and seen_at is null",
    ]
    assert badge_spec.load(None, schema="chat")[0].schema == "chat"


def test_a_table_without_schema_is_in_replicator_schema() -> None:
    specs = parse(one(""), schema="app")
    assert (specs[0].schema, specs[0].table, specs[0].counterpart) == ("app", "t", None)
    assert isinstance(specs[0].where, badge_spec.predicate.Always)
    assert parse(GOOD)[0].qualified_table == "ops.alerts"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[badge]\nname = 1", "f.toml: not valid TOML: "),
        ("title = 'x'", "f.toml: unknown top-level key 'title'; a badges file holds [[badge]]"),
        ("", "f.toml: no [[badge]] entries"),
        ("badge = 3", "f.toml: no [[badge]] entries"),
        (
            "".join(f'[[badge]]\nname = "b{i}"\ntable = "t"\nuser = "u"\n' for i in range(256)),
            "f.toml: 256 [[badge]] entries; a file holds at most 255",
        ),
        (one('colour = "red"'), "f.toml: badge 'b': colour: unknown key; a badge has name, table"),
        ('[[badge]]\ntable = "t"\nuser = "u"', "f.toml: badge #1: name: missing"),
        ('[[badge]]\nname = "b"\nuser = "u"', "f.toml: badge 'b': table: missing"),
        ('[[badge]]\nname = "b"\ntable = "t"', "f.toml: badge 'b': user: missing"),
        (one("counterpart = 3"), "f.toml: badge 'b': counterpart: must be a string, not int"),
        (one('counterpart = ""'), "f.toml: badge 'b': counterpart: is empty"),
        (one('counterpart = "u"'), "f.toml: badge 'b': counterpart: is the user column itself"),
        (one('where = "x = \'a"'), "f.toml: badge 'b': where: unterminated 'text' literal"),
        (one("where = \"x < 'a'\""), "f.toml: badge 'b': where: x < 'a': only a number"),
        (one('where = ""'), "f.toml: badge 'b': where: is empty; leave it out to count every row"),
        (
            '[[badge]]\nname = "Bad-Name"\ntable = "t"\nuser = "u"',
            "f.toml: badge 'Bad-Name': name: 'Bad-Name': use lower case letters, digits and _",
        ),
        (
            '[[badge]]\nname = "lsn"\ntable = "t"\nuser = "u"',
            "f.toml: badge 'lsn': name: 'lsn' is an event field of its own",
        ),
        (
            '[[badge]]\nname = "user_id"\ntable = "t"\nuser = "u"',
            "f.toml: badge 'user_id': name: 'user_id' is an event field of its own",
        ),
        (one("") + one(""), "f.toml: badge 'b': name: is used twice"),
        (
            '[[badge]]\nname = "total_x"\ntable = "t"\nuser = "u"\ncounterpart = "c"\n'
            '[[badge]]\nname = "x"\ntable = "t"\nuser = "u"\n',
            "f.toml: badge 'x': name: makes the event field 'total_x', as badge 'total_x' does",
        ),
        ('[[badge]]\nname = "b"\ntable = ".t"\nuser = "u"', "f.toml: badge 'b': table: '.t'"),
        ("badge = [1]", "f.toml: badge #1 is not a table of keys"),
    ],
)
def test_every_file_error_is_one_line(text: str, message: str) -> None:
    with pytest.raises(BadgeFileError) as caught:
        parse(text, label="f.toml")
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unreadable_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(BadgeFileError, match=r"REPLICATOR_BADGES='.*missing.toml' cannot be read"):
        badge_spec.load(tmp_path / "missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[[badge]]\nname = "caf\xe9"')
    with pytest.raises(BadgeFileError, match=r"latin1.toml: not UTF-8 text"):
        badge_spec.load(bad)


SCHEMA = """
CREATE SCHEMA ops;
CREATE TYPE ops.level AS ENUM ('debug', 'info', 'warn', 'error');
CREATE EXTENSION IF NOT EXISTS citext;
CREATE TABLE ops.alerts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner bigint,
    "sourceName" text,
    level ops.level,
    acked boolean NOT NULL DEFAULT false,
    code char(4),
    email citext,
    score double precision,
    note text COLLATE "C"
);
"""


@pytest.mark.parametrize(
    ("badge", "error", "message"),
    [
        (
            'table = "ops.nope"\nuser = "owner"',
            SchemaError,
            "badge 'b': table ops.nope does not exist; create it, or fix table in the badges file",
        ),
        (
            'table = "ops.alerts"\nuser = "owner"\nwhere = "sourcename is null"',
            SchemaError,
            "badge 'b': table ops.alerts has no column 'sourcename' (there is 'sourceName':"
            " quote it in where)",
        ),
        (
            'table = "ops.alerts"\nuser = "email"',
            BadgeFileError,
            "badge 'b': user: column 'email' is citext; a user column must be uuid, text,",
        ),
        (
            'table = "ops.alerts"\nuser = "owner"\ncounterpart = "score"',
            BadgeFileError,
            "badge 'b': counterpart: column 'score' is double precision",
        ),
        (
            'table = "ops.alerts"\nuser = "owner"\nwhere = "code = \'ab\'"',
            BadgeFileError,
            "badge 'b': where: code = 'ab': code (character(4)) cannot be compared exactly",
        ),
        (
            'table = "ops.alerts"\nuser = "owner"\nwhere = "level = \'fatal\'"',
            BadgeFileError,
            "badge 'b': where: the database refuses it: invalid input value for enum ops.level:"
            ' "fatal"',
        ),
        (
            'table = "ops.alerts"\nuser = "owner"\nwhere = "level < 3"',
            BadgeFileError,
            "badge 'b': where: level < 3: < works on numeric columns only",
        ),
    ],
)
def test_catalog_errors_name_the_badge_and_the_fix(
    database: Database, badge: str, error: type[Exception], message: str
) -> None:
    with psycopg.connect(database.dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        specs = parse(f'[[badge]]\nname = "b"\n{badge}\n')
        with pytest.raises(error) as caught:
            bind_sync(conn, specs)
    assert str(caught.value).startswith(message), str(caught.value)


def test_camel_case_columns_and_a_deterministic_collation_bind(database: Database) -> None:
    with psycopg.connect(database.dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        specs = parse(
            '[[badge]]\nname = "b"\ntable = "ops.alerts"\nuser = "owner"\n'
            "counterpart = \"sourceName\"\nwhere = \"level in ('warn', 'error') and note <> 'x'"
            ' and acked = false"\n'
        )
        (badge,) = bind_sync(conn, specs)
    assert badge.types["sourceName"].kind == "text"
    assert badge.types["level"].kind == "enum"


def test_serve_stops_at_a_bad_file_with_one_line(database: Database, tmp_path: Path) -> None:
    path = tmp_path / "badges.toml"
    path.write_text(one('where = "read_at is nul"'))
    env = {
        **os.environ,
        "DATABASE_URL": database.dsn,
        "REPLICATOR_BADGES": str(path),
        "REPLICATOR_JWT_SECRET": "s" * 40,
        "REPLICATOR_PORT": "0",
    }
    run = subprocess.run(
        [sys.executable, "-m", "replicator", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert lines[-1] == (
        f"replicator: {path}: badge 'b': where: expected null, true or false at position 12,"
        " found 'nul'"
    ), run.stderr
