"""Command line: argument parsing -> Settings -> run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from replicator import __version__
from replicator.config.settings import ENV, Settings, load_settings
from replicator.errors import ReplicatorError, StartupError

logger = logging.getLogger("replicator")

_HELP = {
    "database_url": "PostgreSQL URL; without it, serve runs the embedded PostgreSQL",
    "host": "address to listen on (default 127.0.0.1)",
    "port": "port to listen on (default 8080; 0 picks a free one)",
    "jwt_secret": "HS256 secret that signs user tokens",
    "jwt_public_key": "PEM public key (or a path to one) for RS256/ES256 tokens",
    "jwt_audience": "accepted token audiences, comma-separated; empty: not checked"
    " (default authenticated)",
    "slot": "prefix of the replication slot's name; each instance adds its own id"
    " (default replicator)",
    "instance": "this instance's id in its slot name (default: from the host name and the port)",
    "slot_grace_s": "seconds a dead instance's slot stays before a live instance drops it"
    " (default 300)",
    "primary_url": "the primary, when DATABASE_URL is a standby (default: none)",
    "publication": "publication name (default badges)",
    "schema": "schema of a badge table named without one (default public)",
    "decoder": "logical decoding plugin: pgoutput (default) or wal2json",
    "data_dir": "where the embedded default keeps its files (default .replicator)",
    "badges": "TOML file of [[badge]] entries (default: unread messages and missed calls)",
    "max_streams_per_user": "open streams allowed per user (default 10)",
    "max_streams": "open streams allowed in total (default 20000)",
    "heartbeat_s": "seconds between comment lines on idle streams (default 15)",
    "send_timeout_s": "seconds a write to a client that stopped reading may take before its"
    " stream is closed (default 30)",
    "linger_ms": "milliseconds changes arriving close together (more than 100 a second) may"
    " wait to be read together; 0 reads each at once (default 5)",
    "reconnect_rate": "streams per second this instance can take back: at shutdown each stream"
    " is told when to come back, spread so that they return at this rate (default 2000)",
    "demo_traffic": "write a slow trickle of demo changes (default: on with the embedded database)",
    "log_level": "debug, info, warning or error (default info)",
    "jwks_url": "JWKS URL of your identity provider (Supabase signing keys, Auth0, Clerk,"
    " Keycloak)",
    "jwks_refresh_s": "seconds between JWKS refreshes (default 300)",
    "jwt_issuer": "accepted token issuers (iss), comma-separated (default: not checked)",
    "jwt_user_claim": "claim holding the user id; a dotted path reaches nested claims"
    " (default sub)",
    "admin_token": "a service_role token to use instead of signing one",
    "cors_origins": "origins whose pages may call the API, comma-separated, or * (header and"
    " query tokens only)",
    "trusted_proxies": "proxies (addresses or networks) whose X-Forwarded-For names the client",
    "max_streams_per_address": "open streams allowed per client address (default 200)",
    "max_anonymous_streams": "open streams allowed for anonymous users in all"
    " (default a tenth of --max-streams)",
    "reserved_streams": "places under --max-streams kept for users already connected"
    " (default a twentieth)",
    "header_timeout_s": "seconds a connection may take to send complete request headers"
    " before it is closed (default 10)",
    "admin_address": "host:port of a second listener for /metrics and the detailed /readyz;"
    " the main address then has no /metrics and a /readyz of one word (default: none)",
    "metrics_token": "bearer token that /metrics requires (default: none)",
    "demo": "serve the demo page and its routes, which write demo rows for the token's user"
    " (default: on with the embedded database only)",
}
#: extra spellings of a flag
_ALIASES = {"admin_token": ["--token"]}


def _add_settings(parser: argparse.ArgumentParser, keys: Sequence[str]) -> None:
    for key in keys:
        flag = "--" + key.replace("_", "-")
        parser.add_argument(
            *_ALIASES.get(key, []),
            flag,
            dest=key,
            default=None,
            metavar=ENV[key],
            help=f"{_HELP[key]} [env {ENV[key]}]",
        )


_CONNECTION = (
    "database_url",
    "primary_url",
    "slot",
    "publication",
    "schema",
    "badges",
    "log_level",
)
_SERVE = tuple(key for key in ENV if key != "admin_token")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replicator",
        description="Live unread-message and missed-call badges from PostgreSQL, over SSE.",
    )
    parser.add_argument("--version", action="version", version=f"replicator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the service (embedded PostgreSQL without a URL)")
    _add_settings(serve, _SERVE)

    migrate = sub.add_parser("migrate", help="apply the sql/ migrations (safe to run again)")
    _add_settings(migrate, ("database_url", "data_dir", "log_level"))

    doctor = sub.add_parser("doctor", help="check a database against the production checklist")
    _add_settings(doctor, (*_CONNECTION, "data_dir"))
    doctor.add_argument(
        "--sql",
        action="store_true",
        help="print the fixes of what failed as one SQL script, for a DBA to review",
    )

    verify = sub.add_parser("verify", help="compare a running service's counts with the database")
    _add_settings(verify, (*_CONNECTION, "data_dir", "jwt_secret", "jwt_audience", "admin_token"))
    verify.add_argument(
        "--url",
        default="http://127.0.0.1:8080",
        help="base URL of the running service (default http://127.0.0.1:8080)",
    )

    token = sub.add_parser("token", help="print a signed JWT for a user (development and tests)")
    token.add_argument("user_id", metavar="USER_ID")
    token.add_argument(
        "--ttl",
        type=int,
        default=24 * 3600,
        help="seconds until the token expires (default one day)",
    )
    token.add_argument(
        "--admin",
        action="store_true",
        help="a service_role token, which may read every user's badges",
    )
    _add_settings(token, ("database_url", "jwt_secret", "jwt_audience", "data_dir"))
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {key: getattr(args, key, None) for key in ENV}
    return load_settings(os.environ, overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("psycopg").setLevel(max(logging.getLevelName(level), logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        _setup_logging(settings.log_level)
        if args.command == "serve":
            from replicator.runtime.service import serve

            return serve(settings)
        if args.command == "migrate":
            from replicator.ops.commands import run_migrate

            return run_migrate(settings)
        if args.command == "doctor":
            from replicator.ops.doctor import run_doctor

            return run_doctor(settings, as_sql=args.sql)
        if args.command == "verify":
            from replicator.ops.verify import run_verify

            return run_verify(settings, args.url)
        if args.command == "token":
            from replicator.ops.commands import run_token

            return run_token(settings, args.user_id, ttl=args.ttl, admin=args.admin)
    except ReplicatorError as exc:
        print(f"replicator: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, StartupError) else 2
    except KeyboardInterrupt:
        return 130
    return 0
