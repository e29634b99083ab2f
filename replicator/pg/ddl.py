"""The DDL signal: event triggers that put a transactional logical message in the WAL of every
DDL transaction that touches a table, so a stream sees schema changes exactly where they
happened.

Partitions attached, detached or dropped, and tables rewritten (``ALTER COLUMN ... TYPE ...
USING``), change what a table holds without a single row change; a consumer that meets the
message at that point in the stream can look at the catalog (or take a new snapshot) before
it applies anything that comes after. The triggers also give a new partition of a table with
``REPLICA IDENTITY FULL`` the same identity, since partitions do not inherit it.

Creating event triggers needs a superuser; without them a consumer falls back to looking at
the catalog at an interval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

PREFIX = "replicator.ddl"
FUNCTION = "replicator_ddl_signal"
TRIGGERS = {
    "replicator_ddl_end": "ddl_command_end WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')",
    "replicator_ddl_drop": "sql_drop WHEN TAG IN ('DROP TABLE', 'ALTER TABLE')",
    "replicator_ddl_rewrite": "table_rewrite",
}

CREATE_FUNCTION = f"""CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS event_trigger
LANGUAGE plpgsql AS $signal$
DECLARE
    oids oid[] := '{{}}';
    r record;
    root oid;
BEGIN
    IF current_setting('wal_level') <> 'logical' THEN
        RETURN;
    END IF;
    IF tg_event = 'table_rewrite' THEN
        oids := ARRAY[pg_event_trigger_table_rewrite_oid()];
    ELSIF tg_event = 'sql_drop' THEN
        SELECT coalesce(array_agg(DISTINCT objid), '{{}}') INTO oids
        FROM pg_event_trigger_dropped_objects() WHERE classid = 'pg_class'::regclass;
    ELSE
        FOR r IN SELECT DISTINCT objid FROM pg_event_trigger_ddl_commands()
                 WHERE classid = 'pg_class'::regclass LOOP
            oids := oids || r.objid;
            root := pg_partition_root(r.objid);
            IF root IS NOT NULL AND root <> r.objid THEN
                oids := oids || root;
                -- partitions do not inherit REPLICA IDENTITY FULL; a new one gets it here
                IF (SELECT relreplident FROM pg_class WHERE oid = root) = 'f'
                   AND (SELECT relreplident = 'd' AND relkind = 'r'
                        FROM pg_class WHERE oid = r.objid) THEN
                    EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', r.objid::regclass);
                END IF;
            END IF;
        END LOOP;
    END IF;
    IF cardinality(oids) > 0 THEN
        PERFORM pg_logical_emit_message(true, '{PREFIX}',
            json_build_object('event', tg_event, 'tag', tg_tag, 'oids', oids)::text);
    END IF;
END
$signal$"""


def install_statements() -> list[str]:
    """The statements that install (or reinstall) the signal, in order."""
    statements = [CREATE_FUNCTION]
    for name, on in TRIGGERS.items():
        statements.append(f"DROP EVENT TRIGGER IF EXISTS {name}")
        statements.append(f"CREATE EVENT TRIGGER {name} ON {on} EXECUTE FUNCTION {FUNCTION}()")
    return statements


#: whether every trigger of the signal is installed and enabled
INSTALLED_QUERY = (
    "SELECT count(*) = %s FROM pg_event_trigger"
    " WHERE evtname = ANY(%s) AND evtenabled <> 'D'"
    " AND evtfoid = (SELECT oid FROM pg_proc WHERE proname = %s LIMIT 1)"
)


def installed_params() -> tuple[int, list[str], str]:
    return len(TRIGGERS), list(TRIGGERS), FUNCTION


@dataclass(frozen=True)
class Signal:
    """One DDL transaction's message: the event, the command and the relations it named."""

    event: str
    tag: str
    oids: tuple[int, ...]


def parse(content: str) -> Signal | None:
    """The signal in a message of ``PREFIX``; None if it is not one this version writes."""
    try:
        found = json.loads(content)
        return Signal(str(found["event"]), str(found["tag"]), tuple(int(o) for o in found["oids"]))
    except (ValueError, KeyError, TypeError):
        return None
