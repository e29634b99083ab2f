#!/bin/sh
# Installs the Debian packages the test suite needs, once; a no-op when they are present.
set -eu
need=""
[ -x /usr/bin/chromium ] || need="$need chromium"
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need="$need postgresql-15"
ls /usr/lib/postgresql/*/lib/wal2json.so >/dev/null 2>&1 || need="$need postgresql-15-wal2json"
# promtool checks the alert rules in docker/ against a real scrape
command -v promtool >/dev/null 2>&1 || need="$need prometheus"
# the load balancer test puts docker/nginx.conf in front of two instances
[ -x /usr/sbin/nginx ] || need="$need nginx"
# tsc checks that badges.d.ts types an app's use of badges.mjs
command -v tsc >/dev/null 2>&1 || need="$need node-typescript"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: missing Debian packages:$need; install them with: sudo apt-get install -y$need" >&2
    exit 1
fi
echo "system-deps: installing$need"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $need >/dev/null
