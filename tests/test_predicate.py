"""The ``where`` grammar: parsing, errors, and the compiled row test against PostgreSQL itself.

The property test draws predicates from the whole grammar and rows of every comparable type
(NULLs, booleans, integers, numerics with NaN, text with quotes and unicode, enums, uuids),
stores the rows, reads them back as the server's own text output, and checks that the row
test says TRUE exactly when ``SELECT (<predicate>) IS TRUE`` does, for the text as written and
for the SQL the tree composes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from replicator.badges import predicate
from replicator.badges.catalog import CATALOG_QUERY, tables_from_rows
from replicator.badges.predicate import parse, row_test, to_sql, to_text
from replicator.errors import PredicateError
from tests.conftest import Database

# -- parsing ----------------------------------------------------------------------------------


def test_keywords_in_any_case_and_sql_identifier_rules() -> None:
    node = parse("NOT \"readAt\" IS Null aNd Status IN ('a', 'it''s') or \"x\"\"y\" != -2.50")
    assert to_text(node) == (
        "(not \"readAt\" is null and status in ('a', 'it''s')) or \"x\"\"y\" <> -2.50"
    )
    assert predicate.columns(node) == ["readAt", "status", 'x"y']


def test_precedence_is_not_then_and_then_or() -> None:
    node = parse("a is null or b is null and not c is null")
    assert isinstance(node, predicate.Or)
    assert isinstance(node.items[1], predicate.And)
    assert isinstance(node.items[1].items[1], predicate.Not)


def test_to_sql_quotes_identifiers_and_literals() -> None:
    node = parse("\"Level\" = 'it''s' and n >= 2.5 and f is not true")
    text = to_sql(node).as_string(None)
    assert text == '("Level" = \'it\'\'s\' AND "n" >= 2.5 AND "f" IS NOT TRUE)'


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("", "is empty; leave it out to count every row"),
        ("   ", "is empty; leave it out to count every row"),
        ("status = 'missed", "unterminated 'text' literal at position 10"),
        ('"status = 1', 'unterminated "quoted" column name at position 1'),
        ("status = 'a' and", "expected a column name at the end"),
        ("status == 'a'", "expected a literal ('text', a number, true or false) at position 9"),
        ("status = missed", "expected a literal ('text', a number, true or false)"),
        ("status missed", "expected is, in, not in or a comparison"),
        ("status is 'x'", "expected null, true or false at position 11"),
        ("status not like 'x'", "expected in at position 12"),
        ("status in 'a'", "expected '(' at position 11"),
        ("status in ('a' 'b')", "expected ',' or ')' at position 16"),
        ("(status is null", "expected ')' at the end"),
        ("status is null)", "expected and, or or the end at position 15, found ')'"),
        ("level < 'x'", "level < 'x': only a number can be compared with <"),
        ("null is null", "found the keyword 'null' (write a column of that name in double quotes)"),
        ("a = 1 ; drop table x", "unexpected ';' at position 7"),
        ("a = 1::int", "unexpected ':' at position 6"),
        ("lower(a) = 'x'", "expected is, in, not in or a comparison"),
    ],
)
def test_every_parse_error_is_one_line_with_its_position(where: str, message: str) -> None:
    with pytest.raises(PredicateError) as caught:
        parse(where)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


COLUMNS = {
    "t": predicate.Column("text", predicate.TEXT),
    "n": predicate.Column("numeric", predicate.NUMERIC),
    "i": predicate.Column("integer", predicate.INTEGER),
    "f": predicate.Column("boolean", predicate.BOOLEAN),
    "u": predicate.Column("uuid", predicate.UUID),
    "c": predicate.Column("character(3)", predicate.OTHER),
    "x": predicate.Column("citext", predicate.OTHER),
    "d": predicate.Column("double precision", predicate.OTHER),
}


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("t < 3", "t < 3: < works on numeric columns only, and t (text) is not one"),
        ("t = 3", "t is text; compare it with a quoted literal, not the number 3"),
        ("t = true", "t is text, not boolean"),
        ("t is true", "t is true: t (text) is not a boolean column"),
        ("i = 'x'", "i = 'x': 'x' is not a number"),
        ("i = '2.5'", "i = '2.5': '2.5' is not an integer"),
        ("i = true", "true is not a number"),
        ("f = 'maybe'", "f = 'maybe': 'maybe' is not a boolean"),
        ("f = 'o'", "'o' is not a boolean"),
        ("u = 'not-a-uuid'", "'not-a-uuid' is not a uuid"),
        ("c = 'ab'", "c (character(3)) cannot be compared exactly outside the database"),
        ("c = 'ab'", "char(n) ignores trailing spaces: use text or varchar"),
        ("x in ('a')", "citext compares case-insensitively"),
        ("d > 1", "(use numeric or an integer type)"),
    ],
)
def test_types_the_row_test_cannot_compare_are_refused(where: str, message: str) -> None:
    node = parse(where)
    with pytest.raises(PredicateError) as caught:
        predicate.check_types(node, COLUMNS)
    assert message in str(caught.value)


def test_is_null_works_on_any_type() -> None:
    node = parse("c is null and x is not null and d is null")
    predicate.check_types(node, COLUMNS)
    counts = row_test(node, {"c": 0, "x": 1, "d": 2}, COLUMNS)
    assert counts([None, "A", None])
    assert not counts([None, None, None])


def test_literals_compare_as_the_column_type_reads_them() -> None:
    node = parse(
        "u = '{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}' and f = 'YES' and i = '07' and n = 2"
    )
    predicate.check_types(node, COLUMNS)
    counts = row_test(node, {"u": 0, "f": 1, "i": 2, "n": 3}, COLUMNS)
    assert counts(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "t", "7", "2.000"])
    assert not counts(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "t", "7", "NaN"])


# -- the row test against PostgreSQL ----------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A column under test: its SQL type, values to store, and literals to compare with."""

    sql_type: str
    values: tuple[str, ...]
    literals: tuple[str, ...]
    ordered: bool = False


UUIDS = (
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-4fff-bfff-ffffffffffff",
)
TEXTS = ("", "a", "A", "a ", "it's", "debug", "Ünïcode ✓", "'", '"', "\\", "missed")
KINDS = {
    "t": Kind("text", TEXTS, tuple("'" + s.replace("'", "''") + "'" for s in TEXTS)),
    "v": Kind("varchar(12)", TEXTS, ("'a'", "'debug'", "'it''s'", "'a '", "'Ünïcode ✓'")),
    "i": Kind(
        "integer",
        ("0", "1", "-1", "7", "2147483647", "-2147483648", "3"),
        ("0", "1", "-1", "7", "2.5", "-0.5", "3.0", "'7'", "'-1'", "2147483647"),
        ordered=True,
    ),
    "b": Kind(
        "bigint",
        ("0", "5", "-5", "9223372036854775807", "-9223372036854775808"),
        ("0", "5", "-5", "9223372036854775807", "4.999", "'5'"),
        ordered=True,
    ),
    "s": Kind("smallint", ("0", "2", "-2", "32767"), ("0", "2", "-2.5", "32767"), ordered=True),
    "n": Kind(
        "numeric",
        ("0", "1.50", "1.5", "-2", "NaN", "1000", "0.001", "Infinity", "-Infinity", "3"),
        ("0", "1.5", "1.50", "-2", "'NaN'", "1000", "0.001", "'Infinity'", "'-Infinity'", "3"),
        ordered=True,
    ),
    "f": Kind("boolean", ("t", "f"), ("true", "false", "'t'", "'yes'", "'off'", "'0'", "'TRUE'")),
    "e": Kind("replicator_test_level", ("debug", "info", "warn"), ("'debug'", "'info'", "'warn'")),
    "u": Kind(
        "uuid",
        UUIDS,
        (
            f"'{UUIDS[0]}'",
            f"'{UUIDS[0].upper()}'",
            f"'{UUIDS[1].replace('-', '')}'",
            "'{" + UUIDS[2] + "}'",
        ),
    ),
    "ts": Kind("timestamptz", ("2024-05-06 08:00:00+00",), ()),
}
TEST_TABLE = "replicator_predicate_rows"


def _word(draw: st.DrawFn, word: str) -> str:
    """A keyword in a random case."""
    return "".join(c.upper() if draw(st.booleans()) else c for c in word)


@st.composite
def leaf_tests(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(sorted(KINDS)))
    kind = KINDS[name]
    choices = ["null"]
    if kind.literals:
        choices += ["eq", "eq", "in"]
    if kind.ordered:
        choices += ["order", "order"]
    if kind.sql_type == "boolean":
        choices += ["bool", "bool"]
    test = draw(st.sampled_from(choices))
    column = name if draw(st.booleans()) else f'"{name}"'
    if test == "null":
        negated = _word(draw, "not ") if draw(st.booleans()) else ""
        return f"{column} {_word(draw, 'is')} {negated}{_word(draw, 'null')}"
    if test == "bool":
        negated = _word(draw, "not ") if draw(st.booleans()) else ""
        value = _word(draw, draw(st.sampled_from(["true", "false"])))
        return f"{column} {_word(draw, 'is')} {negated}{value}"
    if test == "eq":
        op = draw(st.sampled_from(["=", "<>", "!="]))
        return f"{column} {op} {draw(st.sampled_from(kind.literals))}"
    if test == "order":
        op = draw(st.sampled_from(["<", "<=", ">", ">="]))
        numbers = [lit for lit in kind.literals if not lit.startswith("'")]
        return f"{column} {op} {draw(st.sampled_from(numbers))}"
    items = draw(st.lists(st.sampled_from(kind.literals), min_size=1, max_size=3))
    negated = _word(draw, "not ") if draw(st.booleans()) else ""
    return f"{column} {negated}{_word(draw, 'in')} ({', '.join(items)})"


@st.composite
def predicates(draw: st.DrawFn, depth: int = 3) -> str:
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(leaf_tests())
    shape = draw(st.sampled_from(["and", "or", "not", "paren"]))
    if shape == "not":
        return f"{_word(draw, 'not')} ({draw(predicates(depth - 1))})"
    if shape == "paren":
        return f"({draw(predicates(depth - 1))})"
    parts = draw(st.lists(predicates(depth - 1), min_size=2, max_size=3))
    return f" {_word(draw, shape)} ".join(f"({p})" for p in parts)


@st.composite
def rows(draw: st.DrawFn) -> list[dict[str, str | None]]:
    count = draw(st.integers(1, 8))
    return [
        {
            name: draw(st.one_of(st.none(), st.sampled_from(kind.values)))
            for name, kind in KINDS.items()
        }
        for _ in range(count)
    ]


Oracle = tuple[psycopg.Connection[tuple[object, ...]], dict[str, predicate.Column]]


@pytest.fixture
def oracle(database: Database) -> Iterator[Oracle]:
    with psycopg.connect(database.dsn, autocommit=True) as conn:
        conn.execute("CREATE TYPE replicator_test_level AS ENUM ('debug', 'info', 'warn')")
        columns = ", ".join(f'"{name}" {kind.sql_type}' for name, kind in KINDS.items())
        conn.execute(f"CREATE TABLE {TEST_TABLE} (id int PRIMARY KEY, {columns})")  # type: ignore[arg-type]
        found = conn.execute(CATALOG_QUERY, (["public"], [TEST_TABLE])).fetchall()
        table = tables_from_rows(found)["public", TEST_TABLE]
        yield conn, dict(table.columns)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(where=predicates(), data=rows())
def test_row_test_agrees_with_postgresql(
    oracle: Oracle,
    where: str,
    data: list[dict[str, str | None]],
) -> None:
    conn, types = oracle
    node = parse(where)
    predicate.check_types(node, types)
    names = list(KINDS)
    with conn.transaction(force_rollback=True):
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL("INSERT INTO {} (id, {}) VALUES (%s, {})").format(
                    sql.Identifier(TEST_TABLE),
                    sql.SQL(", ").join(sql.Identifier(n) for n in names),
                    sql.SQL(", ").join(
                        sql.SQL("%s::text::{}").format(sql.SQL(KINDS[n].sql_type)) for n in names
                    ),
                ),
                [(i, *(row[n] for n in names)) for i, row in enumerate(data)],
            )
        # the values as the server prints them (its output functions), as a stream carries them
        shown = sql.SQL(", ").join(
            sql.SQL("CASE WHEN {c} IS NULL THEN NULL ELSE format('%s', {c}) END").format(
                c=sql.Identifier(n)
            )
            for n in names
        )
        query = sql.SQL("SELECT id, ({}) IS TRUE, ({}) IS TRUE, {} FROM {} ORDER BY id").format(
            sql.SQL(where),  # type: ignore[arg-type]
            to_sql(node),
            shown,
            sql.Identifier(TEST_TABLE),
        )
        result = conn.execute(query).fetchall()
    counts = row_test(node, {n: i for i, n in enumerate(names)}, types)
    for row in result:
        values = list(row[3:])
        assert row[1] == row[2], f"{where!r}: the composed SQL disagrees with the text"
        assert counts(values) is row[1], f"{where!r} on {dict(zip(names, values, strict=True))}"


def test_a_fixed_sample_covers_nan_and_three_valued_logic(oracle: Oracle) -> None:
    """The cases the property test must never miss, checked every run."""
    conn, types = oracle
    slots = {n: i for i, n in enumerate(KINDS)}
    cases = {
        "n = 'NaN'": (["NaN"], True),
        "n > 1000": (["NaN"], True),
        "n < 1000": (["NaN"], False),
        "n >= 1000": (["Infinity"], True),
        "n = 1.5": (["1.50"], True),
        "t <> 'debug'": ([None], False),
        "not (t <> 'debug')": ([None], False),
        "t not in ('a')": ([None], False),
        "f is not true": ([None], True),
        "f = 'yes'": (["t"], True),
        "e in ('warn') or e is null": ([None], True),
    }
    for where, (value, expected) in cases.items():
        node = parse(where)
        predicate.check_types(node, types)
        column = predicate.columns(node)[0]
        row: list[str | None] = [None] * len(KINDS)
        row[slots[column]] = value[0]
        assert row_test(node, slots, types)(row) is expected, where
        literal = "NULL" if value[0] is None else "'" + value[0] + "'"
        type_name = KINDS[column].sql_type
        got = conn.execute(
            f"SELECT ({where}) IS TRUE FROM (SELECT {literal}::{type_name} AS {column}) r"  # type: ignore[arg-type]
        ).fetchone()
        assert got is not None and got[0] is expected, where
