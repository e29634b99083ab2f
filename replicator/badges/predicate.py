"""A badge's ``where``: parsed once into a tree that becomes SQL and a compiled row test.

The grammar (keywords in any case)::

    expr     := term (OR term)*
    term     := factor (AND factor)*
    factor   := NOT factor | '(' expr ')' | test
    test     := col IS [NOT] NULL | col IS [NOT] TRUE | col IS [NOT] FALSE
              | col (= | <> | !=) literal | col (< | <= | > | >=) number
              | col [NOT] IN '(' literal (',' literal)* ')'
    literal  := 'text' ('' escapes a quote) | number | TRUE | FALSE
    number   := [-] digits [. digits]

Columns follow SQL's identifier rules: unquoted names are folded to lower case, double
quotes keep a name exactly (``"readAt"``). A row counts when the predicate is TRUE under
SQL's three-valued logic; the row test is compiled into two Python expressions per node,
"is TRUE" and "is FALSE" (NOT swaps them), so NULLs never need a third value at run time.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from psycopg import sql

from replicator.errors import PredicateError

# -- the tree -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Literal:
    #: "text", "number" or "bool"
    kind: str
    #: the text between the quotes, the number as written, or "true"/"false"
    text: str

    def sql(self) -> sql.Composable:
        if self.kind == "text":
            return sql.Literal(self.text)
        # numbers and booleans are checked tokens of the grammar
        return sql.SQL(self.text)

    def __str__(self) -> str:
        if self.kind == "text":
            return "'" + self.text.replace("'", "''") + "'"
        return self.text


@dataclass(frozen=True)
class IsNull:
    column: str
    negated: bool = False


@dataclass(frozen=True)
class IsBool:
    column: str
    value: bool
    negated: bool = False


@dataclass(frozen=True)
class Compare:
    column: str
    op: str
    literal: Literal


@dataclass(frozen=True)
class In:
    column: str
    literals: tuple[Literal, ...]
    negated: bool = False


@dataclass(frozen=True)
class Not:
    item: Node


@dataclass(frozen=True)
class And:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Always:
    """No ``where``: every row counts."""


Node = IsNull | IsBool | Compare | In | Not | And | Or | Always
Test = IsNull | IsBool | Compare | In

ORDERING = ("<", "<=", ">", ">=")


def columns(node: Node) -> list[str]:
    """The columns a predicate reads, in order of first use."""
    found: dict[str, None] = {}
    for test in tests(node):
        found[test.column] = None
    return list(found)


def tests(node: Node) -> Iterator[Test]:
    if isinstance(node, And | Or):
        for item in node.items:
            yield from tests(item)
    elif isinstance(node, Not):
        yield from tests(node.item)
    elif not isinstance(node, Always):
        yield node


# -- parsing --------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^']|'')*')
      | (?P<quoted>"(?:[^"]|"")+")
      | (?P<number>-?\d+(?:\.\d+)?|-?\.\d+)
      | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
      | (?P<op><>|!=|<=|>=|=|<|>)
      | (?P<punct>[(),])
    )""",
    re.VERBOSE,
)
KEYWORDS = frozenset({"and", "or", "not", "is", "null", "true", "false", "in"})


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    position: int


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            at = len(text) - len(text[pos:].lstrip())
            if text[at] == "'":
                raise PredicateError(f"unterminated 'text' literal at position {at + 1}")
            if text[at] == '"':
                raise PredicateError(f'unterminated "quoted" column name at position {at + 1}')
            raise PredicateError(f"unexpected {text[at]!r} at position {at + 1}")
        kind = match.lastgroup
        assert kind is not None
        out.append(_Token(kind, match.group(kind), match.start(kind) + 1))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.i = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def keyword(self, *words: str) -> bool:
        token = self.peek()
        if token is not None and token.kind == "word" and token.text.lower() in words:
            self.i += 1
            return True
        return False

    def punct(self, char: str) -> bool:
        token = self.peek()
        if token is not None and token.kind == "punct" and token.text == char:
            self.i += 1
            return True
        return False

    def fail(self, expected: str) -> PredicateError:
        token = self.peek()
        if token is None:
            return PredicateError(f"expected {expected} at the end")
        return PredicateError(
            f"expected {expected} at position {token.position}, found {token.text!r}"
        )

    def parse(self) -> Node:
        if not self.tokens:
            raise PredicateError("is empty; leave it out to count every row")
        node = self.expr()
        if self.peek() is not None:
            raise self.fail("and, or or the end")
        return node

    def expr(self) -> Node:
        items = [self.term()]
        while self.keyword("or"):
            items.append(self.term())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def term(self) -> Node:
        items = [self.factor()]
        while self.keyword("and"):
            items.append(self.factor())
        return items[0] if len(items) == 1 else And(tuple(items))

    def factor(self) -> Node:
        if self.keyword("not"):
            return Not(self.factor())
        if self.punct("("):
            node = self.expr()
            if not self.punct(")"):
                raise self.fail("')'")
            return node
        return self.test()

    def column(self) -> str:
        token = self.peek()
        if token is None or token.kind not in ("word", "quoted"):
            raise self.fail("a column name")
        if token.kind == "word" and token.text.lower() in KEYWORDS:
            raise PredicateError(
                f"expected a column name at position {token.position}, found the keyword"
                f" {token.text!r} (write a column of that name in double quotes)"
            )
        self.i += 1
        if token.kind == "quoted":
            return token.text[1:-1].replace('""', '"')
        return token.text.lower()

    def literal(self) -> Literal:
        token = self.peek()
        if token is not None:
            if token.kind == "string":
                self.i += 1
                return Literal("text", token.text[1:-1].replace("''", "'"))
            if token.kind == "number":
                self.i += 1
                return Literal("number", token.text)
            if token.kind == "word" and token.text.lower() in ("true", "false"):
                self.i += 1
                return Literal("bool", token.text.lower())
        raise self.fail("a literal ('text', a number, true or false)")

    def test(self) -> Node:
        column = self.column()
        if self.keyword("is"):
            negated = self.keyword("not")
            if self.keyword("null"):
                return IsNull(column, negated)
            if self.keyword("true"):
                return IsBool(column, True, negated)
            if self.keyword("false"):
                return IsBool(column, False, negated)
            raise self.fail("null, true or false")
        negated = self.keyword("not")
        if negated or self.keyword("in"):
            if negated and not self.keyword("in"):
                raise self.fail("in")
            if not self.punct("("):
                raise self.fail("'('")
            literals = [self.literal()]
            while self.punct(","):
                literals.append(self.literal())
            if not self.punct(")"):
                raise self.fail("',' or ')'")
            return In(column, tuple(literals), negated)
        token = self.peek()
        if token is None or token.kind != "op":
            raise self.fail("is, in, not in or a comparison (=, <>, !=, <, <=, >, >=)")
        self.i += 1
        op = "<>" if token.text == "!=" else token.text
        literal = self.literal()
        if op in ORDERING and literal.kind != "number":
            raise PredicateError(
                f"{column} {op} {literal}: only a number can be compared with {op}"
            )
        return Compare(column, op, literal)


def parse(text: str) -> Node:
    """Parse a ``where``; ``PredicateError`` says what is wrong and where."""
    return _Parser(text).parse()


# -- SQL ------------------------------------------------------------------------------------


def to_sql(node: Node) -> sql.Composable:
    """The predicate as SQL, identifiers quoted."""
    if isinstance(node, Always):
        return sql.SQL("true")
    if isinstance(node, IsNull):
        return sql.SQL("{} IS NOT NULL" if node.negated else "{} IS NULL").format(
            sql.Identifier(node.column)
        )
    if isinstance(node, IsBool):
        word = "TRUE" if node.value else "FALSE"
        return sql.SQL("{} IS " + ("NOT " if node.negated else "") + word).format(
            sql.Identifier(node.column)
        )
    if isinstance(node, Compare):
        return sql.SQL("{} " + node.op + " {}").format(
            sql.Identifier(node.column), node.literal.sql()
        )
    if isinstance(node, In):
        return sql.SQL("{} " + ("NOT IN" if node.negated else "IN") + " ({})").format(
            sql.Identifier(node.column), sql.SQL(", ").join(lit.sql() for lit in node.literals)
        )
    if isinstance(node, Not):
        return sql.SQL("(NOT {})").format(to_sql(node.item))
    joiner = " AND " if isinstance(node, And) else " OR "
    return sql.SQL("({})").format(sql.SQL(joiner).join(to_sql(item) for item in node.items))


def to_text(node: Node) -> str:
    """The predicate in the grammar's own words, normalized (for messages and docs)."""
    if isinstance(node, Always):
        return "true"
    if isinstance(node, IsNull):
        return f"{quote_name(node.column)} is {'not ' if node.negated else ''}null"
    if isinstance(node, IsBool):
        word = "true" if node.value else "false"
        return f"{quote_name(node.column)} is {'not ' if node.negated else ''}{word}"
    if isinstance(node, Compare):
        return f"{quote_name(node.column)} {node.op} {node.literal}"
    if isinstance(node, In):
        items = ", ".join(str(lit) for lit in node.literals)
        return f"{quote_name(node.column)} {'not ' if node.negated else ''}in ({items})"
    if isinstance(node, Not):
        return f"not {_paren(node.item)}"
    joiner = " and " if isinstance(node, And) else " or "
    return joiner.join(_paren(item) for item in node.items)


def _paren(node: Node) -> str:
    return f"({to_text(node)})" if isinstance(node, And | Or) else to_text(node)


def quote_name(name: str) -> str:
    """An identifier as SQL: as it is when it may be written bare, else double-quoted."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) and name not in KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


# -- types ----------------------------------------------------------------------------------

#: kinds of column the row test can compare, by how values compare
TEXT, UUID, INTEGER, NUMERIC, BOOLEAN, ENUM, OTHER = (
    "text",
    "uuid",
    "integer",
    "numeric",
    "boolean",
    "enum",
    "other",
)
COMPARABLE = frozenset({TEXT, UUID, INTEGER, NUMERIC, BOOLEAN, ENUM})

_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def _boolean(text: str) -> str | None:
    """PostgreSQL's boolean input (a unique prefix of true/false/yes/no, on/off, 1/0)."""
    word = text.strip().lower()
    if not word:
        return None
    hits = {
        "t" if candidate in _TRUE_WORDS else "f"
        for candidate in (*_TRUE_WORDS, *_FALSE_WORDS)
        if candidate.startswith(word) and (len(word) >= 2 or candidate[0] not in "o")
    }
    return hits.pop() if len(hits) == 1 else None


def _number_key(text: str) -> tuple[int, Decimal]:
    """A sort key with PostgreSQL's numeric order: NaN equals NaN and sorts above all else."""
    if text.strip().lower() == "nan":
        return (1, Decimal(0))
    return (0, Decimal(text))


@dataclass(frozen=True)
class Column:
    """A column as the row test sees it: its type's name and kind."""

    type_name: str
    kind: str
    #: the type's oid (pg_attribute.atttypid), 0 when unknown
    type_oid: int = 0


def check_types(node: Node, types: Mapping[str, Column]) -> None:
    """Refuse tests the row test cannot evaluate exactly as PostgreSQL does, by name."""
    for test in tests(node):
        column = types[test.column]
        if isinstance(test, IsNull):
            continue
        name = f"{quote_name(test.column)} ({column.type_name})"
        if isinstance(test, IsBool):
            if column.kind != BOOLEAN:
                raise PredicateError(f"{to_text(test)}: {name} is not a boolean column")
            continue
        if column.kind not in COMPARABLE:
            raise PredicateError(
                f"{to_text(test)}: {name} cannot be compared exactly outside the database;"
                f" only 'is null' and 'is not null' work on it"
                f"{_type_advice(column.type_name)}"
            )
        literals = test.literals if isinstance(test, In) else (test.literal,)
        if (
            isinstance(test, Compare)
            and test.op in ORDERING
            and column.kind
            not in (
                INTEGER,
                NUMERIC,
            )
        ):
            raise PredicateError(
                f"{to_text(test)}: {test.op} works on numeric columns only, and {name} is not one"
            )
        for literal in literals:
            _normalize(literal, column, test)


def _type_advice(type_name: str) -> str:
    lowered = type_name.lower()
    if lowered.startswith("character(") or lowered == "character" or lowered == "bpchar":
        return " (char(n) ignores trailing spaces: use text or varchar)"
    if lowered == "citext":
        return " (citext compares case-insensitively: use text with lower())"
    if lowered in ("real", "double precision"):
        return " (use numeric or an integer type)"
    return ""


def _normalize(literal: Literal, column: Column, test: Test) -> Any:
    """A literal as the row test compares it with a column's text values."""
    where = to_text(test)
    kind = column.kind
    if kind in (INTEGER, NUMERIC):
        if literal.kind == "bool":
            raise PredicateError(f"{where}: {literal} is not a number")
        try:
            key = _number_key(literal.text)
        except InvalidOperation:
            raise PredicateError(f"{where}: {literal} is not a number") from None
        if kind == INTEGER:
            value = key[1]
            integral = not key[0] and value.is_finite() and value == value.to_integral_value()
            # a quoted literal takes the column's type, a number is compared as numeric
            if not integral and (literal.kind == "text" or key[0] or not value.is_finite()):
                raise PredicateError(f"{where}: {literal} is not an integer")
            return int(value) if integral else value
        return key
    if literal.kind == "number":
        raise PredicateError(
            f"{where}: {quote_name(test.column)} is {column.type_name}; compare it with a quoted"
            f" literal, not the number {literal}"
        )
    if kind == BOOLEAN:
        letter = _boolean(literal.text) if literal.kind == "text" else literal.text[0]
        if letter is None:
            raise PredicateError(f"{where}: {literal} is not a boolean")
        return letter
    if literal.kind == "bool":
        raise PredicateError(
            f"{where}: {quote_name(test.column)} is {column.type_name}, not boolean"
        )
    if kind == UUID:
        try:
            return str(uuid.UUID(literal.text.strip()))
        except ValueError:
            raise PredicateError(f"{where}: {literal} is not a uuid") from None
    return literal.text


# -- the compiled row test ------------------------------------------------------------------


class RowTest:
    """Python source of one predicate over a row ``v``, and the names that source uses."""

    def __init__(
        self,
        node: Node,
        slots: Mapping[str, int],
        types: Mapping[str, Column],
        *,
        prefix: str = "_c",
    ) -> None:
        self.slots = slots
        self.types = types
        self.prefix = prefix
        #: constants the source refers to by name
        self.names: dict[str, Any] = {"_number_key": _number_key}
        self.source = self._true(node)

    def _const(self, value: Any) -> str:
        name = f"{self.prefix}{len(self.names)}"
        self.names[name] = value
        return name

    def _value(self, column: str) -> str:
        return f"v[{self.slots[column]}]"

    def _true(self, node: Node) -> str:
        if isinstance(node, Always):
            return "True"
        if isinstance(node, Not):
            return self._false(node.item)
        if isinstance(node, And):
            return "(" + " and ".join(self._true(i) for i in node.items) + ")"
        if isinstance(node, Or):
            return "(" + " or ".join(self._true(i) for i in node.items) + ")"
        return self._test(node, want=True)

    def _false(self, node: Node) -> str:
        if isinstance(node, Always):
            return "False"
        if isinstance(node, Not):
            return self._true(node.item)
        if isinstance(node, And):
            return "(" + " or ".join(self._false(i) for i in node.items) + ")"
        if isinstance(node, Or):
            return "(" + " and ".join(self._false(i) for i in node.items) + ")"
        return self._test(node, want=False)

    def _test(self, test: Test, *, want: bool) -> str:
        v = self._value(test.column)
        if isinstance(test, IsNull):
            # IS [NOT] NULL is never NULL itself
            return f"({v} is None)" if want != test.negated else f"({v} is not None)"
        if isinstance(test, IsBool):
            letter = "t" if test.value else "f"
            return f"({v} == {letter!r})" if want != test.negated else f"({v} != {letter!r})"
        column = self.types[test.column]
        if isinstance(test, In):
            values = frozenset(_normalize(lit, column, test) for lit in test.literals)
            member = f"{self._converted(v, column)} in {self._const(values)}"
            # x IN (...) is TRUE when some item equals x, FALSE when x is not NULL and none does
            if want != test.negated:
                return f"({v} is not None and {member})"
            return f"({v} is not None and not {member})"
        literal = _normalize(test.literal, column, test)
        op = "==" if test.op == "=" else ("!=" if test.op == "<>" else test.op)
        if column.kind in (INTEGER, NUMERIC):
            left = self._converted(v, column)
            check = f"{left} {op} {self._const(literal)}"
        else:
            check = f"{v} {op} {self._const(literal)}"
            if want and op == "==":
                return f"({check})"  # text never equals None
        # a comparison is NULL when its column is
        if want:
            return f"({v} is not None and {check})"
        return f"({v} is not None and not ({check}))"

    @staticmethod
    def _converted(v: str, column: Column) -> str:
        if column.kind == INTEGER:
            return f"int({v})"
        if column.kind == NUMERIC:
            return f"_number_key({v})"
        return v


def row_test(
    node: Node, slots: Mapping[str, int], types: Mapping[str, Column]
) -> Callable[[list[Any]], bool]:
    """The predicate as a function of a row's text values: True exactly when SQL says TRUE."""
    test = RowTest(node, slots, types)
    namespace = dict(test.names)
    exec(f"def counts(v):\n    return {test.source}\n", namespace)  # source built from the tree
    function: Callable[[list[Any]], bool] = namespace["counts"]
    return function
