"""``replicator verify``: compare a running service's counts with the badge queries.

The database keeps changing while verify runs, so each attempt pins both sides to one moment:

1. emit a sync point S0: ``pg_logical_emit_message(false, 'replicator.sync', '')``, a
   non-transactional message in the WAL, in a transaction that then takes an id X0 and
   commits (which flushes the message, so the service's walsender passes it at once);
2. in one ``REPEATABLE READ`` transaction, run the badge queries and note the snapshot's
   in-progress transactions (``pg_current_snapshot()``);
3. emit a sync point S1 the same way: every transaction that snapshot sees committed
   before S1;
4. wait, bounded, until the service's ``applied_lsn`` reaches S1, then fetch every user's
   counts from ``/v1/admin/badges`` with a ``service_role`` token. The service now holds
   everything the snapshot sees, and perhaps commits made since;
5. compare, pair by pair.

The attempt is *exact* when the last transaction the service applied (its ``lsn``)
committed before S0, and none of the snapshot's in-progress transactions with an id below
X0 has committed since (a commit record is written before the transaction becomes visible,
so one of those may be before S0 in the WAL yet unseen by the snapshot; X0 ended before the
snapshot, so every such transaction is in that list). Then both sides hold the same
transactions, and every difference is real. Otherwise a difference may be a commit only one
side has seen; the attempt is repeated after a growing pause, and only differences seen in
every attempt, by the same amount, are reported: the service applies each change as a
delta, so a real error is a fixed offset on its pair, while a race comes and goes.

Exit code 0 when nothing differs, 1 when something does.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, TextIO

import psycopg

from replicator.badges import queries
from replicator.badges import spec as badge_spec
from replicator.badges.catalog import bind_sync
from replicator.badges.spec import Badge
from replicator.config.settings import Settings
from replicator.errors import ReplicatorError, one_line
from replicator.ops.commands import signing_secret
from replicator.ops.doctor import Conn, connect, database_dsn
from replicator.pg.lsn import format_lsn, parse_lsn
from replicator.web.auth import mint_token

#: (user, badge name, counterpart) -> count
Flat = dict[tuple[str, str, str], int]

VERIFY_USER = "replicator-verify"


@dataclass(frozen=True, order=True)
class Difference:
    user: str
    badge: str
    counterpart: str
    service: int
    database: int

    @property
    def key(self) -> tuple[str, str, str]:
        return self.user, self.badge, self.counterpart

    @property
    def offset(self) -> int:
        return self.service - self.database

    def line(self) -> str:
        return (
            f"differ  user={self.user} badge={self.badge} counterpart={self.counterpart}"
            f" service={self.service} database={self.database}"
        )


@dataclass(frozen=True)
class Outcome:
    differences: list[Difference]
    attempts: int
    exact: bool
    sync_lsn: int
    users: int
    counts: int


def compare(service: Flat, database: Flat) -> list[Difference]:
    """Every (user, badge, counterpart) whose counts differ; an absent count is 0."""
    return sorted(
        Difference(*key, service.get(key, 0), database.get(key, 0))
        for key in service.keys() | database.keys()
        if service.get(key, 0) != database.get(key, 0)
    )


def flatten_service(users: dict[str, Any]) -> Flat:
    """``/v1/admin/badges`` users as flat counts (a badge without counterpart: one number)."""
    flat: Flat = {}
    for user, badges in users.items():
        for name, held in badges.items():
            if isinstance(held, dict):
                for counterpart, count in held.items():
                    flat[user, name, counterpart] = int(count)
            elif held:
                flat[user, name, ""] = int(held)
    return flat


class ServiceClient:
    """The running service's HTTP API, as verify needs it."""

    def __init__(self, url: str, token: str, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def _get(self, path: str, *, auth: bool) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, OSError) and reason.strerror:
                reason = reason.strerror.lower()
            raise ReplicatorError(f"cannot reach the service at {self.url}: {reason}") from None
        try:
            return status, json.loads(raw)
        except ValueError:
            raise ReplicatorError(
                f"the service at {self.url} answered {status} to GET {path} with no JSON body"
                " (is it a replicator?)"
            ) from None

    def _refused(self, status: int, body: Any, path: str) -> ReplicatorError:
        message = body.get("message", "") if isinstance(body, dict) else ""
        if status == 401:
            return ReplicatorError(
                f"the service at {self.url} refused the token ({message});"
                " set REPLICATOR_JWT_SECRET (and REPLICATOR_JWT_AUDIENCE) to what the service uses,"
                " or REPLICATOR_ADMIN_TOKEN to a service_role token it accepts"
            )
        if status == 403:
            return ReplicatorError(
                f"the service at {self.url} refused a service_role token for GET {path} ({message})"
            )
        return ReplicatorError(f"the service at {self.url} answered {status} to GET {path}")

    def check_access(self) -> None:
        """Fail now on an unreachable service or a token it does not accept."""
        # The admin route: a service_role key need not name a user (Supabase's does not).
        status, body = self._get("/v1/admin/badges", auth=True)
        if status != 200:
            raise self._refused(status, body, "/v1/admin/badges")

    def wait_applied(self, lsn: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            _, body = self._get("/readyz", auth=False)
            if not isinstance(body, dict) or "applied_lsn" not in body:
                raise ReplicatorError(f"the service at {self.url} did not report applied_lsn")
            if body.get("error"):
                raise ReplicatorError(
                    f"the service at {self.url} stopped replicating: {body['error']}"
                )
            applied = parse_lsn(str(body["applied_lsn"]))
            if applied >= lsn:
                return
            if time.monotonic() >= deadline:
                streaming = "streaming" if body.get("live") else "not streaming"
                raise ReplicatorError(
                    f"the service at {self.url} did not apply sync point {format_lsn(lsn)}"
                    f" within {timeout:g} s (applied {format_lsn(applied)}, {streaming})"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def badges(self) -> dict[str, Any]:
        status, body = self._get("/v1/admin/badges", auth=True)
        if status != 200 or not isinstance(body, dict):
            raise self._refused(status, body, "/v1/admin/badges")
        return body


@dataclass(frozen=True)
class SyncPoint:
    #: the message's position in the WAL
    lsn: int
    #: a transaction id taken after the message: above every one that committed before it
    xid: int


def emit_sync_point(conn: Conn) -> SyncPoint:
    """A position in the WAL after every commit so far, and a transaction id after theirs.

    The message is written in a transaction that then takes a transaction id, whose commit
    flushes the message: a walsender sends only flushed WAL, so the service can pass the
    point at once. That transaction changes nothing, so the service never sees it.
    """
    try:
        conn.execute("BEGIN")
        conn.execute("SET LOCAL synchronous_commit = on")
        row = conn.execute(
            "SELECT pg_logical_emit_message(false, 'replicator.sync', '')::text"
        ).fetchone()
        xid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        conn.execute("COMMIT")
    except psycopg.Error as exc:
        conn.execute("ROLLBACK")
        raise ReplicatorError(f"cannot emit a sync point: {one_line(exc)}") from None
    assert row is not None and xid is not None
    return SyncPoint(parse_lsn(str(row[0])), int(xid[0]))


def read_database(conn: Conn, badges: list[Badge]) -> tuple[Flat, list[int]]:
    """The badge queries in one snapshot, and the transactions in progress at that snapshot."""
    flat: Flat = {}
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    try:
        # as the snapshot reads: the stream is not filtered by row security either
        conn.execute("SET LOCAL row_security = off")
        row = conn.execute(
            "SELECT array(SELECT pg_snapshot_xip(pg_current_snapshot()))::text[]"
        ).fetchone()
        assert row is not None
        in_progress = [int(xid) for xid in row[0]]
        for badge in badges:
            for user, counterpart, count in conn.cursor().stream(queries.counts(badge)):
                flat[str(user), badge.name, str(counterpart)] = int(count)
    except psycopg.Error as exc:
        raise ReplicatorError(f"cannot read the badge counts: {one_line(exc)}") from None
    finally:
        conn.execute("COMMIT")
    return flat, in_progress


def unseen_commits(conn: Conn, in_progress: list[int], before: SyncPoint) -> bool:
    """Whether a transaction the snapshot did not see may have committed before ``before``.

    Such a transaction had an id below the sync point's, whose transaction ended before the
    snapshot was taken: so it was in the snapshot's in-progress list. It counts once it has
    committed.
    """
    xids = [str(xid) for xid in in_progress if xid < before.xid]
    if not xids:
        return False
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM unnest(%s::text[]::xid8[]) x"
        " WHERE pg_xact_status(x) = 'committed')",
        (xids,),
    ).fetchone()
    return bool(row and row[0])


def verify(
    conn: Conn,
    client: ServiceClient,
    badges: list[Badge],
    *,
    attempts: int = 10,
    sync_timeout: float = 60.0,
    pause: float = 0.1,
) -> Outcome:
    """Compare until an exact attempt, or until no difference is left, or ``attempts`` ran."""
    persistent: dict[tuple[str, str, str], Difference] = {}
    for attempt in range(1, attempts + 1):
        before = emit_sync_point(conn)
        database, in_progress = read_database(conn, badges)
        sync = emit_sync_point(conn)
        client.wait_applied(sync.lsn, sync_timeout)
        body = client.badges()
        state_lsn = parse_lsn(str(body["lsn"]))
        applied = parse_lsn(str(body["applied_lsn"]))
        differences = compare(flatten_service(body.get("users") or {}), database)
        exact = (
            state_lsn < before.lsn
            and applied >= sync.lsn
            and not unseen_commits(conn, in_progress, before)
        )
        found = {d.key: d for d in differences}
        if attempt == 1 or exact:
            persistent = found
        else:
            persistent = {
                key: found[key]
                for key, seen in persistent.items()
                if key in found and found[key].offset == seen.offset
            }
        if exact or not persistent or attempt == attempts:
            users = len({key[0] for key in database})
            return Outcome(
                sorted(persistent.values()), attempt, exact, sync.lsn, users, len(database)
            )
        time.sleep(min(pause * 2 ** (attempt - 1), 2.0))
    raise AssertionError("unreachable")


def describe(outcome: Outcome, url: str) -> list[str]:
    lines = [d.line() for d in outcome.differences]
    tries = f"{outcome.attempts} attempt{'s' * (outcome.attempts != 1)}"
    how = (
        f"exact comparison at sync point {format_lsn(outcome.sync_lsn)}, {tries}"
        if outcome.exact
        else f"under concurrent writes, {tries}, last sync point {format_lsn(outcome.sync_lsn)}"
    )
    if outcome.differences:
        n = len(outcome.differences)
        lines.append(
            f"FAIL  {n} difference{'s' * (n != 1)} between the service at {url}"
            f" and the database ({how})"
        )
    else:
        lines.append(
            f"ok    the service at {url} agrees with the database: {outcome.users} users,"
            f" {outcome.counts} counts ({how})"
        )
    return lines


def run_verify(settings: Settings, url: str, out: TextIO = sys.stdout) -> int:
    """Print every difference; 0 when there is none, 1 otherwise."""
    token = settings.admin_token or mint_token(
        signing_secret(settings),
        VERIFY_USER,
        ttl=3600,
        audience=settings.jwt_audience,
        admin=True,
    )
    client = ServiceClient(url, token)
    client.check_access()
    with (
        database_dsn(settings, start_embedded=False) as dsn,
        # sync points are written, so with a standby everything runs on the primary (which
        # the standby's WAL, and so the service, follows)
        connect(settings.primary_url or dsn, statement_timeout=None) as conn,
    ):
        badges = bind_sync(conn, badge_spec.load(settings.badges, schema=settings.schema))
        outcome = verify(conn, client, badges)
    for line in describe(outcome, client.url):
        print(line, file=out)
    return 1 if outcome.differences else 0
