"""Transactions out of a change stream: framing, resume-skipping and the applied position.

A feed takes what the walsender sends (pgoutput bytes, or wal2json objects) through a decoder
and hands a ``ChangeSink`` the rows of the relations it asked for, then each commit. It keeps
the WAL position through which everything is applied (what may be confirmed to the server)
and, after a reconnect, skips the transactions applied before it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from replicator.errors import NeedsCatalog, ProtocolError
from replicator.pg.changes import (
    UNCHANGED,
    Begin,
    ChangeSink,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Projection,
    Relation,
    Truncate,
    Update,
    Values,
)
from replicator.pg.decoding import pgoutput, wal2json
from replicator.pg.lsn import format_lsn

Buffer = bytes | memoryview


class TransactionFeed:
    """Decoded messages in, rows and commits out to ``sink``.

    Transactions whose commit lies below ``applied_lsn`` were applied before a reconnect and
    are skipped whole.
    """

    def __init__(self, sink: ChangeSink, *, applied_lsn: int = 0) -> None:
        self.sink = sink
        #: WAL position through which every change is applied
        self.applied_lsn = applied_lsn
        self.rows = 0
        self.transactions = 0
        self.skipped_transactions = 0
        self.last_commit_time = 0
        self._projections: dict[int, Projection] = {}
        #: relid -> its projection's insert, for the fast path of inserts
        self._inserts: dict[int, Callable[[Values], None]] = {}
        self._in_transaction = False
        self._skipping = False

    @property
    def in_transaction(self) -> bool:
        return self._in_transaction

    def project(self, relid: int, slots: tuple[int, ...] | None) -> None:
        """Tell the decoder which columns of ``relid`` to decode (None: none)."""

    def apply_message(self, msg: Message) -> None:
        """Apply one decoded message."""
        kind = type(msg)
        if kind is Insert:
            self._insert(msg)  # type: ignore[arg-type]
        elif kind is Update:
            self._update(msg)  # type: ignore[arg-type]
        elif kind is Begin:
            self._begin(msg)  # type: ignore[arg-type]
        elif kind is Commit:
            self._commit(msg)  # type: ignore[arg-type]
        elif kind is Delete:
            self._delete(msg)  # type: ignore[arg-type]
        elif kind is Relation:
            self._relation(msg)  # type: ignore[arg-type]
        elif kind is Truncate:
            if not self._skipping:
                self.sink.truncate(msg.relids)  # type: ignore[union-attr]
        elif kind is LogicalMessage:
            self._message(msg)  # type: ignore[arg-type]
        # Origin and Type need nothing from us.

    def advance(self, lsn: int) -> None:
        """Mark everything up to ``lsn`` as applied (a position between transactions)."""
        if lsn > self.applied_lsn and not self._in_transaction:
            self.applied_lsn = lsn

    def abandon(self) -> None:
        """Forget a transaction cut off by a lost connection: it comes again from its Begin."""
        if self._in_transaction and not self._skipping:
            self.sink.abandon()
        self._in_transaction = self._skipping = False

    def _relation(self, rel: Relation) -> None:
        projection = self.sink.relation(rel)
        if projection is None:
            self._projections.pop(rel.relid, None)
            self._inserts.pop(rel.relid, None)
            self.project(rel.relid, None)
        else:
            self._projections[rel.relid] = projection
            self._inserts[rel.relid] = projection.insert
            self.project(rel.relid, projection.slots)

    def _begin(self, msg: Begin) -> None:
        if self._in_transaction:
            # Only a reconnect puts a Begin inside a transaction; what came before is resent.
            self.abandon()
        self._in_transaction = True
        self._skipping = msg.final_lsn < self.applied_lsn

    def _commit(self, msg: Commit) -> None:
        if not self._in_transaction:
            raise ProtocolError(f"commit at {format_lsn(msg.commit_lsn)} without a begin")
        self._in_transaction = False
        if self._skipping:
            self._skipping = False
            self.skipped_transactions += 1
            return
        self.sink.commit(msg.commit_lsn, msg.commit_time)
        self.applied_lsn = max(self.applied_lsn, msg.end_lsn)
        self.transactions += 1
        self.last_commit_time = msg.commit_time

    def _message(self, msg: LogicalMessage) -> None:
        if msg.transactional:
            if self._in_transaction and not self._skipping:
                self.sink.message(msg.prefix, msg.content.decode("utf-8", "replace"))
        elif not self._in_transaction:
            # Every transaction that committed before this message was sent before it.
            self.advance(msg.lsn)

    def _insert(self, msg: Insert) -> None:
        projection = self._projections.get(msg.relid)
        if projection is None or self._skipping:
            return
        self.rows += 1
        if msg.new is not None:
            projection.insert(msg.new)

    def _update(self, msg: Update) -> None:
        projection = self._projections.get(msg.relid)
        if projection is None or self._skipping or msg.new is None:
            return
        self.rows += 1
        old, new = msg.old, msg.new
        if msg.old_kind != "O":
            old = None
        elif old is not None and UNCHANGED in new:
            new = [o if n is UNCHANGED else n for o, n in zip(old, new, strict=True)]
        projection.update(old, new)

    def _delete(self, msg: Delete) -> None:
        projection = self._projections.get(msg.relid)
        if projection is None or self._skipping:
            return
        self.rows += 1
        projection.delete(msg.old if msg.old_kind == "O" else None)


class PgoutputFeed(TransactionFeed):
    """pgoutput bytes in: ``feed(payload, wal_start)`` for every XLogData payload."""

    def __init__(self, sink: ChangeSink, *, applied_lsn: int = 0) -> None:
        super().__init__(sink, applied_lsn=applied_lsn)
        self.decoder = pgoutput.Decoder()

    def project(self, relid: int, slots: tuple[int, ...] | None) -> None:
        if slots is None:
            self.decoder.forget(relid)
        else:
            self.decoder.project(relid, slots)

    def __call__(self, payload: Buffer, lsn: int) -> None:
        """Decode and apply one pgoutput message that arrived at WAL position ``lsn``."""
        if not payload or payload[0] != 0x49:
            try:
                self.apply_message(self.decoder.decode(payload, lsn))
            except NeedsCatalog as exc:
                exc.payload, exc.lsn = bytes(payload), lsn
                raise
            return
        # Inserts are most of any stream: ``_insert`` for one, with the fewest calls.
        relid, new = self.decoder.insert_row(payload, lsn)
        insert = self._inserts.get(relid)
        if insert is None or self._skipping:
            return
        self.rows += 1
        if new is not None:
            insert(new)


class Wal2jsonFeed(TransactionFeed):
    """wal2json (format-version 2) objects in: ``feed(payload, wal_start)`` for each.

    ``tables`` maps (schema, table) to the columns wanted of it: a table whose first message
    is a TRUNCATE, which carries no columns, is announced with those.
    """

    def __init__(
        self,
        sink: ChangeSink,
        tables: Mapping[tuple[str, str], tuple[str, ...]],
        *,
        applied_lsn: int = 0,
    ) -> None:
        super().__init__(sink, applied_lsn=applied_lsn)
        self.decoder = wal2json.Decoder(tables)

    def project(self, relid: int, slots: tuple[int, ...] | None) -> None:
        if slots is None:
            self.decoder.forget(relid)
        else:
            self.decoder.project(relid, slots)

    def __call__(self, payload: Buffer, lsn: int) -> None:
        try:
            self.decoder.decode(payload, lsn, self.apply_message)
        except NeedsCatalog as exc:
            exc.payload, exc.lsn = bytes(payload), lsn
            raise
