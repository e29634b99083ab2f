#!/bin/sh
# Run once by the postgres image when the primary's cluster is created: let the standby
# container stream the WAL (pg_basebackup and its walreceiver connect for replication).
set -eu
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
